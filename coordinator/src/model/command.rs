//! Commands: the only way the transaction table changes. Each is proposed by
//! the leader with everything `apply` needs (time, generated ids) stamped in,
//! so every replica computes the same result from the same log.
//!
//! Commands state *facts* (a branch answered, the application asked to
//! commit, a deadline passed); the decision they may lead to is taken inside
//! `apply`, by the protocol's transition table, at the entry that records the
//! deciding fact — that entry is the commit point.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::{
    Op, Payload, Protocol, RepairAction, RetryPolicy, Transaction, TxOptions, TxState,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Starts a transaction; a repeat with the same gid and protocol is answered
    /// with the transaction already there.
    Begin {
        gid: String,
        protocol: Protocol,
        options: TxOptions,
        payload: Payload,
        /// The leader's clock when it proposed the command.
        now_ms: i64,
    },
    /// Starts a saga with all its steps; a repeat with the same gid is
    /// answered with the saga already there.
    SubmitSaga {
        gid: String,
        options: TxOptions,
        steps: Vec<SagaStepSpec>,
        payload: Payload,
        now_ms: i64,
    },
    /// Enlists a branch; a repeat with the same spec is a no-op.
    RegisterBranch {
        gid: String,
        branch: BranchSpec,
        now_ms: i64,
    },
    /// The application asks to commit. Idempotent once committing.
    Commit { gid: String, now_ms: i64 },
    /// The application (or a participant's recovery) asks to abort.
    Abort {
        gid: String,
        reason: String,
        now_ms: i64,
    },
    /// A participant answered a call (or the call failed in transit).
    OpResult {
        gid: String,
        branch_id: String,
        op: Op,
        outcome: OpOutcome,
        now_ms: i64,
    },
    /// The leader saw the transaction's deadline pass. Aborts it if it is
    /// still undecided at `now_ms`; otherwise changes nothing.
    Timeout { gid: String, now_ms: i64 },
    /// Removes terminal transactions past their retention. Gids that are not
    /// terminal (or not there) are left alone, so a late Gc is harmless.
    Gc { gids: Vec<String> },
    /// Names the cluster: proposed by the first leader of a cluster that has
    /// no id yet. The first one applied wins; later ones change nothing.
    /// XA participants put this id in their xids, so that a recovery scan
    /// touches only its own cluster's branches.
    InitCluster { cluster_id: uuid::Uuid },
    /// Registers a transactional message, prepared: its destinations and
    /// the producer's check-back. A repeat with the same gid and spec is
    /// answered with the message already there.
    PrepareMessage {
        gid: String,
        options: TxOptions,
        check_back: String,
        destinations: Vec<DestinationSpec>,
        payload: Payload,
        now_ms: i64,
    },
    /// A command that came with a W3C trace context (`traceparent`): a
    /// transaction it begins keeps it, so that every later call on its
    /// behalf — from whichever leader — joins the same trace.
    Traced {
        trace_parent: String,
        command: Box<Command>,
    },
    /// An operator's repair (`tandem tx retry|resolve`), recorded in the
    /// transaction's history. `branch_id` `None`: every branch it fits.
    Repair {
        gid: String,
        action: RepairAction,
        branch_id: Option<String>,
        reason: String,
        by: String,
        now_ms: i64,
    },
    /// A saga's action answers, in the order the driver got them: the
    /// successes it held back while it ran one step ahead of the log,
    /// then the answer that ended the hold (see `protocol::saga`, "Running
    /// ahead"). `exact`: the proposing worker knows every step it started
    /// ahead, and all of them are here — so, if this entry decides to
    /// compensate and no other leader drove the saga, only what may have
    /// run from these results is compensated; otherwise one step beyond.
    OpResults {
        gid: String,
        results: Vec<(String, Op, OpOutcome)>,
        exact: bool,
        now_ms: i64,
    },
    /// [`Command::Abort`] as written since sagas run ahead of the log: a
    /// saga it decides compensates one step beyond the recorded successes.
    /// `Abort` entries keep their old meaning (exactly the recorded ones),
    /// so a log written before replays as it applied.
    AbortV2 {
        gid: String,
        reason: String,
        now_ms: i64,
    },
    /// [`Command::Timeout`] as written since sagas run ahead of the log
    /// (see [`Command::AbortV2`]).
    TimeoutV2 { gid: String, now_ms: i64 },
}

/// A message's destination as prepared: where, and what it receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationSpec {
    /// Names the destination within the message; with the gid, the
    /// message id consumers deduplicate on.
    pub branch_id: String,
    /// `http(s)://…`, `grpc://…`, `nats://SUBJECT` or
    /// `amqp://EXCHANGE/ROUTING_KEY`.
    pub endpoint: String,
    pub payload: Payload,
}

/// A branch as the application registers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchSpec {
    pub branch_id: String,
    /// Which operations the coordinator may call, and where.
    pub ops: Vec<(Op, String)>,
    pub payload: Payload,
}

/// A saga step as submitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStepSpec {
    pub branch_id: String,
    pub action: String,
    pub compensate: String,
    pub payload: Payload,
    /// Steps whose action must succeed first.
    pub after: Vec<String>,
    pub retry: Option<RetryPolicy>,
}

/// How a call to a participant ended (variants are only ever appended: the
/// log keeps old ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOutcome {
    Succeeded,
    /// A business "no" (vote no, try failed, action rejected): final in
    /// phase one; in phase two a refusal (see [`OpOutcome::Retrying`]).
    Failed(String),
    /// One more failed attempt: network, timeout, 5xx, UNAVAILABLE.
    /// Written by older drivers; the driver now sends `Retrying`.
    Transient(String),
    /// The op has failed `attempts` times in all so far, the last time with
    /// `error`, and is being retried. `refused`: the last failure was a
    /// phase-two refusal (a heuristic hazard). The driver does not record
    /// every attempt: it records the first failure, a refusal, powers of two
    /// and at least every 30 s (see `protocol::retry`).
    Retrying {
        attempts: u32,
        error: String,
        refused: bool,
    },
}

impl Command {
    /// The gid a command is about, for logs, errors and change notification.
    pub fn gid(&self) -> Option<&str> {
        match self {
            Command::Begin { gid, .. }
            | Command::SubmitSaga { gid, .. }
            | Command::RegisterBranch { gid, .. }
            | Command::Commit { gid, .. }
            | Command::Abort { gid, .. }
            | Command::OpResult { gid, .. }
            | Command::Timeout { gid, .. }
            | Command::PrepareMessage { gid, .. }
            | Command::Repair { gid, .. }
            | Command::OpResults { gid, .. }
            | Command::AbortV2 { gid, .. }
            | Command::TimeoutV2 { gid, .. } => Some(gid),
            Command::Traced { command, .. } => command.gid(),
            Command::Gc { .. } | Command::InitCluster { .. } => None,
        }
    }
}

/// Where in the log a command is being applied: decisions record it as their
/// fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ApplyContext {
    pub index: u64,
    pub term: u64,
}

/// What a command did, returned to the proposer.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    Begun {
        tx: Arc<Transaction>,
        /// False when the gid already existed with the same protocol.
        created: bool,
    },
    /// The transaction after the command (unchanged if it was a repeat).
    Updated {
        tx: Arc<Transaction>,
    },
    Collected {
        removed: usize,
    },
    /// The cluster's id (the one already recorded, if a leader minted it first).
    ClusterId {
        cluster_id: uuid::Uuid,
    },
}

impl Applied {
    pub fn tx(&self) -> Option<&Arc<Transaction>> {
        match self {
            Applied::Begun { tx, .. } | Applied::Updated { tx } => Some(tx),
            Applied::Collected { .. } | Applied::ClusterId { .. } => None,
        }
    }
}

/// Why `apply` refused a command. Refusals change nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("transaction {gid} already exists with protocol {existing}, not {requested}")]
    ProtocolMismatch {
        gid: String,
        existing: Protocol,
        requested: Protocol,
    },
    #[error("transaction {gid} not found")]
    NotFound { gid: String },
    #[error("transaction {gid} is {state}: {what}")]
    InvalidState {
        gid: String,
        state: TxState,
        what: String,
    },
    #[error("{0}")]
    Invalid(#[from] super::validate::InvalidInput),
    #[error("the coordinator holds {active} unfinished transactions, its limit; retry later")]
    TooManyActive { active: usize },
}

pub type ApplyResult = Result<Applied, Rejection>;
