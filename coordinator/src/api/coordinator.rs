//! `tandem.v1.Coordinator`: Begin, Get, List. Input is checked here, before
//! anything is proposed, so bad input leaves no trace in the log.

use tandem_proto::v1 as pb;
use tandem_proto::v1::coordinator_server::Coordinator;
use tonic::{Request, Response, Status};

use super::convert::{
    implemented_protocol_names, protocol_from_pb, protocol_names, state_from_pb, tx_to_pb,
};
use super::status::{from_node_error, from_rejection, invalid};
use crate::clock;
use crate::config::Limits;
use crate::replica::Replica;
use crate::replica::watch::TxWatch;
use std::sync::Arc;
use std::time::Duration;

use crate::model::command::{BranchSpec, SagaStepSpec};
use crate::model::types::{Op, Protocol, RetryPolicy, Transaction, TxOptions};
use crate::model::{Applied, Command, validate};
use crate::protocol;
use crate::state::ListFilter;

fn over(gid: &str, what: &str, value: u32, max: u32) -> Status {
    invalid(format!(
        "transaction {gid}: {what} {value} is over the limit {max}"
    ))
}

/// How long Commit/Abort with `wait` wait when the request says nothing, and
/// at most.
const WAIT_DEFAULT: Duration = Duration::from_secs(30);
const WAIT_MAX: Duration = Duration::from_secs(600);

/// Page size of List when the request gives none, and the most it may ask.
const LIST_LIMIT_DEFAULT: usize = 100;
const LIST_LIMIT_MAX: usize = 1000;
/// A List page stops growing beyond this many bytes.
const LIST_PAGE_BYTES_MAX: usize = 4 << 20;

pub struct CoordinatorService {
    node: Replica,
    limits: Limits,
}

impl CoordinatorService {
    pub fn new(node: Replica, limits: Limits) -> Self {
        CoordinatorService { node, limits }
    }

    /// Refuses a new transaction of footprint `bytes` over the per-transaction
    /// limit, or while the unfinished ones' count or footprint is at its
    /// limit.
    fn check_admission(&self, gid: &str, bytes: usize) -> Result<(), Status> {
        if bytes > self.limits.tx_bytes_max {
            return Err(invalid(format!(
                "transaction {gid}: it would take {bytes} bytes (payloads, ids, endpoints and {} per branch); \
                 the limit is {} (--tx-bytes-max)",
                validate::BRANCH_OVERHEAD_BYTES,
                self.limits.tx_bytes_max
            )));
        }
        let status = self.node.status();
        if status.active_txs >= self.limits.active_max {
            return Err(Status::resource_exhausted(format!(
                "transaction {gid}: the coordinator holds {} unfinished transactions, its limit; retry later",
                status.active_txs
            )));
        }
        if status.active_bytes + bytes > self.limits.active_bytes_max {
            return Err(Status::resource_exhausted(format!(
                "transaction {gid}: the unfinished transactions take {} bytes and this one {bytes}; \
                 the limit is {} (--active-bytes-max); retry later",
                status.active_bytes, self.limits.active_bytes_max
            )));
        }
        Ok(())
    }

    /// Proposes a command about one transaction and returns it afterwards.
    async fn update(&self, command: Command) -> Result<Arc<Transaction>, Status> {
        match self.node.propose(command).await.map_err(from_node_error)? {
            Ok(Applied::Updated { tx } | Applied::Begun { tx, .. }) => Ok(tx),
            Ok(other) => Err(Status::internal(format!("unexpected result: {other:?}"))),
            Err(rejection) => Err(from_rejection(rejection)),
        }
    }

    /// Waits (bounded) until `done` holds; returns the latest state either
    /// way. `watch` was taken before the proposal that returned `tx`.
    async fn wait(
        &self,
        watch: &TxWatch,
        tx: Arc<Transaction>,
        timeout_ms: u32,
        done: impl Fn(&Transaction) -> bool,
    ) -> Result<Arc<Transaction>, Status> {
        let timeout = match timeout_ms {
            0 => WAIT_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(WAIT_MAX),
        };
        let latest = watch
            .until(tx.clone(), timeout, done)
            .await
            .map_err(from_node_error)?;
        Ok(latest.unwrap_or(tx))
    }

    /// Fills in defaults and checks every option against its limit.
    fn resolve_options(
        &self,
        gid: &str,
        options: Option<pb::TxOptions>,
    ) -> Result<TxOptions, Status> {
        let l = &self.limits;
        let options = options.unwrap_or_default();
        let timeout_ms = match options.timeout_ms {
            0 => l.timeout_ms_default,
            v if v > l.timeout_ms_max => return Err(over(gid, "timeout_ms", v, l.timeout_ms_max)),
            v => v,
        };
        let branch_timeout_ms = match options.branch_timeout_ms {
            0 => l.branch_timeout_ms_default,
            v if v > l.branch_timeout_ms_max => {
                return Err(over(gid, "branch_timeout_ms", v, l.branch_timeout_ms_max));
            }
            v => v,
        };
        if options.concurrency as usize > validate::BRANCHES_HARD_MAX {
            return Err(over(
                gid,
                "concurrency",
                options.concurrency,
                validate::BRANCHES_HARD_MAX as u32,
            ));
        }
        Ok(TxOptions {
            timeout_ms,
            retry: self.resolve_retry(gid, "retry", options.retry, l.retry_default)?,
            branch_timeout_ms,
            concurrency: options.concurrency,
        })
    }

    /// Fills a retry policy's zeros from `default` and checks its limits.
    fn resolve_retry(
        &self,
        gid: &str,
        what: &str,
        retry: Option<pb::RetryPolicy>,
        default: RetryPolicy,
    ) -> Result<RetryPolicy, Status> {
        let l = &self.limits;
        let retry = retry.unwrap_or_default();
        let pick = |v: u32, default: u32| if v == 0 { default } else { v };
        let retry = RetryPolicy {
            initial_interval_ms: pick(retry.initial_interval_ms, default.initial_interval_ms),
            max_interval_ms: pick(retry.max_interval_ms, default.max_interval_ms),
            max_attempts: pick(retry.max_attempts, default.max_attempts),
        };
        if retry.max_interval_ms > l.retry_interval_ms_max {
            return Err(over(
                gid,
                &format!("{what}.max_interval_ms"),
                retry.max_interval_ms,
                l.retry_interval_ms_max,
            ));
        }
        if retry.initial_interval_ms > retry.max_interval_ms {
            return Err(invalid(format!(
                "transaction {gid}: {what}.initial_interval_ms {} is above {what}.max_interval_ms {}",
                retry.initial_interval_ms, retry.max_interval_ms
            )));
        }
        if retry.max_attempts > l.retry_attempts_max {
            return Err(over(
                gid,
                &format!("{what}.max_attempts"),
                retry.max_attempts,
                l.retry_attempts_max,
            ));
        }
        Ok(retry)
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let request = request.into_inner();
        validate::gid(&request.gid).map_err(|e| invalid(e.to_string()))?;
        let gid = request.gid;
        let protocol = protocol_from_pb(request.protocol)
            .map_err(|e| invalid(format!("transaction {gid}: {e}")))?
            .ok_or_else(|| {
                invalid(format!(
                    "transaction {gid}: protocol is required (one of {})",
                    protocol_names()
                ))
            })?;
        if !protocol::is_implemented(protocol) {
            return Err(Status::unimplemented(format!(
                "transaction {gid}: protocol {protocol} is not implemented by this coordinator yet; \
                 use one of {}",
                implemented_protocol_names()
            )));
        }
        validate::payload(&gid, &request.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        let options = self.resolve_options(&gid, request.options)?;
        self.node.ensure_leader().map_err(from_node_error)?;
        self.check_admission(
            &gid,
            validate::tx_footprint(gid.len(), request.payload.len(), 0),
        )?;
        let command = Command::Begin {
            gid,
            protocol,
            options,
            payload: request.payload.into(),
            now_ms: clock::now_ms(),
        };
        match self.node.propose(command).await.map_err(from_node_error)? {
            Ok(Applied::Begun { tx, created }) => Ok(Response::new(pb::BeginResponse {
                transaction: Some(tx_to_pb(&tx)),
                created,
            })),
            Ok(other) => Err(Status::internal(format!(
                "unexpected result of Begin: {other:?}"
            ))),
            Err(rejection) => Err(from_rejection(rejection)),
        }
    }

    async fn submit_saga(
        &self,
        request: Request<pb::SubmitSagaRequest>,
    ) -> Result<Response<pb::SubmitSagaResponse>, Status> {
        let request = request.into_inner();
        let gid = request.gid;
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        validate::payload(&gid, &request.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        let options = self.resolve_options(&gid, request.options)?;
        let mut steps = Vec::with_capacity(request.steps.len());
        for step in request.steps {
            validate::payload(&gid, &step.payload, self.limits.payload_bytes_max)
                .map_err(|e| invalid(format!("{e} (step {})", step.branch_id)))?;
            if !request.concurrent && !step.after.is_empty() {
                return Err(invalid(format!(
                    "transaction {gid}: step {} lists `after`, which only concurrent sagas may (set concurrent)",
                    step.branch_id
                )));
            }
            let retry = match step.retry {
                Some(r) => Some(self.resolve_retry(
                    &gid,
                    &format!("step {} retry", step.branch_id),
                    Some(r),
                    options.retry,
                )?),
                None => None,
            };
            let after = if request.concurrent {
                step.after
            } else {
                // Sequential: each step comes after the one before it.
                steps
                    .last()
                    .map(|prev: &SagaStepSpec| vec![prev.branch_id.clone()])
                    .unwrap_or_default()
            };
            steps.push(SagaStepSpec {
                branch_id: step.branch_id,
                action: step.action,
                compensate: step.compensate,
                payload: step.payload.into(),
                after,
                retry,
            });
        }
        protocol::saga::validate_steps(&gid, &steps).map_err(|e| invalid(e.to_string()))?;
        self.node.ensure_leader().map_err(from_node_error)?;
        let branches_bytes = steps
            .iter()
            .map(|s| {
                let text = s.branch_id.len()
                    + s.action.len()
                    + s.compensate.len()
                    + s.after.iter().map(String::len).sum::<usize>();
                validate::branch_footprint(text, s.payload.len())
            })
            .sum();
        self.check_admission(
            &gid,
            validate::tx_footprint(gid.len(), request.payload.len(), branches_bytes),
        )?;
        let watch = self.node.watch(&gid);
        let command = Command::SubmitSaga {
            gid,
            options,
            steps,
            payload: request.payload.into(),
            now_ms: clock::now_ms(),
        };
        let (tx, created) = match self.node.propose(command).await.map_err(from_node_error)? {
            Ok(Applied::Begun { tx, created }) => (tx, created),
            Ok(other) => return Err(Status::internal(format!("unexpected result: {other:?}"))),
            Err(rejection) => return Err(from_rejection(rejection)),
        };
        let tx = if request.wait {
            self.wait(&watch, tx, request.wait_timeout_ms, |t| {
                t.state.is_terminal()
            })
            .await?
        } else {
            tx
        };
        Ok(Response::new(pb::SubmitSagaResponse {
            transaction: Some(tx_to_pb(&tx)),
            created,
        }))
    }

    async fn register_branch(
        &self,
        request: Request<pb::RegisterBranchRequest>,
    ) -> Result<Response<pb::RegisterBranchResponse>, Status> {
        let request = request.into_inner();
        let gid = request.gid;
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        validate::branch_id(&gid, &request.branch_id).map_err(|e| invalid(e.to_string()))?;
        validate::payload(&gid, &request.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        let branch_id = request.branch_id;
        if request.ops.is_empty() {
            return Err(invalid(format!(
                "transaction {gid}: branch {branch_id} names no operations"
            )));
        }
        let mut ops: Vec<(Op, String)> = Vec::with_capacity(request.ops.len());
        for o in request.ops {
            let op = Op::from_name(&o.op).ok_or_else(|| {
                invalid(format!(
                    "transaction {gid}: branch {branch_id}: unknown operation {:?}; expected one of {}",
                    o.op,
                    Op::ALL.map(|op| op.name()).join(", ")
                ))
            })?;
            validate::endpoint(&gid, &o.endpoint).map_err(|e| invalid(e.to_string()))?;
            if ops.iter().any(|(existing, _)| *existing == op) {
                return Err(invalid(format!(
                    "transaction {gid}: branch {branch_id} names operation {op} twice"
                )));
            }
            ops.push((op, o.endpoint));
        }
        let text = branch_id.len() + ops.iter().map(|(_, e)| e.len()).sum::<usize>();
        let bytes = validate::branch_footprint(text, request.payload.len());
        if bytes > self.limits.tx_bytes_max {
            return Err(invalid(format!(
                "transaction {gid}: branch {branch_id} would take {bytes} bytes; the limit for a whole transaction is {} (--tx-bytes-max)",
                self.limits.tx_bytes_max
            )));
        }
        self.node.ensure_leader().map_err(from_node_error)?;
        let tx = self
            .update(Command::RegisterBranch {
                gid,
                branch: BranchSpec {
                    branch_id,
                    ops,
                    payload: request.payload.into(),
                },
                now_ms: clock::now_ms(),
            })
            .await?;
        Ok(Response::new(pb::RegisterBranchResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let request = request.into_inner();
        let started = std::time::Instant::now();
        tracing::debug!(gid = %request.gid, wait = request.wait, "commit requested");
        validate::gid(&request.gid).map_err(|e| invalid(e.to_string()))?;
        self.node.ensure_leader().map_err(from_node_error)?;
        let watch = self.node.watch(&request.gid);
        let tx = self
            .update(Command::Commit {
                gid: request.gid,
                now_ms: clock::now_ms(),
            })
            .await?;
        // The reply to a commit that took effect is lost on its way back.
        fail::fail_point!("api-commit-lose-reply", |_| Err(Status::unavailable(
            "reply lost on the way back (failpoint)"
        )));
        let tx = if request.wait {
            self.wait(&watch, tx, request.wait_timeout_ms, |t| {
                t.state.is_terminal()
            })
            .await?
        } else if tx.protocol == Protocol::TwoPc {
            // 2PC decides once the votes are in: answer with the decision.
            self.wait(&watch, tx, request.wait_timeout_ms, Transaction::is_decided)
                .await?
        } else {
            tx
        };
        tracing::debug!(gid = %tx.gid, state = %tx.state.name(), elapsed = ?started.elapsed(), "commit answered");
        Ok(Response::new(pb::CommitResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let request = request.into_inner();
        validate::gid(&request.gid).map_err(|e| invalid(e.to_string()))?;
        if request.reason.len() > validate::REASON_BYTES_MAX {
            return Err(invalid(format!(
                "transaction {}: reason is {} bytes; the limit is {}",
                request.gid,
                request.reason.len(),
                validate::REASON_BYTES_MAX
            )));
        }
        self.node.ensure_leader().map_err(from_node_error)?;
        let watch = self.node.watch(&request.gid);
        let tx = self
            .update(Command::Abort {
                gid: request.gid,
                reason: request.reason,
                now_ms: clock::now_ms(),
            })
            .await?;
        let tx = if request.wait {
            self.wait(&watch, tx, request.wait_timeout_ms, |t| {
                t.state.is_terminal()
            })
            .await?
        } else {
            tx
        };
        Ok(Response::new(pb::AbortResponse {
            transaction: Some(tx_to_pb(&tx)),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let gid = request.into_inner().gid;
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        let view = self.node.read().await.map_err(from_node_error)?;
        match view.get(&gid) {
            Some(tx) => Ok(Response::new(pb::GetResponse {
                transaction: Some(tx_to_pb(&tx)),
            })),
            None => Err(Status::not_found(format!("transaction {gid} not found"))),
        }
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let request = request.into_inner();
        let filter = ListFilter {
            state: state_from_pb(request.state).map_err(invalid)?,
            protocol: protocol_from_pb(request.protocol).map_err(invalid)?,
        };
        let limit = match request.limit as usize {
            0 => LIST_LIMIT_DEFAULT,
            n => n.min(LIST_LIMIT_MAX),
        };
        let token = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let view = self.node.read().await.map_err(from_node_error)?;
        let page = view.list(&filter, limit, token);
        // A page ends early once it is LIST_PAGE_BYTES_MAX large (always
        // with at least one transaction), so large transactions cannot
        // make one answer unbounded.
        let mut transactions = Vec::with_capacity(page.txs.len());
        let mut bytes = 0;
        let mut next_page_token = page.next_page_token.unwrap_or_default();
        for tx in &page.txs {
            if bytes >= LIST_PAGE_BYTES_MAX {
                next_page_token = transactions
                    .last()
                    .map(|t: &pb::Transaction| t.gid.clone())
                    .unwrap_or_default();
                break;
            }
            let tx = tx_to_pb(tx);
            bytes += prost::Message::encoded_len(&tx);
            transactions.push(tx);
        }
        Ok(Response::new(pb::ListResponse {
            transactions,
            next_page_token,
        }))
    }
}
