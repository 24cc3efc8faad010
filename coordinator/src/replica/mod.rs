//! The coordinator's side of a Raft node: the transaction table as the
//! loop's state machine, and what the rest of the node needs to hear —
//! waiters (`watch`), the driver's feed (`feed`), the status the API admits
//! by, and the leader's housekeeping (minting the cluster id, collecting
//! finished transactions). The Raft loop knows none of this.

pub mod feed;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch as status_channel;

use crate::clock::Clock;
use crate::codec;
use crate::model::command::{Applied, ApplyContext};
use crate::model::{ApplyResult, Command, validate};
use crate::raft::replicated::{Observer, Replicated};
use crate::raft::{NodeError, NodeHandle, NodeStatus};
use crate::state::{ReadView, StateMachine};
use feed::{LeaderEvent, LeaderFeed};
use watch::{TxWatch, TxWatchers};

/// The Raft node replicating the transaction table.
pub type Node = NodeHandle<StateMachine>;

impl Replicated for StateMachine {
    type Output = ApplyResult;
    type View = ReadView;

    fn founding(members: BTreeMap<u64, String>) -> Self {
        StateMachine::new(members)
    }

    fn apply(&mut self, data: &[u8], index: u64, term: u64) -> ApplyResult {
        let command: Command = codec::decode(data).unwrap_or_else(|e| {
            // Skipping a committed entry would make this replica diverge.
            panic!("committed entry {index} cannot be decoded ({e}); is this binary older than the log?")
        });
        StateMachine::apply(self, command, ApplyContext { index, term })
    }

    fn view(&self, applied: u64) -> ReadView {
        StateMachine::view(self, applied)
    }

    fn snapshot(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
        let source = self.snapshot_source();
        Box::new(move || source.encode())
    }

    fn restore(data: &[u8]) -> Result<Self, String> {
        StateMachine::decode_snapshot(data).map_err(|e| e.to_string())
    }

    fn members(&self) -> &BTreeMap<u64, String> {
        StateMachine::members(self)
    }

    fn set_member(&mut self, id: u64, address: Option<String>) {
        StateMachine::set_member(self, id, address)
    }
}

/// What the replica says about the transactions, beside the node's own
/// status: the API admits new transactions by it, `cluster status` shows it.
#[derive(Clone, Debug, Default)]
pub struct ReplicaStatus {
    /// Minted by the cluster's first leader; `None` until that entry is applied.
    pub cluster_id: Option<uuid::Uuid>,
    pub txs: usize,
    pub active_txs: usize,
    /// Footprint of the unfinished transactions (`--active-bytes-max`).
    pub active_bytes: usize,
    /// Unfinished with an op that failed often (`state::machine::is_stuck`);
    /// recounted at most every [`STUCK_RECOUNT`].
    pub stuck_txs: usize,
}

/// How often the stuck transactions are recounted (a walk over the
/// unfinished ones, on the Raft thread: not on every entry).
const STUCK_RECOUNT: Duration = Duration::from_secs(1);

/// How long finished transactions are kept.
#[derive(Clone, Debug)]
pub struct Retention {
    /// Collected this long after they finished.
    pub age: Duration,
    /// And the oldest beyond this many.
    pub count_max: usize,
    /// And the oldest beyond this much footprint.
    pub bytes_max: usize,
}

/// How often the leader looks for finished transactions to collect, and
/// how many one Gc entry names at most. Every replica removes them on its
/// Raft thread, so one entry stalls every transaction for as long as its
/// removals take: ~1,000 of them take 1–3 ms, the 7,500 a second's worth
/// at peak took 20–40 ms, every second — that was the p99.9 (BENCHMARKS.md,
/// eleventh session). A full batch is followed by the next one at the next
/// tick, so up to ~20,000 a second are collected when they pile up.
const GC_INTERVAL: Duration = Duration::from_millis(100);
const GC_PROPOSE_MAX: usize = 1_000;
const _: () = assert!(
    GC_PROPOSE_MAX <= validate::GC_BATCH_MAX,
    "apply takes every batch"
);
/// Least gap between two publications of the replica's status.
const STATUS_INTERVAL: Duration = Duration::from_millis(20);

/// The loop's observer: tells waiters and the driver, publishes the
/// replica's status, and proposes the leader's housekeeping.
pub struct ReplicaObserver {
    watchers: Arc<TxWatchers>,
    feed: Arc<LeaderFeed>,
    status: status_channel::Sender<Arc<ReplicaStatus>>,
    status_stale: bool,
    last_status: Instant,
    retention: Retention,
    clock: Arc<dyn Clock>,
    last_gc: Instant,
    stuck: (usize, Instant),
}

impl ReplicaObserver {
    fn publish(&mut self, state: &StateMachine, force: bool) {
        if !(force || self.status_stale && self.last_status.elapsed() >= STATUS_INTERVAL) {
            return;
        }
        self.status_stale = false;
        self.last_status = Instant::now();
        if force || self.stuck.1.elapsed() >= STUCK_RECOUNT {
            self.stuck = (state.stuck_count(), Instant::now());
        }
        self.status.send_replace(Arc::new(ReplicaStatus {
            cluster_id: state.cluster_id(),
            txs: state.len(),
            active_txs: state.active_count(),
            active_bytes: state.active_bytes(),
            stuck_txs: self.stuck.0,
        }));
    }
}

impl Observer<StateMachine> for ReplicaObserver {
    fn applied(&mut self, state: &StateMachine, output: &ApplyResult, index: u64, leading: bool) {
        self.status_stale = true;
        match output {
            Ok(Applied::ClusterId { .. }) => self.publish(state, true),
            Ok(applied) => {
                if let Applied::Begun { tx, created: true } = applied {
                    crate::metrics::tx_begun(tx);
                }
                if let Some(tx) = applied.tx()
                    && tx.version == index
                {
                    crate::metrics::tx_changed(tx, index);
                    self.watchers.notify(tx);
                    if leading {
                        self.feed.changed(tx.clone());
                    }
                }
            }
            Err(_) => {}
        }
    }

    fn lead(&mut self, state: &StateMachine, term: u64) -> Vec<Vec<u8>> {
        let txs: Vec<_> = state
            .active_gids()
            .filter_map(|gid| state.get(gid))
            .collect();
        tracing::info!(
            term,
            unfinished = txs.len(),
            "leading: resuming unfinished transactions"
        );
        self.feed.leadership(LeaderEvent::Lead { term, txs });
        if state.cluster_id().is_some() {
            return Vec::new();
        }
        // The cluster's first leader names it (randomness on the proposing
        // side; `apply` keeps the first name it sees).
        let cluster_id = uuid::Uuid::new_v4();
        tracing::info!(%cluster_id, "minting the cluster id");
        vec![codec::encode(&Command::InitCluster { cluster_id })]
    }

    fn follow(&mut self) {
        self.feed.leadership(LeaderEvent::Follow);
    }

    fn tick(&mut self, state: &StateMachine, leading: bool) -> Vec<Vec<u8>> {
        self.publish(state, false);
        if !leading || self.last_gc.elapsed() < GC_INTERVAL {
            return Vec::new();
        }
        let before_ms = self.clock.now_ms() - self.retention.age.as_millis() as i64;
        let gids = state.gc_candidates(
            before_ms,
            self.retention.count_max,
            self.retention.bytes_max,
            GC_PROPOSE_MAX,
        );
        // Behind (a full batch): the next batch at the next tick.
        let now = Instant::now();
        self.last_gc = if gids.len() < GC_PROPOSE_MAX {
            now
        } else {
            now.checked_sub(GC_INTERVAL).unwrap_or(now)
        };
        if gids.is_empty() {
            return Vec::new();
        }
        tracing::debug!(count = gids.len(), "collecting finished transactions");
        vec![codec::encode(&Command::Gc { gids })]
    }

    fn restored(&mut self, state: &StateMachine) {
        self.publish(state, true);
    }

    fn closed(&mut self) {
        self.feed.close();
    }
}

/// What the API and the driver hold: the node, and the replica's waiters
/// and status. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    pub node: Node,
    watchers: Arc<TxWatchers>,
    status: status_channel::Receiver<Arc<ReplicaStatus>>,
}

/// The observer to start the node with, the driver's feed, and a function
/// that makes the [`Replica`] once the node is started.
pub fn observer(
    retention: Retention,
    clock: Arc<dyn Clock>,
) -> (
    ReplicaObserver,
    Arc<LeaderFeed>,
    impl FnOnce(Node) -> Replica,
) {
    let watchers = Arc::new(TxWatchers::default());
    let feed = Arc::new(LeaderFeed::default());
    let (status_tx, status_rx) = status_channel::channel(Arc::new(ReplicaStatus::default()));
    let observer = ReplicaObserver {
        watchers: watchers.clone(),
        feed: feed.clone(),
        status: status_tx,
        status_stale: true,
        last_status: Instant::now(),
        retention,
        clock,
        last_gc: Instant::now(),
        stuck: (0, Instant::now()),
    };
    let make = move |node: Node| Replica {
        node,
        watchers,
        status: status_rx,
    };
    (observer, feed, make)
}

impl Replica {
    /// Replicates a command and returns what `apply` made of it.
    pub async fn propose(&self, command: Command) -> Result<ApplyResult, NodeError> {
        let started = Instant::now();
        let result = self.node.propose(codec::encode(&command)).await;
        if result.is_ok() {
            crate::metrics::commit_latency(started.elapsed());
        }
        result
    }

    /// A linearizable view of the table (see [`NodeHandle::read`]).
    pub async fn read(&self) -> Result<Arc<ReadView>, NodeError> {
        self.node.read().await
    }

    /// Declares interest in a transaction's changes, before proposing a
    /// command about it, so that no change after the proposal is missed.
    pub fn watch(&self, gid: &str) -> TxWatch {
        self.watchers.declare(gid);
        TxWatch {
            node: self.node.clone(),
            watchers: self.watchers.clone(),
            gid: gid.to_string(),
        }
    }

    pub fn status(&self) -> Arc<ReplicaStatus> {
        self.status.borrow().clone()
    }

    pub fn node_status(&self) -> Arc<NodeStatus> {
        self.node.status()
    }

    pub fn ensure_leader(&self) -> Result<(), NodeError> {
        self.node.ensure_leader()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::model::command::{OpOutcome, SagaStepSpec};
    use crate::model::types::{Op, RetryPolicy, TxOptions};

    /// `count` one-step sagas, submitted and finished.
    fn finished_sagas(count: usize) -> StateMachine {
        let mut state = StateMachine::new(BTreeMap::new());
        let options = TxOptions {
            timeout_ms: 60_000,
            retry: RetryPolicy {
                initial_interval_ms: 100,
                max_interval_ms: 1_000,
                max_attempts: 0,
            },
            branch_timeout_ms: 1_000,
            concurrency: 0,
        };
        let mut index = 0;
        let mut apply = |state: &mut StateMachine, command| {
            index += 1;
            let ctx = ApplyContext { index, term: 1 };
            state.apply(command, ctx).expect("applied");
        };
        for i in 0..count {
            let gid = format!("saga-{i:05}");
            let step = SagaStepSpec {
                branch_id: "a".into(),
                action: "http://127.0.0.1:1/action".into(),
                compensate: "http://127.0.0.1:1/compensate".into(),
                payload: Default::default(),
                after: Vec::new(),
                retry: None,
            };
            let submit = Command::SubmitSaga {
                gid: gid.clone(),
                options,
                steps: vec![step],
                payload: Default::default(),
                now_ms: 1_000,
            };
            apply(&mut state, submit);
            let results = Command::OpResults {
                gid,
                results: vec![("a".into(), Op::Action, OpOutcome::Succeeded)],
                exact: true,
                now_ms: 1_001,
            };
            apply(&mut state, results);
        }
        assert_eq!(state.active_count(), 0);
        state
    }

    /// Invariant 3 (no blocking): every replica removes a Gc entry's
    /// transactions on its Raft thread, where no commit applies meanwhile,
    /// so an entry names at most `GC_PROPOSE_MAX` (one a second of up to
    /// 10,000 held every commit for 20–40 ms at peak); and a backlog is
    /// still worked off at once, a batch per tick.
    #[test]
    fn no_blocking_finished_transactions_are_collected_in_small_entries() {
        let mut state = finished_sagas(2_500);
        let retention = Retention {
            age: Duration::from_secs(600),
            count_max: 0,
            bytes_max: usize::MAX,
        };
        let (mut observer, _, _) = observer(retention, Arc::new(SystemClock));
        observer.last_gc = Instant::now() - GC_INTERVAL;
        let mut batches = Vec::new();
        for _ in 0..4 {
            for data in observer.tick(&state, true) {
                let command: Command = codec::decode(&data).expect("a command");
                match &command {
                    Command::Gc { gids } => batches.push(gids.len()),
                    other => panic!("not a Gc: {other:?}"),
                }
                let ctx = ApplyContext {
                    index: 10_000,
                    term: 1,
                };
                state.apply(command, ctx).expect("collected");
            }
        }
        // Three ticks in a row, not one per interval: the first two were full.
        assert_eq!(batches, vec![GC_PROPOSE_MAX, GC_PROPOSE_MAX, 500]);
        assert!(state.is_empty(), "{} left", state.len());
        // Caught up: the next look waits for the interval again.
        assert!(observer.tick(&finished_sagas(10), true).is_empty());
    }
}
