//! The HTTP API's JSON shapes, and their conversion to and from the gRPC
//! API's messages (the HTTP adapter speaks to the same service through
//! them, so both surfaces have one meaning).
//!
//! Payloads: `payload` takes any JSON value and the participant receives
//! its JSON text as the body; `payload_base64` takes bytes that are not
//! JSON. On the way out, a payload that is JSON is shown as `payload`, any
//! other as `payload_base64`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use tandem_proto::v1 as pb;
use tandem_proto::wire;
use utoipa::{IntoParams, ToSchema};

/// A protocol's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ProtocolName {
    #[serde(rename = "saga")]
    Saga,
    #[serde(rename = "tcc")]
    Tcc,
    #[serde(rename = "xa")]
    Xa,
    #[serde(rename = "2pc")]
    TwoPc,
    #[serde(rename = "3pc")]
    ThreePc,
    #[serde(rename = "msg")]
    Msg,
}

impl ProtocolName {
    pub fn to_pb(self) -> pb::Protocol {
        match self {
            ProtocolName::Saga => pb::Protocol::Saga,
            ProtocolName::Tcc => pb::Protocol::Tcc,
            ProtocolName::Xa => pb::Protocol::Xa,
            ProtocolName::TwoPc => pb::Protocol::TwoPc,
            ProtocolName::ThreePc => pb::Protocol::ThreePc,
            ProtocolName::Msg => pb::Protocol::Msg,
        }
    }
}

/// A transaction's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    Active,
    Preparing,
    PreCommitting,
    Committing,
    Aborting,
    Committed,
    Aborted,
}

impl StateName {
    pub fn to_pb(self) -> pb::TxState {
        match self {
            StateName::Active => pb::TxState::Active,
            StateName::Preparing => pb::TxState::Preparing,
            StateName::PreCommitting => pb::TxState::PreCommitting,
            StateName::Committing => pb::TxState::Committing,
            StateName::Aborting => pb::TxState::Aborting,
            StateName::Committed => pb::TxState::Committed,
            StateName::Aborted => pb::TxState::Aborted,
        }
    }

    fn from_pb(value: i32) -> Option<StateName> {
        Some(match pb::TxState::try_from(value).ok()? {
            pb::TxState::Unspecified => return None,
            pb::TxState::Active => StateName::Active,
            pb::TxState::Preparing => StateName::Preparing,
            pb::TxState::PreCommitting => StateName::PreCommitting,
            pb::TxState::Committing => StateName::Committing,
            pb::TxState::Aborting => StateName::Aborting,
            pb::TxState::Committed => StateName::Committed,
            pb::TxState::Aborted => StateName::Aborted,
        })
    }
}

/// Retry policy; zeros (or absent) mean the node's default.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryJson {
    pub initial_interval_ms: u32,
    pub max_interval_ms: u32,
    pub max_attempts: u32,
}

impl RetryJson {
    fn to_pb(&self) -> pb::RetryPolicy {
        pb::RetryPolicy {
            initial_interval_ms: self.initial_interval_ms,
            max_interval_ms: self.max_interval_ms,
            max_attempts: self.max_attempts,
        }
    }

    fn from_pb(r: &pb::RetryPolicy) -> RetryJson {
        RetryJson {
            initial_interval_ms: r.initial_interval_ms,
            max_interval_ms: r.max_interval_ms,
            max_attempts: r.max_attempts,
        }
    }
}

/// Transaction options; zeros (or absent) mean the node's default.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptionsJson {
    /// Abort if undecided this long after it began.
    pub timeout_ms: u32,
    pub retry: Option<RetryJson>,
    /// One call to a participant may take this long.
    pub branch_timeout_ms: u32,
    /// Saga: steps that may run at once (0: no limit).
    pub concurrency: u32,
}

impl OptionsJson {
    fn to_pb(&self) -> pb::TxOptions {
        pb::TxOptions {
            timeout_ms: self.timeout_ms,
            retry: self.retry.as_ref().map(RetryJson::to_pb),
            branch_timeout_ms: self.branch_timeout_ms,
            concurrency: self.concurrency,
        }
    }
}

/// The payload fields every body that carries one accepts.
fn payload_bytes(
    value: &Option<serde_json::Value>,
    base64: &Option<String>,
    field: &str,
) -> Result<Vec<u8>, String> {
    match (value, base64) {
        (Some(_), Some(_)) => Err(format!("{field}: give payload or payload_base64, not both")),
        (Some(v), None) => Ok(serde_json::to_vec(v).expect("a JSON value serializes")),
        (None, Some(b)) => BASE64
            .decode(b)
            .map_err(|e| format!("{field}: payload_base64 is not base64: {e}")),
        (None, None) => Ok(Vec::new()),
    }
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginBody {
    /// 1..=128 printable ASCII bytes without spaces, chosen by the client
    /// so that a retried request is recognised.
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub gid: String,
    pub protocol: ProtocolName,
    #[serde(default)]
    pub options: Option<OptionsJson>,
    /// Application data kept with the transaction (any JSON).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
}

impl BeginBody {
    pub fn to_pb(&self) -> Result<pb::BeginRequest, String> {
        Ok(pb::BeginRequest {
            gid: self.gid.clone(),
            protocol: self.protocol.to_pb() as i32,
            options: self.options.as_ref().map(OptionsJson::to_pb),
            payload: payload_bytes(&self.payload, &self.payload_base64, "payload")?,
        })
    }
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepJson {
    pub branch_id: String,
    /// URL the action is POSTed to (`http(s)://…` or `grpc://…`).
    pub action: String,
    /// URL the compensation is POSTed to.
    pub compensate: String,
    /// The body both calls carry (any JSON).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Steps whose action must succeed first (a DAG; with `concurrent`).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub retry: Option<RetryJson>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SagaBody {
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub gid: String,
    pub steps: Vec<StepJson>,
    #[serde(default)]
    pub options: Option<OptionsJson>,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Run steps as their `after` lists allow instead of one after another.
    #[serde(default)]
    pub concurrent: bool,
    /// Answer once the saga ended (or `wait_timeout_ms` passed).
    #[serde(default)]
    pub wait: bool,
    #[serde(default)]
    pub wait_timeout_ms: u32,
}

impl SagaBody {
    pub fn to_pb(&self) -> Result<pb::SubmitSagaRequest, String> {
        let steps = self
            .steps
            .iter()
            .map(|s| {
                Ok(pb::SagaStep {
                    branch_id: s.branch_id.clone(),
                    action: s.action.clone(),
                    compensate: s.compensate.clone(),
                    payload: payload_bytes(
                        &s.payload,
                        &s.payload_base64,
                        &format!("step {}", s.branch_id),
                    )?,
                    after: s.after.clone(),
                    retry: s.retry.as_ref().map(RetryJson::to_pb),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(pb::SubmitSagaRequest {
            gid: self.gid.clone(),
            steps,
            options: self.options.as_ref().map(OptionsJson::to_pb),
            payload: payload_bytes(&self.payload, &self.payload_base64, "payload")?,
            concurrent: self.concurrent,
            wait: self.wait,
            wait_timeout_ms: self.wait_timeout_ms,
        })
    }
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationJson {
    /// Names the destination within the message (with the gid: the message id).
    pub branch_id: String,
    /// `http(s)://…`, `grpc://…`, `nats://SUBJECT` or `amqp://EXCHANGE/ROUTING_KEY`.
    pub endpoint: String,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub gid: String,
    /// The producer's check-back endpoint (asked whether its local
    /// transaction committed when no submit came by the timeout).
    pub check_back: String,
    pub destinations: Vec<DestinationJson>,
    #[serde(default)]
    pub options: Option<OptionsJson>,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
}

impl MessageBody {
    pub fn to_pb(&self) -> Result<pb::PrepareMessageRequest, String> {
        let destinations = self
            .destinations
            .iter()
            .map(|d| {
                Ok(pb::Destination {
                    branch_id: d.branch_id.clone(),
                    endpoint: d.endpoint.clone(),
                    payload: payload_bytes(
                        &d.payload,
                        &d.payload_base64,
                        &format!("destination {}", d.branch_id),
                    )?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(pb::PrepareMessageRequest {
            gid: self.gid.clone(),
            check_back: self.check_back.clone(),
            destinations,
            options: self.options.as_ref().map(OptionsJson::to_pb),
            payload: payload_bytes(&self.payload, &self.payload_base64, "payload")?,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpEndpointJson {
    /// prepare, commit, rollback, try, confirm, cancel, can_commit,
    /// pre_commit, do_commit, abort.
    pub op: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub branch_id: String,
    pub ops: Vec<OpEndpointJson>,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
}

impl RegisterBody {
    pub fn to_pb(&self, gid: &str) -> Result<pb::RegisterBranchRequest, String> {
        Ok(pb::RegisterBranchRequest {
            gid: gid.to_string(),
            branch_id: self.branch_id.clone(),
            ops: self
                .ops
                .iter()
                .map(|o| pb::BranchEndpoint {
                    op: o.op.clone(),
                    endpoint: o.endpoint.clone(),
                })
                .collect(),
            payload: payload_bytes(&self.payload, &self.payload_base64, "payload")?,
        })
    }
}

/// Commit (a message: submit). Every field may be left out.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CommitBody {
    /// Answer once the transaction ended (or `wait_timeout_ms` passed).
    pub wait: bool,
    pub wait_timeout_ms: u32,
}

/// Abort an undecided transaction. Every field may be left out.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AbortBody {
    /// Kept as the transaction's error (at most 1024 bytes).
    pub reason: String,
    pub wait: bool,
    pub wait_timeout_ms: u32,
}

/// A repair: retry now, or resolve by hand.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RepairBody {
    /// One branch; absent: every branch the repair fits.
    pub branch_id: Option<String>,
    /// Why (required to resolve); kept in the audit record.
    pub reason: String,
    /// Who; kept in the audit record (default: the HTTP client's address).
    pub by: Option<String>,
}

impl RepairBody {
    /// The repair of `gid`, done by `by` or else by the HTTP client at `peer`.
    pub fn to_pb(self, gid: &str, peer: std::net::SocketAddr) -> pb::RepairRequest {
        pb::RepairRequest {
            gid: gid.to_string(),
            branch_id: self.branch_id.unwrap_or_default(),
            reason: self.reason,
            by: self.by.unwrap_or_else(|| format!("http {peer}")),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// The termination protocol's question: an undecided transaction past
    /// its deadline is decided (abort) by the question itself.
    pub resolve: bool,
}

#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub state: Option<StateName>,
    pub protocol: Option<ProtocolName>,
    /// Page size: 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `next_page_token`.
    pub page_token: Option<String>,
    /// Only transactions changed within this long, e.g. `1h`, `30m`.
    pub since: Option<String>,
    /// Only unfinished transactions with an op that failed 5 times or more.
    pub stuck: bool,
}

#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Stop watching after this long (default 60000, at most 600000).
    #[param(maximum = 600000)]
    pub timeout_ms: Option<u32>,
}

// ---------------------------------------------------------------- answers

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OpJson {
    pub op: String,
    pub endpoint: String,
    /// pending, succeeded, failed, skipped, refused or resolved.
    pub state: String,
    pub attempts: u32,
    pub last_error: String,
    pub updated_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BranchJson {
    pub branch_id: String,
    pub ops: Vec<OpJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    pub after: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryJson>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DecisionJson {
    /// commit or abort.
    pub outcome: String,
    /// The entry that recorded it: the fencing token of every phase-two call.
    pub term: u64,
    pub index: u64,
    pub decided_at_ms: i64,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RepairJson {
    /// retry or resolve.
    pub action: String,
    pub branch_id: String,
    pub reason: String,
    pub by: String,
    pub at_ms: i64,
    pub index: u64,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TransactionJson {
    pub gid: String,
    pub protocol: String,
    /// active, preparing, pre_committing, committing, aborting, committed or aborted.
    pub state: String,
    pub created_at_ms: i64,
    /// `created_at_ms` as RFC 3339.
    pub created_at: String,
    pub updated_at_ms: i64,
    pub deadline_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    pub branches: Vec<BranchJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Why it aborted.
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionJson>,
    /// A participant refused phase two after voting yes; still retried.
    pub heuristic_hazard: bool,
    /// An op was resolved by an operator, not by its participant.
    pub heuristic: bool,
    /// Unfinished, with an open op that failed 5 times or more.
    pub stuck: bool,
    pub repairs: Vec<RepairJson>,
}

fn payload_json(bytes: &[u8]) -> (Option<serde_json::Value>, Option<String>) {
    if bytes.is_empty() {
        return (None, None);
    }
    match serde_json::from_slice(bytes) {
        Ok(value) => (Some(value), None),
        Err(_) => (None, Some(BASE64.encode(bytes))),
    }
}

fn op_state_name(value: i32) -> &'static str {
    match pb::OpState::try_from(value) {
        Ok(pb::OpState::Pending) => "pending",
        Ok(pb::OpState::Succeeded) => "succeeded",
        Ok(pb::OpState::Failed) => "failed",
        Ok(pb::OpState::Skipped) => "skipped",
        Ok(pb::OpState::Refused) => "refused",
        Ok(pb::OpState::Resolved) => "resolved",
        _ => "unknown",
    }
}

pub fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

impl TransactionJson {
    pub fn from_pb(tx: &pb::Transaction) -> TransactionJson {
        let (payload, payload_base64) = payload_json(&tx.payload);
        TransactionJson {
            gid: tx.gid.clone(),
            protocol: pb::Protocol::try_from(tx.protocol)
                .map(wire::protocols::name)
                .unwrap_or_default()
                .to_string(),
            state: StateName::from_pb(tx.state)
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            created_at_ms: tx.created_at_ms,
            created_at: rfc3339(tx.created_at_ms),
            updated_at_ms: tx.updated_at_ms,
            deadline_ms: tx.deadline_ms,
            finished_at_ms: (tx.finished_at_ms != 0).then_some(tx.finished_at_ms),
            branches: tx
                .branches
                .iter()
                .map(|b| {
                    let (payload, payload_base64) = payload_json(&b.payload);
                    BranchJson {
                        branch_id: b.branch_id.clone(),
                        ops: b
                            .ops
                            .iter()
                            .map(|o| OpJson {
                                op: o.op.clone(),
                                endpoint: o.endpoint.clone(),
                                state: op_state_name(o.state).to_string(),
                                attempts: o.attempts,
                                last_error: o.last_error.clone(),
                                updated_at_ms: o.updated_at_ms,
                            })
                            .collect(),
                        payload,
                        payload_base64,
                        after: b.after.clone(),
                        retry: b.retry.as_ref().map(RetryJson::from_pb),
                    }
                })
                .collect(),
            payload,
            payload_base64,
            error: tx.error.clone(),
            decision: tx.decision.as_ref().map(|d| DecisionJson {
                outcome: match pb::Outcome::try_from(d.outcome) {
                    Ok(pb::Outcome::Commit) => "commit",
                    Ok(pb::Outcome::Abort) => "abort",
                    _ => "unknown",
                }
                .to_string(),
                term: d.term,
                index: d.index,
                decided_at_ms: d.decided_at_ms,
                reason: d.reason.clone(),
            }),
            heuristic_hazard: tx.heuristic_hazard,
            heuristic: tx.heuristic,
            stuck: tx.stuck,
            repairs: tx
                .repairs
                .iter()
                .map(|r| RepairJson {
                    action: r.action.clone(),
                    branch_id: r.branch_id.clone(),
                    reason: r.reason.clone(),
                    by: r.by.clone(),
                    at_ms: r.at_ms,
                    index: r.index,
                })
                .collect(),
        }
    }
}

/// Begin, SubmitSaga, PrepareMessage: the transaction, and whether this
/// request created it (false: a repeat, answered with what is there).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BegunJson {
    pub transaction: TransactionJson,
    pub created: bool,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TxJson {
    pub transaction: TransactionJson,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ListJson {
    pub transactions: Vec<TransactionJson>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// One server-sent event of a watch.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SseEvent {
    /// Always `transaction`.
    pub event: String,
    /// The transaction's version (the log index of its last change).
    pub id: String,
    /// A TransactionJson, as JSON text.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// An error, as RFC 9457 `application/problem+json`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:tandem:problem:<kind>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What was wrong, naming the transaction.
    pub detail: String,
    /// The transaction the request was about, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    /// A node that is not the leader names the leader's gRPC address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}
