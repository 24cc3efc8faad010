//! Operations on transactions — begin, register, commit, abort, submit a
//! saga, get, list, wait — on domain types. Input is checked here, before
//! anything is proposed, so bad input leaves no trace in the log.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::checks::{self, Proposal};
use super::{Result, ServiceError, invalid};
use crate::clock::Clock;
use crate::config::Limits;
use crate::model::command::DestinationSpec;
use crate::model::types::RepairAction;
use crate::model::{Applied, Command, Protocol, Transaction, TxState, validate};
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

#[derive(Clone, Debug)]
pub struct BeginInput {
    /// W3C trace context the transaction's work continues (ignored unless
    /// well formed).
    pub trace_parent: Option<String>,
    pub gid: String,
    /// Required; `None` is refused with the protocols to choose from.
    pub protocol: Option<Protocol>,
    pub options: OptionsInput,
    pub payload: Bytes,
}

#[derive(Clone, Debug)]
pub struct StepInput {
    pub branch_id: String,
    pub action: String,
    pub compensate: String,
    pub payload: Bytes,
    pub after: Vec<String>,
    pub retry: Option<RetryInput>,
}

#[derive(Clone, Debug)]
pub struct SagaInput {
    /// W3C trace context the transaction's work continues (ignored unless
    /// well formed).
    pub trace_parent: Option<String>,
    pub gid: String,
    pub options: OptionsInput,
    pub steps: Vec<StepInput>,
    pub payload: Bytes,
    /// Steps run as their `after` lists allow; otherwise one after another.
    pub concurrent: bool,
    /// Answer once the saga ended (or this long passed).
    pub wait: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct MessageInput {
    /// W3C trace context the transaction's work continues (ignored unless
    /// well formed).
    pub trace_parent: Option<String>,
    pub gid: String,
    pub options: OptionsInput,
    /// The producer's check-back endpoint.
    pub check_back: String,
    pub destinations: Vec<DestinationSpec>,
    pub payload: Bytes,
}

#[derive(Clone, Debug)]
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
    /// Changed at or after this time (ms since the epoch).
    pub updated_since_ms: Option<i64>,
    /// Only stuck ones ([`crate::state::machine::STUCK_ATTEMPTS`]).
    pub stuck: bool,
}

/// An operator's repair as asked for.
pub struct RepairInput {
    pub gid: String,
    /// Empty: every branch it fits.
    pub branch_id: String,
    pub reason: String,
    pub by: String,
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
    pub async fn begin(&self, mut input: BeginInput) -> Result<(Arc<Transaction>, bool)> {
        let trace = input.trace_parent.take();
        let proposal = checks::begin(&self.limits, input, self.clock.now_ms())?;
        self.replica.ensure_leader()?;
        self.check_admission(&proposal)?;
        match self
            .replica
            .propose(traced(proposal.command, trace))
            .await??
        {
            Applied::Begun { tx, created } => Ok((tx, created)),
            other => Err(ServiceError::Internal(format!(
                "unexpected result of Begin: {other:?}"
            ))),
        }
    }

    /// Submits a whole saga; `(tx, created)`. Idempotent per gid and steps.
    pub async fn submit_saga(&self, mut input: SagaInput) -> Result<(Arc<Transaction>, bool)> {
        let wait = input.wait;
        let trace = input.trace_parent.take();
        let proposal = checks::saga(&self.limits, input, self.clock.now_ms())?;
        self.replica.ensure_leader()?;
        self.check_admission(&proposal)?;
        let watch = self.replica.watch(proposal.gid());
        let (tx, created) = match self
            .replica
            .propose(traced(proposal.command, trace))
            .await??
        {
            Applied::Begun { tx, created } => (tx, created),
            other => {
                return Err(ServiceError::Internal(format!(
                    "unexpected result of SubmitSaga: {other:?}"
                )));
            }
        };
        let tx = match wait {
            Some(timeout) => wait_until(&watch, tx, timeout, |t| t.state.is_terminal()).await?,
            None => tx,
        };
        Ok((tx, created))
    }

    /// Prepares a transactional message; `(tx, created)`. Idempotent per
    /// gid and spec. Nothing is delivered before Submit (or the check-back)
    /// decides.
    pub async fn prepare_message(
        &self,
        mut input: MessageInput,
    ) -> Result<(Arc<Transaction>, bool)> {
        let trace = input.trace_parent.take();
        let proposal = checks::message(&self.limits, input, self.clock.now_ms())?;
        self.replica.ensure_leader()?;
        self.check_admission(&proposal)?;
        match self
            .replica
            .propose(traced(proposal.command, trace))
            .await??
        {
            Applied::Begun { tx, created } => Ok((tx, created)),
            other => Err(ServiceError::Internal(format!(
                "unexpected result of PrepareMessage: {other:?}"
            ))),
        }
    }

    /// Enlists a branch. Idempotent per gid, branch and spec.
    pub async fn register(&self, input: RegisterInput) -> Result<Arc<Transaction>> {
        let command = checks::register(&self.limits, input, self.clock.now_ms())?;
        self.replica.ensure_leader()?;
        self.update(command).await
    }

    /// Asks to commit. With `wait`, answers once the transaction ended (or
    /// `timeout` passed); a 2PC or 3PC commit answers at least with the
    /// decision (the votes decide it), within `timeout`.
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
        } else if matches!(tx.protocol, Protocol::TwoPc | Protocol::ThreePc) {
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
        checks::abort(&gid, &reason)?;
        self.replica.ensure_leader()?;
        let watch = self.replica.watch(&gid);
        let tx = self
            .update(Command::AbortV2 {
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

    /// The termination protocol's question (a participant in doubt): the
    /// transaction as of a linearizable read — and if it is undecided and
    /// its deadline has passed on this leader's clock, a Timeout is
    /// proposed first, so the question itself brings the decision (abort)
    /// instead of waiting for the driver's next look.
    pub async fn resolve(&self, gid: &str) -> Result<Arc<Transaction>> {
        let tx = self.get(gid).await?;
        let now_ms = self.clock.now_ms();
        if tx.is_decided() || now_ms < tx.deadline_ms {
            return Ok(tx);
        }
        self.replica.ensure_leader()?;
        self.update(Command::TimeoutV2 {
            gid: gid.to_string(),
            now_ms,
        })
        .await
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
            updated_since_ms: input.updated_since_ms,
            stuck: input.stuck,
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

    /// Repair: the open ops of one branch (or every one) are called now
    /// instead of after their backoff; an audit record says who and why.
    pub async fn retry(&self, input: RepairInput) -> Result<Arc<Transaction>> {
        self.repair(RepairAction::Retry, input).await
    }

    /// Repair: open phase-two ops are marked done by hand (a heuristic
    /// outcome), with an audit record.
    pub async fn resolve_by_hand(&self, input: RepairInput) -> Result<Arc<Transaction>> {
        self.repair(RepairAction::Resolve, input).await
    }

    async fn repair(&self, action: RepairAction, input: RepairInput) -> Result<Arc<Transaction>> {
        checks::repair(
            &input.gid,
            &input.branch_id,
            &input.reason,
            &input.by,
            action == RepairAction::Resolve,
        )?;
        self.replica.ensure_leader()?;
        self.update(Command::Repair {
            gid: input.gid,
            action,
            branch_id: (!input.branch_id.is_empty()).then_some(input.branch_id),
            reason: input.reason,
            by: input.by,
            now_ms: self.clock.now_ms(),
        })
        .await
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

    /// Refuses a new transaction while the unfinished ones' count or
    /// footprint is at its limit.
    fn check_admission(&self, proposal: &Proposal) -> Result<()> {
        let (gid, bytes) = (proposal.gid(), proposal.footprint_bytes);
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
}

/// The command, with the trace context it came with if that is well formed.
fn traced(command: Command, trace_parent: Option<String>) -> Command {
    match trace_parent
        .as_deref()
        .and_then(crate::telemetry::valid_traceparent)
    {
        Some(trace_parent) => Command::Traced {
            trace_parent: trace_parent.to_string(),
            command: Box::new(command),
        },
        None => command,
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
