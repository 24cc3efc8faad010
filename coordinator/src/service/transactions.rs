//! Operations on transactions — begin, register, commit, abort, submit a
//! saga, get, list, wait — on domain types. Input is checked here, before
//! anything is proposed, so bad input leaves no trace in the log.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Result, ServiceError, invalid};
use crate::clock::Clock;
use crate::config::Limits;
use crate::model::command::{BranchSpec, SagaStepSpec};
use crate::model::{
    Applied, Command, Op, Protocol, RetryPolicy, Transaction, TxOptions, TxState, validate,
};
use crate::protocol;
use crate::replica::Replica;
use crate::replica::watch::TxWatch;
use crate::state::ListFilter;

/// How long Commit/Abort/SubmitSaga wait when asked to and given no time,
/// and at most.
pub const WAIT_DEFAULT: Duration = Duration::from_secs(30);
pub const WAIT_MAX: Duration = Duration::from_secs(600);
/// Page size of List when none is asked, and the most one may ask.
pub const LIST_LIMIT_DEFAULT: usize = 100;
pub const LIST_LIMIT_MAX: usize = 1000;
/// A List page stops growing beyond this many bytes of footprint.
pub const LIST_PAGE_BYTES_MAX: usize = 4 << 20;

fn over(gid: &str, what: &str, value: u32, max: u32) -> ServiceError {
    invalid(format!(
        "transaction {gid}: {what} {value} is over the limit {max}"
    ))
}

/// A retry policy as asked for: zeros mean "the default".
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryInput {
    pub initial_interval_ms: u32,
    pub max_interval_ms: u32,
    pub max_attempts: u32,
}

/// Transaction options as asked for: zeros mean "the default".
#[derive(Clone, Copy, Debug, Default)]
pub struct OptionsInput {
    pub timeout_ms: u32,
    pub retry: Option<RetryInput>,
    pub branch_timeout_ms: u32,
    pub concurrency: u32,
}

pub struct BeginInput {
    pub gid: String,
    /// Required; `None` is refused with the protocols to choose from.
    pub protocol: Option<Protocol>,
    pub options: OptionsInput,
    pub payload: Bytes,
}

pub struct StepInput {
    pub branch_id: String,
    pub action: String,
    pub compensate: String,
    pub payload: Bytes,
    pub after: Vec<String>,
    pub retry: Option<RetryInput>,
}

pub struct SagaInput {
    pub gid: String,
    pub options: OptionsInput,
    pub steps: Vec<StepInput>,
    pub payload: Bytes,
    /// Steps run as their `after` lists allow; otherwise one after another.
    pub concurrent: bool,
    /// Answer once the saga ended (or this long passed).
    pub wait: Option<Duration>,
}

pub struct RegisterInput {
    pub gid: String,
    pub branch_id: String,
    /// (operation name, endpoint)
    pub ops: Vec<(String, String)>,
    pub payload: Bytes,
}

pub struct ListInput {
    pub state: Option<TxState>,
    pub protocol: Option<Protocol>,
    pub limit: usize,
    pub page_token: Option<String>,
}

pub struct Page {
    pub txs: Vec<Arc<Transaction>>,
    pub next_page_token: Option<String>,
}

/// A wait's length as asked: zero for the default, capped at the maximum.
pub fn wait_timeout(timeout_ms: u32) -> Duration {
    match timeout_ms {
        0 => WAIT_DEFAULT,
        ms => Duration::from_millis(u64::from(ms)).min(WAIT_MAX),
    }
}

/// The client operations on transactions.
#[derive(Clone)]
pub struct Transactions {
    replica: Replica,
    limits: Limits,
    clock: Arc<dyn Clock>,
}

impl Transactions {
    pub fn new(replica: Replica, limits: Limits, clock: Arc<dyn Clock>) -> Transactions {
        Transactions {
            replica,
            limits,
            clock,
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Starts a transaction; `(tx, created)`. Idempotent per gid and protocol.
    pub async fn begin(&self, input: BeginInput) -> Result<(Arc<Transaction>, bool)> {
        let gid = input.gid;
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        let protocol = input.protocol.ok_or_else(|| {
            invalid(format!(
                "transaction {gid}: protocol is required (one of {})",
                Protocol::names()
            ))
        })?;
        if !protocol::is_implemented(protocol) {
            return Err(ServiceError::Unimplemented(format!(
                "transaction {gid}: protocol {protocol} is not implemented by this coordinator yet; use one of {}",
                implemented_protocol_names()
            )));
        }
        validate::payload(&gid, &input.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        let options = self.resolve_options(&gid, input.options)?;
        self.replica.ensure_leader()?;
        self.check_admission(
            &gid,
            validate::tx_footprint(gid.len(), input.payload.len(), 0),
        )?;
        let command = Command::Begin {
            gid,
            protocol,
            options,
            payload: input.payload,
            now_ms: self.clock.now_ms(),
        };
        match self.replica.propose(command).await?? {
            Applied::Begun { tx, created } => Ok((tx, created)),
            other => Err(ServiceError::Internal(format!(
                "unexpected result of Begin: {other:?}"
            ))),
        }
    }

    /// Submits a whole saga; `(tx, created)`. Idempotent per gid and steps.
    pub async fn submit_saga(&self, input: SagaInput) -> Result<(Arc<Transaction>, bool)> {
        let gid = input.gid;
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        validate::payload(&gid, &input.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        let options = self.resolve_options(&gid, input.options)?;
        let mut steps: Vec<SagaStepSpec> = Vec::with_capacity(input.steps.len());
        for step in input.steps {
            validate::payload(&gid, &step.payload, self.limits.payload_bytes_max)
                .map_err(|e| invalid(format!("{e} (step {})", step.branch_id)))?;
            if !input.concurrent && !step.after.is_empty() {
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
            let after = if input.concurrent {
                step.after
            } else {
                // Sequential: each step comes after the one before it.
                steps
                    .last()
                    .map(|prev| vec![prev.branch_id.clone()])
                    .unwrap_or_default()
            };
            steps.push(SagaStepSpec {
                branch_id: step.branch_id,
                action: step.action,
                compensate: step.compensate,
                payload: step.payload,
                after,
                retry,
            });
        }
        protocol::saga::validate_steps(&gid, &steps).map_err(|e| invalid(e.to_string()))?;
        self.replica.ensure_leader()?;
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
            validate::tx_footprint(gid.len(), input.payload.len(), branches_bytes),
        )?;
        let watch = self.replica.watch(&gid);
        let command = Command::SubmitSaga {
            gid,
            options,
            steps,
            payload: input.payload,
            now_ms: self.clock.now_ms(),
        };
        let (tx, created) = match self.replica.propose(command).await?? {
            Applied::Begun { tx, created } => (tx, created),
            other => {
                return Err(ServiceError::Internal(format!(
                    "unexpected result of SubmitSaga: {other:?}"
                )));
            }
        };
        let tx = match input.wait {
            Some(timeout) => wait_until(&watch, tx, timeout, |t| t.state.is_terminal()).await?,
            None => tx,
        };
        Ok((tx, created))
    }

    /// Enlists a branch. Idempotent per gid, branch and spec.
    pub async fn register(&self, input: RegisterInput) -> Result<Arc<Transaction>> {
        let (gid, branch_id) = (input.gid, input.branch_id);
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        validate::branch_id(&gid, &branch_id).map_err(|e| invalid(e.to_string()))?;
        validate::payload(&gid, &input.payload, self.limits.payload_bytes_max)
            .map_err(|e| invalid(e.to_string()))?;
        if input.ops.is_empty() {
            return Err(invalid(format!(
                "transaction {gid}: branch {branch_id} names no operations"
            )));
        }
        let mut ops: Vec<(Op, String)> = Vec::with_capacity(input.ops.len());
        for (name, endpoint) in input.ops {
            let op = Op::from_name(&name).ok_or_else(|| {
                invalid(format!(
                    "transaction {gid}: branch {branch_id}: unknown operation {name:?}; expected one of {}",
                    Op::ALL.map(|op| op.name()).join(", ")
                ))
            })?;
            validate::endpoint(&gid, &endpoint).map_err(|e| invalid(e.to_string()))?;
            if ops.iter().any(|(existing, _)| *existing == op) {
                return Err(invalid(format!(
                    "transaction {gid}: branch {branch_id} names operation {op} twice"
                )));
            }
            ops.push((op, endpoint));
        }
        let text = branch_id.len() + ops.iter().map(|(_, e)| e.len()).sum::<usize>();
        let bytes = validate::branch_footprint(text, input.payload.len());
        if bytes > self.limits.tx_bytes_max {
            return Err(invalid(format!(
                "transaction {gid}: branch {branch_id} would take {bytes} bytes; the limit for a whole transaction is {} (--tx-bytes-max)",
                self.limits.tx_bytes_max
            )));
        }
        self.replica.ensure_leader()?;
        self.update(Command::RegisterBranch {
            gid,
            branch: BranchSpec {
                branch_id,
                ops,
                payload: input.payload,
            },
            now_ms: self.clock.now_ms(),
        })
        .await
    }

    /// Asks to commit. With `wait`, answers once the transaction ended (or
    /// `timeout` passed); a 2PC commit answers at least with the decision
    /// (the votes decide it), within `timeout`.
    pub async fn commit(
        &self,
        gid: String,
        wait: bool,
        timeout: Duration,
    ) -> Result<Arc<Transaction>> {
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        self.replica.ensure_leader()?;
        let watch = self.replica.watch(&gid);
        let tx = self
            .update(Command::Commit {
                gid,
                now_ms: self.clock.now_ms(),
            })
            .await?;
        // The reply to a commit that took effect is lost on its way back.
        fail::fail_point!("api-commit-lose-reply", |_| Err(ServiceError::Node(
            crate::raft::NodeError::Unknown
        )));
        if wait {
            wait_until(&watch, tx, timeout, |t| t.state.is_terminal()).await
        } else if tx.protocol == Protocol::TwoPc {
            wait_until(&watch, tx, timeout, Transaction::is_decided).await
        } else {
            Ok(tx)
        }
    }

    /// Asks to abort an undecided transaction.
    pub async fn abort(
        &self,
        gid: String,
        reason: String,
        wait: Option<Duration>,
    ) -> Result<Arc<Transaction>> {
        validate::gid(&gid).map_err(|e| invalid(e.to_string()))?;
        if reason.len() > validate::REASON_BYTES_MAX {
            return Err(invalid(format!(
                "transaction {gid}: reason is {} bytes; the limit is {}",
                reason.len(),
                validate::REASON_BYTES_MAX
            )));
        }
        self.replica.ensure_leader()?;
        let watch = self.replica.watch(&gid);
        let tx = self
            .update(Command::Abort {
                gid,
                reason,
                now_ms: self.clock.now_ms(),
            })
            .await?;
        match wait {
            Some(timeout) => wait_until(&watch, tx, timeout, |t| t.state.is_terminal()).await,
            None => Ok(tx),
        }
    }

    /// A transaction as of a linearizable read.
    pub async fn get(&self, gid: &str) -> Result<Arc<Transaction>> {
        validate::gid(gid).map_err(|e| invalid(e.to_string()))?;
        let view = self.replica.read().await?;
        view.get(gid).ok_or_else(|| ServiceError::NotFound {
            gid: gid.to_string(),
        })
    }

    /// A page of transactions in gid order, as of a linearizable read.
    pub async fn list(&self, input: ListInput) -> Result<Page> {
        let limit = match input.limit {
            0 => LIST_LIMIT_DEFAULT,
            n => n.min(LIST_LIMIT_MAX),
        };
        let filter = ListFilter {
            state: input.state,
            protocol: input.protocol,
        };
        let view = self.replica.read().await?;
        let page = view.list(&filter, limit, input.page_token.as_deref());
        // A page ends early once it is LIST_PAGE_BYTES_MAX large (always with
        // at least one transaction), so large transactions cannot make one
        // answer unbounded.
        let mut txs = Vec::with_capacity(page.txs.len());
        let mut bytes = 0;
        let mut next_page_token = page.next_page_token;
        for tx in page.txs {
            if bytes >= LIST_PAGE_BYTES_MAX {
                next_page_token = txs.last().map(|t: &Arc<Transaction>| t.gid.clone());
                break;
            }
            bytes += tx.footprint_bytes();
            txs.push(tx);
        }
        Ok(Page {
            txs,
            next_page_token,
        })
    }

    /// Proposes a command about one transaction; the transaction after it.
    async fn update(&self, command: Command) -> Result<Arc<Transaction>> {
        match self.replica.propose(command).await?? {
            Applied::Updated { tx } | Applied::Begun { tx, .. } => Ok(tx),
            other => Err(ServiceError::Internal(format!(
                "unexpected result: {other:?}"
            ))),
        }
    }

    /// Refuses a new transaction of footprint `bytes` over the
    /// per-transaction limit, or while the unfinished ones' count or
    /// footprint is at its limit.
    fn check_admission(&self, gid: &str, bytes: usize) -> Result<()> {
        if bytes > self.limits.tx_bytes_max {
            return Err(invalid(format!(
                "transaction {gid}: it would take {bytes} bytes (payloads, ids, endpoints and {} per branch); \
                 the limit is {} (--tx-bytes-max)",
                validate::BRANCH_OVERHEAD_BYTES,
                self.limits.tx_bytes_max
            )));
        }
        let status = self.replica.status();
        if status.active_txs >= self.limits.active_max {
            return Err(ServiceError::Exhausted(format!(
                "transaction {gid}: the coordinator holds {} unfinished transactions, its limit; retry later",
                status.active_txs
            )));
        }
        if status.active_bytes + bytes > self.limits.active_bytes_max {
            return Err(ServiceError::Exhausted(format!(
                "transaction {gid}: the unfinished transactions take {} bytes and this one {bytes}; \
                 the limit is {} (--active-bytes-max); retry later",
                status.active_bytes, self.limits.active_bytes_max
            )));
        }
        Ok(())
    }

    /// Fills in defaults and checks every option against its limit.
    fn resolve_options(&self, gid: &str, options: OptionsInput) -> Result<TxOptions> {
        let l = &self.limits;
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
        retry: Option<RetryInput>,
        default: RetryPolicy,
    ) -> Result<RetryPolicy> {
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

/// Waits (bounded) until `done` holds; the latest state either way. `watch`
/// was taken before the proposal that returned `tx`.
async fn wait_until(
    watch: &TxWatch,
    tx: Arc<Transaction>,
    timeout: Duration,
    done: impl Fn(&Transaction) -> bool,
) -> Result<Arc<Transaction>> {
    let latest = watch.until(tx.clone(), timeout, done).await?;
    Ok(latest.unwrap_or(tx))
}

/// The protocols Begin accepts.
pub fn implemented_protocol_names() -> String {
    Protocol::ALL
        .into_iter()
        .filter(|p| protocol::is_implemented(*p))
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}
