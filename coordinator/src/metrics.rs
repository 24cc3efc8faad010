//! Prometheus metrics (`/metrics` on the HTTP port), through the `metrics`
//! facade. Counters and histograms are recorded where things happen;
//! gauges that describe state (in flight, stuck, Raft indexes) are read at
//! scrape time, so they cannot drift.
//!
//! Transactions are counted as this node applies them (every node applies
//! every entry): begun and finished totals agree across nodes once they
//! have caught up, whichever node is scraped.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::model::Transaction;
use crate::model::command::OpOutcome;
use crate::model::types::{Op, Outcome, Protocol, TxState};
use crate::raft::Role;
use crate::service::Transactions;

pub const TX_BEGUN: &str = "tandem_transactions_begun_total";
pub const TX_FINISHED: &str = "tandem_transactions_finished_total";
pub const TX_IN_FLIGHT: &str = "tandem_transactions_in_flight";
pub const TX_STUCK: &str = "tandem_transactions_stuck";
pub const TX_RETAINED: &str = "tandem_transactions_retained";
pub const DECISION_SECONDS: &str = "tandem_decision_seconds";
pub const REPAIRS: &str = "tandem_repairs_total";
pub const BRANCH_CALL_SECONDS: &str = "tandem_branch_call_seconds";
pub const RAFT_TERM: &str = "tandem_raft_term";
pub const RAFT_ROLE: &str = "tandem_raft_role";
pub const RAFT_LEADER_CHANGES: &str = "tandem_raft_leader_changes_total";
pub const RAFT_PROPOSALS: &str = "tandem_raft_proposals_total";
pub const RAFT_COMMIT_SECONDS: &str = "tandem_raft_commit_seconds";
pub const RAFT_FSYNC_SECONDS: &str = "tandem_raft_fsync_seconds";
pub const RAFT_GROUP_COMMIT_WAITS: &str = "tandem_raft_group_commit_waits_total";
pub const RAFT_SLOW_TURNS: &str = "tandem_raft_slow_turns_total";
pub const RAFT_COMMIT_INDEX: &str = "tandem_raft_commit_index";
pub const RAFT_APPLIED_INDEX: &str = "tandem_raft_applied_index";
pub const RAFT_APPLY_LAG: &str = "tandem_raft_apply_lag_entries";
pub const RAFT_LOG_ENTRIES: &str = "tandem_raft_log_entries";
pub const RAFT_SNAPSHOTS: &str = "tandem_raft_snapshots_total";
pub const RAFT_SNAPSHOT_FAILURES: &str = "tandem_raft_snapshot_failures_total";
pub const RAFT_PEER_BATCHES: &str = "tandem_raft_peer_batches_total";

/// Latency buckets, in seconds: 100 µs to 30 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The handles of what is recorded once or more per transaction, made once
/// when the recorder is installed: the hot paths (the Raft loop's
/// proposals and writes, every proposal's wait) skip the registry lookup,
/// and record nothing at all in a process without a recorder.
struct Hot {
    proposals: metrics::Counter,
    commit_seconds: metrics::Histogram,
    fsync_seconds: metrics::Histogram,
    group_commit_waits: metrics::Counter,
    /// By way, in `PeerBatch::ALL` order.
    peer_batches: Vec<metrics::Counter>,
    /// By protocol, in `Protocol::ALL` order.
    begun: Vec<metrics::Counter>,
    /// The labelled series recorded per call or per finished transaction,
    /// each registered on first use (a series never recorded is not
    /// shown): by op and result, by protocol and outcome, by protocol,
    /// end state and heuristic. A lookup by labels builds and hashes a key
    /// each time; these are recorded thousands of times a second.
    branch_calls: Lazy<metrics::Histogram>,
    decisions: Lazy<metrics::Histogram>,
    finished: Lazy<metrics::Counter>,
}

/// Handles made on first use, by a dense index over their labels.
struct Lazy<T>(Vec<OnceLock<T>>);

impl<T> Lazy<T> {
    fn new(n: usize) -> Lazy<T> {
        Lazy((0..n).map(|_| OnceLock::new()).collect())
    }

    fn get(&self, i: usize, make: impl FnOnce() -> T) -> Option<&T> {
        self.0.get(i).map(|slot| slot.get_or_init(make))
    }
}

const CALL_RESULTS: [&str; 3] = ["ok", "failed", "transient"];
const OUTCOMES: [Outcome; 2] = [Outcome::Commit, Outcome::Abort];

/// `x`'s place in `all`, which lists every value of its type (a value
/// missing from its `ALL` stops debug builds and tests here).
fn index_of<T: PartialEq>(all: &[T], x: &T) -> usize {
    let i = all.iter().position(|a| a == x);
    debug_assert!(i.is_some(), "a value missing from its ALL list");
    i.unwrap_or(0)
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same
/// handle). `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .ok()?
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics are off"))
                .ok()?;
            describe();
            let _ = HOT.set(Hot {
                proposals: counter!(RAFT_PROPOSALS),
                commit_seconds: histogram!(RAFT_COMMIT_SECONDS),
                fsync_seconds: histogram!(RAFT_FSYNC_SECONDS),
                group_commit_waits: counter!(RAFT_GROUP_COMMIT_WAITS),
                peer_batches: PeerBatch::ALL
                    .iter()
                    .map(|w| counter!(RAFT_PEER_BATCHES, "way" => w.name()))
                    .collect(),
                begun: Protocol::ALL
                    .iter()
                    .map(|p| counter!(TX_BEGUN, "protocol" => p.name()))
                    .collect(),
                branch_calls: Lazy::new(Op::ALL.len() * CALL_RESULTS.len()),
                decisions: Lazy::new(Protocol::ALL.len() * OUTCOMES.len()),
                finished: Lazy::new(Protocol::ALL.len() * TxState::ALL.len() * 2),
            });
            Some(recorder)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(TX_BEGUN, "Transactions begun, by protocol");
    describe_counter!(
        TX_FINISHED,
        "Transactions finished, by protocol, outcome (committed, aborted) and heuristic (true: an op was resolved by hand)"
    );
    describe_gauge!(TX_IN_FLIGHT, "Unfinished transactions");
    describe_gauge!(
        TX_STUCK,
        "Unfinished transactions with an op that failed 5 times or more"
    );
    describe_gauge!(TX_RETAINED, "Transactions held, finished ones included");
    describe_histogram!(
        DECISION_SECONDS,
        Unit::Seconds,
        "From begin to the decision, by protocol and outcome"
    );
    describe_counter!(REPAIRS, "Operators' repairs applied, by action");
    describe_histogram!(
        BRANCH_CALL_SECONDS,
        Unit::Seconds,
        "Calls to participants, by op and result (ok, failed, transient)"
    );
    describe_gauge!(RAFT_TERM, "This node's Raft term");
    describe_gauge!(
        RAFT_ROLE,
        "1 for this node's role (label role), 0 for the others"
    );
    describe_counter!(RAFT_LEADER_CHANGES, "Times this node saw the leader change");
    describe_counter!(RAFT_PROPOSALS, "Commands proposed on this node");
    describe_histogram!(
        RAFT_COMMIT_SECONDS,
        Unit::Seconds,
        "From proposal to applied, on the leader"
    );
    describe_histogram!(
        RAFT_FSYNC_SECONDS,
        Unit::Seconds,
        "One log write with fsync"
    );
    describe_counter!(
        RAFT_GROUP_COMMIT_WAITS,
        "Log writes the leader held back for the group-commit gap"
    );
    describe_counter!(
        RAFT_SLOW_TURNS,
        "Turns of the Raft loop that took 50 ms or more (each holds every proposal behind it)"
    );
    describe_gauge!(RAFT_COMMIT_INDEX, "Highest committed log index");
    describe_gauge!(RAFT_APPLIED_INDEX, "Highest applied log index");
    describe_gauge!(RAFT_APPLY_LAG, "Committed entries not applied yet");
    describe_gauge!(RAFT_LOG_ENTRIES, "Log entries after the last snapshot");
    describe_counter!(RAFT_SNAPSHOTS, "Snapshots this node wrote");
    describe_counter!(
        RAFT_SNAPSHOT_FAILURES,
        "Snapshots this node failed to write (each retried later, with a growing wait)"
    );
    describe_counter!(
        RAFT_PEER_BATCHES,
        "A Raft turn's messages for one peer, by how they left: direct (the Raft loop wrote them to the socket), part (it wrote some, the peer's task the rest), queued (the peer's task wrote them)"
    );
}

/// A transaction began here (as applied).
pub fn tx_begun(tx: &Transaction) {
    if let Some(hot) = HOT.get()
        && let Some(i) = Protocol::ALL.iter().position(|p| *p == tx.protocol)
    {
        hot.begun[i].increment(1);
    }
}

/// An applied entry changed `tx`: count its decision and its end.
pub fn tx_changed(tx: &Transaction, index: u64) {
    let Some(hot) = HOT.get() else {
        return;
    };
    let protocol = index_of(&Protocol::ALL, &tx.protocol);
    if let Some(d) = &tx.decision
        && d.index == index
    {
        let outcome = match d.outcome {
            Outcome::Commit => "commit",
            Outcome::Abort => "abort",
        };
        let seconds = (d.decided_at_ms - tx.created_at_ms).max(0) as f64 / 1000.0;
        let i = protocol * OUTCOMES.len() + index_of(&OUTCOMES, &d.outcome);
        if let Some(h) = hot.decisions.get(
            i,
            || histogram!(DECISION_SECONDS, "protocol" => tx.protocol.name(), "outcome" => outcome),
        ) {
            h.record(seconds);
        }
    }
    if let Some(repair) = tx.repairs.last()
        && repair.index == index
    {
        counter!(REPAIRS, "action" => repair.action.name()).increment(1);
    }
    if tx.state.is_terminal() && tx.version == index {
        let heuristic = tx.is_heuristic();
        let i = (protocol * TxState::ALL.len() + index_of(&TxState::ALL, &tx.state)) * 2
            + usize::from(heuristic);
        if let Some(c) = hot.finished.get(i, || {
            counter!(
                TX_FINISHED,
                "protocol" => tx.protocol.name(),
                "outcome" => tx.state.name(),
                "heuristic" => if heuristic { "true" } else { "false" }
            )
        }) {
            c.increment(1);
        }
    }
}

/// One call to a participant ended.
pub fn branch_call(op: Op, outcome: &OpOutcome, took: Duration) {
    let Some(hot) = HOT.get() else {
        return;
    };
    let result = match outcome {
        OpOutcome::Succeeded => 0,
        OpOutcome::Failed(_) => 1,
        _ => 2,
    };
    let i = index_of(&Op::ALL, &op) * CALL_RESULTS.len() + result;
    if let Some(h) = hot.branch_calls.get(
        i,
        || histogram!(BRANCH_CALL_SECONDS, "op" => op.name(), "result" => CALL_RESULTS[result]),
    ) {
        h.record(took.as_secs_f64());
    }
}

pub fn proposals(n: usize) {
    if let Some(hot) = HOT.get() {
        hot.proposals.increment(n as u64);
    }
}

pub fn commit_latency(took: Duration) {
    if let Some(hot) = HOT.get() {
        hot.commit_seconds.record(took.as_secs_f64());
    }
}

pub fn fsync(took: Duration) {
    if let Some(hot) = HOT.get() {
        hot.fsync_seconds.record(took.as_secs_f64());
    }
}

pub fn group_commit_wait() {
    if let Some(hot) = HOT.get() {
        hot.group_commit_waits.increment(1);
    }
}

/// How a Raft turn's messages for one peer left (the direct lane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerBatch {
    Direct,
    Part,
    Queued,
}

impl PeerBatch {
    const ALL: [PeerBatch; 3] = [PeerBatch::Direct, PeerBatch::Part, PeerBatch::Queued];

    fn name(self) -> &'static str {
        match self {
            PeerBatch::Direct => "direct",
            PeerBatch::Part => "part",
            PeerBatch::Queued => "queued",
        }
    }
}

pub fn peer_batch(way: PeerBatch) {
    if let Some(hot) = HOT.get() {
        hot.peer_batches[index_of(&PeerBatch::ALL, &way)].increment(1);
    }
}

pub fn slow_turn() {
    counter!(RAFT_SLOW_TURNS).increment(1);
}

pub fn snapshot_written() {
    counter!(RAFT_SNAPSHOTS).increment(1);
}

pub fn snapshot_failed() {
    counter!(RAFT_SNAPSHOT_FAILURES).increment(1);
}

pub fn leader_changed() {
    counter!(RAFT_LEADER_CHANGES).increment(1);
}

const ROLES: [Role; 6] = [
    Role::Leader,
    Role::Follower,
    Role::Candidate,
    Role::PreCandidate,
    Role::Learner,
    Role::Detached,
];

/// Sets the gauges that describe state, from this node's own view (no
/// round trip: a scrape must work on a node cut off from the others).
pub fn refresh(transactions: &Transactions) {
    let replica = transactions.replica();
    let node = replica.node_status();
    let status = replica.status();
    gauge!(TX_IN_FLIGHT).set(status.active_txs as f64);
    gauge!(TX_RETAINED).set(status.txs as f64);
    gauge!(TX_STUCK).set(status.stuck_txs as f64);
    gauge!(RAFT_TERM).set(node.term as f64);
    for role in ROLES {
        gauge!(RAFT_ROLE, "role" => role.name()).set(if role == node.role { 1.0 } else { 0.0 });
    }
    gauge!(RAFT_COMMIT_INDEX).set(node.commit as f64);
    gauge!(RAFT_APPLIED_INDEX).set(node.applied as f64);
    gauge!(RAFT_APPLY_LAG).set(node.commit.saturating_sub(node.applied) as f64);
    gauge!(RAFT_LOG_ENTRIES).set(node.last_index.saturating_sub(node.snapshot_index) as f64);
}
