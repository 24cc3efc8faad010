//! The replicated data: transactions, their branches and decisions. Plain data,
//! serialized into log entries and snapshots; no behaviour beyond small queries.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A payload: immutable and shared. Every version of a transaction, every
/// call and every read view points at the same bytes; none copies them.
pub type Payload = bytes::Bytes;

/// The protocol a global transaction follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Saga,
    Tcc,
    Xa,
    TwoPc,
    ThreePc,
    Msg,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [
        Protocol::Saga,
        Protocol::Tcc,
        Protocol::Xa,
        Protocol::TwoPc,
        Protocol::ThreePc,
        Protocol::Msg,
    ];

    /// Every protocol's name, for messages that list the choices.
    pub fn names() -> String {
        Protocol::ALL.map(|p| p.name()).join(", ")
    }

    /// The name used by the CLI and in messages.
    pub fn name(self) -> &'static str {
        use tandem_proto::wire::protocols;
        match self {
            Protocol::Saga => protocols::SAGA,
            Protocol::Tcc => protocols::TCC,
            Protocol::Xa => protocols::XA,
            Protocol::TwoPc => protocols::TWO_PC,
            Protocol::ThreePc => protocols::THREE_PC,
            Protocol::Msg => protocols::MSG,
        }
    }

    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a transaction is in its life. `Committed` and `Aborted` are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TxState {
    /// Phase one: branches register, saga actions run forward.
    Active,
    /// 2PC/3PC: collecting votes.
    Preparing,
    /// Decided to commit; phase two under way.
    Committing,
    /// Decided to abort; phase two under way.
    Aborting,
    Committed,
    Aborted,
    /// 3PC: every branch voted yes, pre-commits under way — still
    /// undecided (last in the enum: the log's encoding of the others stays).
    PreCommitting,
}

impl TxState {
    pub const ALL: [TxState; 7] = [
        TxState::Active,
        TxState::Preparing,
        TxState::PreCommitting,
        TxState::Committing,
        TxState::Aborting,
        TxState::Committed,
        TxState::Aborted,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, TxState::Committed | TxState::Aborted)
    }

    pub fn name(self) -> &'static str {
        match self {
            TxState::Active => "active",
            TxState::Preparing => "preparing",
            TxState::PreCommitting => "pre_committing",
            TxState::Committing => "committing",
            TxState::Aborting => "aborting",
            TxState::Committed => "committed",
            TxState::Aborted => "aborted",
        }
    }

    pub fn from_name(name: &str) -> Option<TxState> {
        TxState::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for TxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Commit,
    Abort,
}

/// Exponential backoff with jitter for transient branch failures. Stored
/// resolved (defaults filled in by the leader) so `apply` never reads config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub initial_interval_ms: u32,
    pub max_interval_ms: u32,
    pub max_attempts: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxOptions {
    pub timeout_ms: u32,
    pub retry: RetryPolicy,
    pub branch_timeout_ms: u32,
    /// Saga: steps in flight at most (0: no limit).
    pub concurrency: u32,
}

/// The commit point: the entry that recorded the outcome. `(term, index)` is
/// the fencing token every phase-two call carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub term: u64,
    pub index: u64,
    pub decided_at_ms: i64,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    Pending,
    Succeeded,
    /// A business "no" in phase one (vote no, try failed, action rejected);
    /// never retried.
    Failed,
    /// Not needed any more (the compensation of an action that never ran).
    Skipped,
    /// Phase two refused by a participant that voted yes (or whose action
    /// ran): a heuristic hazard. Still retried with backoff until it is
    /// acknowledged, and shown by Get.
    Refused,
    /// Phase two marked done by an operator (`tandem tx resolve`), not by
    /// the participant: a heuristic outcome, shown as such everywhere. The
    /// coordinator no longer calls it. (Appended: the log keeps old variants.)
    Resolved,
}

impl OpState {
    /// Still to be done: the driver calls (and retries) open ops.
    pub fn is_open(self) -> bool {
        matches!(self, OpState::Pending | OpState::Refused)
    }

    /// Counts as done in phase two: acknowledged by the participant, not
    /// needed, or resolved by an operator.
    pub fn is_closed_in_phase_two(self) -> bool {
        matches!(
            self,
            OpState::Succeeded | OpState::Skipped | OpState::Resolved
        )
    }
}

/// What an operator did to a transaction by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepairAction {
    /// Call the open ops now instead of after their backoff.
    Retry,
    /// Mark open phase-two ops done without their participant
    /// ([`OpState::Resolved`]).
    Resolve,
}

impl RepairAction {
    pub fn name(self) -> &'static str {
        match self {
            RepairAction::Retry => "retry",
            RepairAction::Resolve => "resolve",
        }
    }
}

/// The audit record of one repair, kept in the transaction's history:
/// what, on which branch, why, by whom, when, and in which log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    pub action: RepairAction,
    /// Empty: every branch the action applied to.
    pub branch_id: String,
    pub reason: String,
    pub by: String,
    pub at_ms: i64,
    pub index: u64,
}

/// An operation a participant can be asked to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    Prepare,
    Commit,
    Rollback,
    Try,
    Confirm,
    Cancel,
    Action,
    Compensate,
    CanCommit,
    PreCommit,
    DoCommit,
    Abort,
    /// Messages: the check-back (did the local transaction commit?).
    QueryPrepared,
    /// Messages: to one destination.
    Deliver,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::Prepare,
        Op::Commit,
        Op::Rollback,
        Op::Try,
        Op::Confirm,
        Op::Cancel,
        Op::Action,
        Op::Compensate,
        Op::CanCommit,
        Op::PreCommit,
        Op::DoCommit,
        Op::Abort,
        Op::QueryPrepared,
        Op::Deliver,
    ];

    /// The name on the wire (gRPC field, HTTP header, URL path segment).
    pub fn name(self) -> &'static str {
        use tandem_proto::wire::ops;
        match self {
            Op::Prepare => ops::PREPARE,
            Op::Commit => ops::COMMIT,
            Op::Rollback => ops::ROLLBACK,
            Op::Try => ops::TRY,
            Op::Confirm => ops::CONFIRM,
            Op::Cancel => ops::CANCEL,
            Op::Action => ops::ACTION,
            Op::Compensate => ops::COMPENSATE,
            Op::CanCommit => ops::CAN_COMMIT,
            Op::PreCommit => ops::PRE_COMMIT,
            Op::DoCommit => ops::DO_COMMIT,
            Op::Abort => ops::ABORT,
            Op::QueryPrepared => ops::QUERY_PREPARED,
            Op::Deliver => ops::DELIVER,
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation of a branch with the endpoint that serves it and its progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchOp {
    pub op: Op,
    pub endpoint: String,
    pub state: OpState,
    pub attempts: u32,
    pub last_error: String,
    pub updated_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub branch_id: String,
    pub ops: Vec<BranchOp>,
    pub payload: Payload,
    /// Saga DAG: branch ids whose action must succeed before this one runs.
    pub after: Vec<String>,
    /// This branch's own retry policy (saga steps may set one).
    pub retry: Option<RetryPolicy>,
}

impl Branch {
    /// The texts it was registered with: its id, its ops' endpoints and the
    /// ids it comes after.
    pub fn text_bytes(&self) -> usize {
        self.branch_id.len()
            + self.ops.iter().map(|o| o.endpoint.len()).sum::<usize>()
            + self.after.iter().map(String::len).sum::<usize>()
    }

    pub fn op(&self, op: Op) -> Option<&BranchOp> {
        self.ops.iter().find(|o| o.op == op)
    }

    pub fn op_mut(&mut self, op: Op) -> Option<&mut BranchOp> {
        self.ops.iter_mut().find(|o| o.op == op)
    }
}

/// The fencing token every call carries (defined once, with the SDK).
pub use tandem_proto::wire::Fence;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub gid: String,
    pub protocol: Protocol,
    pub state: TxState,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// When an undecided transaction is aborted.
    pub deadline_ms: i64,
    /// Set when the transaction becomes terminal; the retention clock for Gc.
    pub finished_at_ms: Option<i64>,
    pub options: TxOptions,
    /// Each branch behind its own `Arc`: a new version of the transaction
    /// (one per applied change) copies pointers, and only the branch that
    /// changed is copied (`Arc::make_mut`).
    pub branches: Vec<Arc<Branch>>,
    pub payload: Payload,
    /// Why the transaction aborted: a branch's business error, a timeout, an abort.
    pub error: String,
    pub decision: Option<Decision>,
    /// The entry that started the current phase (the decision's entry once
    /// decided): the fencing token of every call the phase makes.
    pub fence: Fence,
    /// Log index of the last entry that changed this transaction.
    pub version: u64,
    /// The application asked to commit. A repeated Commit then answers with
    /// whatever that request led to — even an abort after a no vote — rather
    /// than an error; only a Commit after the application's own Abort is a
    /// contradiction.
    pub commit_requested: bool,
    /// Operators' repairs, oldest first; at most `validate::REPAIRS_MAX`
    /// (the oldest retries give way first).
    pub repairs: Vec<Repair>,
    /// W3C `traceparent` its work continues (the coordinator's span for
    /// the request that began it, or the client's context); empty: none.
    pub trace_parent: String,
}

impl Transaction {
    pub fn branch(&self, branch_id: &str) -> Option<&Branch> {
        self.branches
            .iter()
            .find(|b| b.branch_id == branch_id)
            .map(|b| b.as_ref())
    }

    /// What this transaction may take in memory at most: its payloads, ids
    /// and endpoints, plus fixed costs that cover every text it may record
    /// later (errors are cut to `ERROR_BYTES_MAX`). Fixed once the
    /// transaction has its branches, so the budgets in `validate` bound it.
    pub fn footprint_bytes(&self) -> usize {
        use super::validate::{branch_footprint, tx_footprint};
        let branches: usize = self
            .branches
            .iter()
            .map(|b| branch_footprint(b.text_bytes(), b.payload.len()))
            .sum();
        tx_footprint(self.gid.len(), self.payload.len(), branches)
    }

    /// What a finished transaction is charged against
    /// `--finished-bytes-max`: the texts it did record (it records no more;
    /// an operator's repair changes the charge, and the table re-counts it
    /// on every change) plus fixed costs for its structs, set to cover what
    /// a node was measured to hold per finished transaction, the log's and
    /// the allocator's share included (BENCHMARKS.md: 1.8 KiB for a
    /// two-step saga, charged ~2.2 KiB here against ~7 KiB of footprint).
    pub fn retained_bytes(&self) -> usize {
        use super::validate::{RETAINED_BRANCH_BYTES, RETAINED_REPAIR_BYTES, RETAINED_TX_BYTES};
        let branches: usize = self
            .branches
            .iter()
            .map(|b| {
                let errors: usize = b.ops.iter().map(|o| o.last_error.len()).sum();
                RETAINED_BRANCH_BYTES + b.text_bytes() + b.payload.len() + errors
            })
            .sum();
        let repairs: usize = self
            .repairs
            .iter()
            .map(|r| RETAINED_REPAIR_BYTES + r.branch_id.len() + r.reason.len() + r.by.len())
            .sum();
        let texts = self.gid.len()
            + self.payload.len()
            + self.error.len()
            + self.trace_parent.len()
            + self.decision.as_ref().map_or(0, |d| d.reason.len());
        RETAINED_TX_BYTES + texts + branches + repairs
    }

    /// A branch to change: copied first if an older version shares it.
    pub fn branch_mut(&mut self, branch_id: &str) -> Option<&mut Branch> {
        self.branches
            .iter_mut()
            .find(|b| b.branch_id == branch_id)
            .map(Arc::make_mut)
    }

    pub fn is_decided(&self) -> bool {
        self.decision.is_some()
    }

    /// An op was resolved by an operator rather than by its participant.
    pub fn is_heuristic(&self) -> bool {
        self.branches
            .iter()
            .flat_map(|b| &b.ops)
            .any(|o| o.state == OpState::Resolved)
    }

    /// The retry policy of a branch: its own if it has one, else the
    /// transaction's.
    pub fn retry_policy(&self, branch_id: &str) -> RetryPolicy {
        self.branch(branch_id)
            .and_then(|b| b.retry)
            .unwrap_or(self.options.retry)
    }
}
