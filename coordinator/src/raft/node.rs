//! The Raft loop: one OS thread owns the `RawNode`, its log store and the
//! state machine. Everything else talks to it through [`NodeHandle`] (an input
//! channel and a published status) — there is no shared mutable state.
//!
//! It is a thread, not a tokio task, because raft-engine's writes block on
//! fsync; a blocked task would stall a runtime worker on a 2-core machine.
//!
//! # The Ready contract (raft-rs), as this loop follows it
//!
//! Each turn of the loop gathers every input that is waiting (proposals, peer
//! messages, reads, membership changes — up to [`INPUTS_PER_TURN`]), ticks if a
//! tick is due, and then, if raft has a `Ready`:
//!
//! 1. sends `messages()` at once: they do not depend on this node's
//!    persistence (a leader's appends go out while it writes its own copy);
//! 2. installs `snapshot()` if there is one: the file durably, the log replaced,
//!    the state machine rebuilt from it;
//! 3. applies `committed_entries()` (already durable on a quorum), answering the
//!    proposers whose entries they are;
//! 4. writes `entries()` and `hs()` in **one** raft-engine batch, fsync'd when
//!    `must_sync()` — the group commit every proposal of the turn shares;
//! 5. sends `persisted_messages()`, which must not leave before step 4 (votes,
//!    a follower's append acknowledgement);
//! 6. calls `advance`, then handles the `LightReady` the same way: its commit
//!    index is noted for the next write, its messages are sent, its committed
//!    entries applied; then `advance_apply`.
//!
//! Read states from the `Ready` release the linearizable reads waiting on them
//! once the applied index reaches their read index.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, ReadOnlyOption, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::storage::{Bootstrap, LogStore, StoreError, write_snapshot_file};
use super::transport::Transport;
use crate::state::command::{Applied, ApplyContext};
use crate::state::{ApplyResult, Command, ReadView, StateMachine, Transaction, codec, validate};

/// Inputs handled in one turn before raft gets a chance to produce a Ready;
/// bounds the latency one turn adds.
const INPUTS_PER_TURN: usize = 4096;
/// Capacity of the input channel; beyond it callers get `Overloaded`.
pub const INPUT_QUEUE_MAX: usize = 65_536;
/// Minimum gap between two status publications when nothing important changed.
const STATUS_INTERVAL: Duration = Duration::from_millis(20);
/// How often a transaction waiter re-reads even without a change.
const WAIT_RECHECK: Duration = Duration::from_secs(1);
/// How often the leader looks for finished transactions to collect.
const GC_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    pub cluster_name: String,
    /// Address this node serves gRPC on, as peers and clients should dial it.
    pub address: String,
    /// Founding members (this node included) — used only to bootstrap an
    /// empty data directory, and as addresses until membership says otherwise.
    pub peers: BTreeMap<u64, String>,
    /// Start empty and wait to be added to an existing cluster, instead of
    /// bootstrapping from `peers`.
    pub join: bool,
    pub data_dir: PathBuf,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot after this many entries have been applied since the last.
    pub snapshot_interval_entries: u64,
    /// Entries kept behind a snapshot, so a slightly lagging follower catches
    /// up from the log rather than by a whole snapshot.
    pub log_retain_entries: u64,
    /// Finished transactions are kept this long, then collected.
    pub retention: Duration,
    /// And at most this many of them.
    pub finished_max: usize,
    /// And at most this much of their footprint.
    pub finished_bytes_max: usize,
}

/// The role this node plays, as shown by `tandem cluster status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    Leader,
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    /// A non-voting member catching up before promotion.
    Learner,
    /// Not (or no longer) a member of the cluster's configuration.
    Detached,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Learner => "learner",
            Role::Detached => "detached",
        }
    }
}

/// A node's view of itself, republished by the loop as it changes.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub address: String,
    pub cluster_name: String,
    /// Minted by the cluster's first leader; `None` until that entry is applied.
    pub cluster_id: Option<uuid::Uuid>,
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Every member's address (replicated membership, then founding peers).
    pub members: BTreeMap<u64, String>,
    /// On the leader: each peer's matched log index.
    pub matched: BTreeMap<u64, u64>,
    pub txs: usize,
    pub active_txs: usize,
    /// Footprint of the unfinished transactions (`--active-bytes-max`).
    pub active_bytes: usize,
}

impl NodeStatus {
    pub fn leader_address(&self) -> Option<&str> {
        (self.leader_id != 0)
            .then(|| self.members.get(&self.leader_id).map(String::as_str))
            .flatten()
    }
}

/// Why the node could not do what was asked. None of these changed anything
/// that was not already recorded — except `Unknown`, where the outcome is not
/// known and a retry (every client call is idempotent) settles it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("{}", not_leader_message(*.node_id, *.leader_id, .leader_address.as_deref()))]
    NotLeader {
        node_id: u64,
        leader_id: u64,
        leader_address: Option<String>,
    },
    #[error(
        "the outcome is unknown: leadership changed while the request was in flight; retrying is safe"
    )]
    Unknown,
    #[error("node {0} is overloaded: too many requests waiting; retry later")]
    Overloaded(u64),
    #[error("no answer within {0:?}; the outcome is unknown and retrying is safe")]
    Timeout(Duration),
    #[error("node {0} is shutting down")]
    Stopped(u64),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("another membership change is still in progress; retry")]
    MembershipInProgress,
    #[error("leadership is moving from node {from} to node {to}; retry")]
    TransferringLeadership { from: u64, to: u64 },
}

fn not_leader_message(node_id: u64, leader_id: u64, leader_address: Option<&str>) -> String {
    match (leader_id, leader_address) {
        (0, _) => format!("node {node_id} is not the leader and no leader is known yet; retry"),
        (id, Some(addr)) => {
            format!("node {node_id} is not the leader; the leader is node {id} at {addr}")
        }
        (id, None) => format!("node {node_id} is not the leader; the leader is node {id}"),
    }
}

/// A membership change, as the admin API asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    AddLearner { id: u64, address: String },
    Promote { id: u64 },
    Remove { id: u64 },
}

/// Carried in a conf-change entry's context, so every replica learns the
/// address of a node the entry adds.
#[derive(Serialize, Deserialize)]
struct MembershipContext {
    id: u64,
    address: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What the leader-only executor (the driver) hears from the loop.
#[derive(Debug)]
pub enum LeaderEvent {
    /// This node leads `term` and has applied everything committed before
    /// it: here is every unfinished transaction to resume.
    Lead {
        term: u64,
        txs: Vec<Arc<Transaction>>,
    },
    /// Transactions changed while this node leads: the latest version of
    /// each, in the order they first changed since the driver last looked.
    Changed(Vec<Arc<Transaction>>),
    /// This node no longer leads: stop everything.
    Follow,
}

/// The loop's feed to the driver, coalesced: at most one pending version
/// per transaction (the latest), so a driver that falls behind costs one
/// version per unfinished transaction, never a queue of them. A change of
/// leadership supersedes every pending change (Lead carries every
/// unfinished transaction as of that moment; Follow stops everything).
#[derive(Default)]
pub struct LeaderFeed {
    state: std::sync::Mutex<FeedState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct FeedState {
    leadership: Option<LeaderEvent>,
    changed: HashMap<String, Arc<Transaction>>,
    order: Vec<String>,
    closed: bool,
}

impl LeaderFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().expect("leader feed lock")
    }

    fn leadership(&self, event: LeaderEvent) {
        let mut state = self.lock();
        state.changed.clear();
        state.order.clear();
        state.leadership = Some(event);
        drop(state);
        self.ready.notify_one();
    }

    fn changed(&self, tx: Arc<Transaction>) {
        let mut state = self.lock();
        if state.changed.insert(tx.gid.clone(), tx.clone()).is_none() {
            state.order.push(tx.gid.clone());
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Ends the feed: [`LeaderFeed::next`] returns `None` once drained.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// The next event: a change of leadership first, then the changes that
    /// came after it.
    pub async fn next(&self) -> Option<LeaderEvent> {
        loop {
            {
                let mut state = self.lock();
                if let Some(event) = state.leadership.take() {
                    return Some(event);
                }
                if !state.order.is_empty() {
                    let order = std::mem::take(&mut state.order);
                    let mut changed = std::mem::take(&mut state.changed);
                    let txs = order
                        .into_iter()
                        .filter_map(|g| changed.remove(&g))
                        .collect();
                    return Some(LeaderEvent::Changed(txs));
                }
                if state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Transactions callers are waiting on, by gid. A caller declares its
/// interest before it proposes; from then on the loop keeps the latest
/// version of that transaction it applied and wakes the caller on every
/// change — so a waiter compares versions instead of reading, and cannot
/// miss a change that lands between two waits.
#[derive(Default)]
pub struct TxWatchers {
    watched: std::sync::Mutex<HashMap<String, Watched>>,
    /// Lets the loop skip the lock when nobody waits (the common case).
    count: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Watched {
    /// Callers with interest in this gid (entries go when it drops to 0).
    interest: usize,
    latest: Option<Arc<Transaction>>,
    waiting: Vec<oneshot::Sender<Arc<Transaction>>>,
}

impl TxWatchers {
    fn declare(&self, gid: &str) {
        let mut watched = self.watched.lock().expect("watchers lock");
        let entry = watched.entry(gid.to_string()).or_insert_with(|| {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Watched::default()
        });
        entry.interest += 1;
    }

    fn withdraw(&self, gid: &str) {
        let mut watched = self.watched.lock().expect("watchers lock");
        if let Some(entry) = watched.get_mut(gid) {
            entry.interest -= 1;
            if entry.interest == 0 {
                watched.remove(gid);
                self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// A receiver for the first version newer than `seen` — at once if the
    /// loop already applied one.
    fn after(&self, gid: &str, seen: u64) -> oneshot::Receiver<Arc<Transaction>> {
        let (tx, rx) = oneshot::channel();
        let mut watched = self.watched.lock().expect("watchers lock");
        let entry = watched.get_mut(gid).expect("interest is declared first");
        match &entry.latest {
            Some(latest) if latest.version > seen => {
                let _ = tx.send(latest.clone());
            }
            _ => entry.waiting.push(tx),
        }
        rx
    }

    fn notify(&self, tx: &Arc<Transaction>) {
        if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        let mut watched = self.watched.lock().expect("watchers lock");
        if let Some(entry) = watched.get_mut(&tx.gid) {
            entry.latest = Some(tx.clone());
            for waiter in entry.waiting.drain(..) {
                let _ = waiter.send(tx.clone());
            }
        }
    }
}

/// Interest in one transaction's changes; withdrawn when dropped.
pub struct TxWatch {
    node: NodeHandle,
    gid: String,
}

impl Drop for TxWatch {
    fn drop(&mut self) {
        self.node.watchers.withdraw(&self.gid);
    }
}

impl TxWatch {
    /// Waits until the transaction satisfies `done` or `timeout` passes,
    /// starting from `latest` (what the caller's own proposal returned);
    /// returns its latest state either way, or `None` if it was collected.
    pub async fn until(
        &self,
        mut latest: Arc<Transaction>,
        timeout: Duration,
        done: impl Fn(&Transaction) -> bool,
    ) -> Result<Option<Arc<Transaction>>, NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&latest) {
                return Ok(Some(latest));
            }
            let change = self.node.watchers.after(&self.gid, latest.version);
            // Re-check at least every second: a node cut off from the
            // cluster applies nothing; its read fails instead, and the
            // caller goes to another node.
            let step = deadline.min(tokio::time::Instant::now() + WAIT_RECHECK);
            match tokio::time::timeout_at(step, change).await {
                Ok(Ok(tx)) => {
                    if tx.version > latest.version {
                        latest = tx;
                    }
                }
                _ if tokio::time::Instant::now() >= deadline => return Ok(Some(latest)),
                _ => match self.node.read().await?.get(&self.gid) {
                    Some(tx) if tx.version >= latest.version => latest = tx,
                    Some(_) => {}
                    None => return Ok(None),
                },
            }
        }
    }
}

pub enum Input {
    Propose {
        command: Command,
        reply: Reply<ApplyResult>,
    },
    ChangeMembership {
        change: MembershipChange,
        reply: Reply<ConfState>,
    },
    Read {
        reply: Reply<Arc<ReadView>>,
        deadline: Instant,
    },
    /// Messages from peers.
    Raft(Vec<Message>),
    /// The transport could not deliver to this peer.
    Unreachable(u64),
    /// A snapshot sent to a peer arrived (`true`) or did not.
    SnapshotSent {
        to: u64,
        delivered: bool,
    },
    /// A snapshot this node made is durable on disk.
    SnapshotWritten(Box<Snapshot>),
    SnapshotFailed(String),
    Shutdown,
}

/// What is waiting for the entry at a given log index.
enum Pending {
    Command(Reply<ApplyResult>),
    Membership(Reply<ConfState>),
    /// Proposed by the loop itself (Gc); nobody waits.
    Internal,
}

struct ReadBatch {
    replies: Vec<(Reply<Arc<ReadView>>, Instant)>,
    /// The term it was asked in: raft drops read-index requests across a
    /// leadership change, so a batch not confirmed by then is failed fast.
    term: u64,
    /// Set once raft has confirmed leadership for this batch.
    read_index: Option<u64>,
}

/// The async face of the node, cloned freely by the API and the driver.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: Sender<Input>,
    status: watch::Receiver<Arc<NodeStatus>>,
    id: u64,
    watchers: Arc<TxWatchers>,
    /// How long a caller waits for a proposal or read before giving up.
    pub request_timeout: Duration,
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self) -> Arc<NodeStatus> {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<Arc<NodeStatus>> {
        self.status.clone()
    }

    fn not_leader(&self, status: &NodeStatus) -> NodeError {
        NodeError::NotLeader {
            node_id: self.id,
            leader_id: status.leader_id,
            leader_address: status.leader_address().map(str::to_string),
        }
    }

    /// Fails fast when this node is known not to lead.
    pub fn ensure_leader(&self) -> Result<(), NodeError> {
        let status = self.status();
        if status.role == Role::Leader {
            Ok(())
        } else {
            Err(self.not_leader(&status))
        }
    }

    fn send(&self, input: Input) -> Result<(), NodeError> {
        self.inputs.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => NodeError::Overloaded(self.id),
            TrySendError::Disconnected(_) => NodeError::Stopped(self.id),
        })
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, NodeError>>) -> Result<T, NodeError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NodeError::Stopped(self.id)),
            Err(_) => Err(NodeError::Timeout(self.request_timeout)),
        }
    }

    /// Replicates a command and returns what `apply` made of it.
    pub async fn propose(&self, command: Command) -> Result<ApplyResult, NodeError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose { command, reply })?;
        self.wait(rx).await
    }

    /// A view of the state machine at least as new as every write acknowledged
    /// before this call (ReadIndex), on any member that knows a leader.
    pub async fn read(&self) -> Result<Arc<ReadView>, NodeError> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        self.send(Input::Read { reply, deadline })?;
        self.wait(rx).await
    }

    /// Declares interest in a transaction's changes, before proposing a
    /// command about it, so that no change after the proposal is missed.
    pub fn watch(&self, gid: &str) -> TxWatch {
        self.watchers.declare(gid);
        TxWatch {
            node: self.clone(),
            gid: gid.to_string(),
        }
    }

    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<ConfState, NodeError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Input::ChangeMembership { change, reply })?;
        self.wait(rx).await
    }

    /// Hands peer messages to the loop; dropped when the loop is saturated
    /// (raft retransmits).
    pub fn deliver(&self, messages: Vec<Message>) {
        let _ = self.inputs.try_send(Input::Raft(messages));
    }

    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the snapshot in the data directory cannot be read: {0}")]
    Snapshot(#[from] codec::DecodeError),
    #[error("{0}")]
    Config(String),
}

/// Opens the data directory, starts the loop thread and returns its handle and
/// the input sender the transport delivers into.
pub fn start(
    config: NodeConfig,
    transport: Transport,
    leader_events: Arc<LeaderFeed>,
) -> Result<(NodeHandle, std::thread::JoinHandle<()>), StartError> {
    let (inputs_tx, inputs_rx) = crossbeam_channel::bounded(INPUT_QUEUE_MAX);
    transport.set_inputs(inputs_tx.clone());
    let bootstrap = if config.join {
        None
    } else {
        if !config.peers.contains_key(&config.id) {
            return Err(StartError::Config(format!(
                "node {} is not among the founding peers {:?}; pass --join to join an existing cluster",
                config.id,
                config.peers.keys().collect::<Vec<_>>()
            )));
        }
        let machine = StateMachine::new(config.peers.clone());
        Some(Bootstrap {
            voters: config.peers.keys().copied().collect(),
            state: machine.snapshot_source().encode(),
        })
    };
    let store = LogStore::open(&config.data_dir, bootstrap)?;
    let snapshot_meta = store.snapshot_meta().clone();
    let machine = if snapshot_meta.index == 0 {
        StateMachine::default()
    } else {
        StateMachine::decode_snapshot(store.snapshot_data())?
    };
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied: snapshot_meta.index,
        check_quorum: true,
        pre_vote: true,
        batch_append: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        max_uncommitted_size: 64 << 20,
        read_only_option: ReadOnlyOption::Safe,
        ..Default::default()
    };
    raft_config.validate()?;
    let raw = RawNode::new(&raft_config, store, &super::logger::raft_logger(config.id))?;
    let status = Arc::new(NodeStatus {
        id: config.id,
        address: config.address.clone(),
        cluster_name: config.cluster_name.clone(),
        ..NodeStatus::default()
    });
    let (status_tx, status_rx) = watch::channel(status);
    let watchers = Arc::new(TxWatchers::default());
    let handle = NodeHandle {
        inputs: inputs_tx.clone(),
        status: status_rx,
        id: config.id,
        watchers: watchers.clone(),
        request_timeout: Duration::from_secs(10),
    };
    let mut node = Loop {
        conf_state: snapshot_meta.get_conf_state().clone(),
        applied: snapshot_meta.index,
        applied_term: snapshot_meta.term,
        config,
        raw,
        machine,
        transport,
        inputs_rx,
        inputs_tx,
        status_tx,
        pending: BTreeMap::new(),
        reads_waiting: Vec::new(),
        reads: HashMap::new(),
        next_read_ctx: 0,
        snapshot_in_flight: false,
        last_status: Instant::now() - STATUS_INTERVAL,
        last_role: (StateRole::Follower, 0, 0),
        status_stale: false,
        last_gc: Instant::now(),
        watchers,
        leader_events,
        leading_term: None,
    };
    node.refresh_addresses();
    node.publish_status(true);
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || node.run())
        .map_err(|e| StartError::Config(format!("cannot start the raft thread: {e}")))?;
    Ok((handle, thread))
}

struct Loop {
    config: NodeConfig,
    raw: RawNode<LogStore>,
    machine: StateMachine,
    transport: Transport,
    inputs_rx: Receiver<Input>,
    /// For the snapshot writer thread to report back.
    inputs_tx: Sender<Input>,
    status_tx: watch::Sender<Arc<NodeStatus>>,
    /// The membership as of `applied`.
    conf_state: ConfState,
    applied: u64,
    applied_term: u64,
    /// Proposals by log index, with the term they were proposed in: the entry
    /// applied at that index is theirs iff its term matches (log matching).
    pending: BTreeMap<u64, (u64, Pending)>,
    /// Reads that arrived this turn, not yet given a read-index request.
    reads_waiting: Vec<(Reply<Arc<ReadView>>, Instant)>,
    /// Read batches by read-index context.
    reads: HashMap<u64, ReadBatch>,
    next_read_ctx: u64,
    snapshot_in_flight: bool,
    last_status: Instant,
    /// (role, term, leader) when status was last published.
    last_role: (StateRole, u64, u64),
    /// Membership changed since the status was last published.
    status_stale: bool,
    last_gc: Instant,
    watchers: Arc<TxWatchers>,
    leader_events: Arc<LeaderFeed>,
    /// The term this node leads and has announced to the driver.
    leading_term: Option<u64>,
}

impl Loop {
    fn run(mut self) {
        tracing::info!(
            id = self.config.id,
            applied = self.applied,
            voters = ?self.conf_state.voters,
            "raft loop started"
        );
        // A cluster of one has nobody to wait for: lead at once.
        if self.conf_state.voters == [self.config.id]
            && let Err(e) = self.raw.campaign()
        {
            tracing::warn!(error = %e, "cannot campaign");
        }
        let mut next_tick = Instant::now() + self.config.tick;
        'outer: loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.inputs_rx.recv_timeout(timeout) {
                Ok(input) => {
                    if !self.handle(input) {
                        break 'outer;
                    }
                    for _ in 0..INPUTS_PER_TURN {
                        match self.inputs_rx.try_recv() {
                            Ok(input) => {
                                if !self.handle(input) {
                                    break 'outer;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.config.tick;
                self.expire_reads(now);
                self.maybe_collect_garbage(now);
            }
            self.request_read_index();
            self.on_ready();
            self.track_leadership();
            self.answer_reads();
            self.maybe_snapshot();
            self.publish_status(false);
        }
        if let Err(e) = self.raw.store().sync() {
            tracing::error!(error = %e, "could not flush the raft log on shutdown");
        }
        self.leader_events.close();
        tracing::info!(id = self.config.id, "raft loop stopped");
    }

    /// Returns false when the loop must stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Propose { command, reply } => self.propose(command, Pending::Command(reply)),
            Input::ChangeMembership { change, reply } => self.change_membership(change, reply),
            Input::Read { reply, deadline } => self.reads_waiting.push((reply, deadline)),
            Input::Raft(messages) => {
                for mut message in messages {
                    self.clamp_heartbeat_commit(&mut message);
                    if let Err(e) = self.raw.step(message) {
                        tracing::debug!(error = %e, "dropped a raft message");
                    }
                }
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotSent { to, delivered } => {
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::SnapshotWritten(snapshot) => self.adopt_snapshot(*snapshot),
            Input::SnapshotFailed(error) => {
                self.snapshot_in_flight = false;
                tracing::error!(%error, "taking a snapshot failed; will retry");
            }
            Input::Shutdown => return false,
        }
        true
    }

    /// raft-rs panics when a heartbeat claims a commit index beyond this
    /// node's log — which happens when a node lost its data directory and the
    /// leader still remembers what it had. Commit hints are advisory, so the
    /// node lowers it and carries on; the operator must re-add it (remove,
    /// then add) for the leader to forget the stale progress.
    fn clamp_heartbeat_commit(&mut self, message: &mut Message) {
        if message.get_msg_type() != raft::eraftpb::MessageType::MsgHeartbeat {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        if message.commit > last {
            tracing::warn!(
                leader = message.from,
                claimed_commit = message.commit,
                last_index = last,
                "the leader believes this node holds entries it does not (data directory lost?); \
                 remove it from the cluster and add it again (`tandem cluster remove`, then `add`)"
            );
            message.commit = last;
        }
    }

    /// Tells the driver when this node starts or stops leading. It starts
    /// once an entry of its own term is applied: then its state machine holds
    /// every committed decision, so resuming from it misses nothing.
    fn track_leadership(&mut self) {
        let raft = &self.raw.raft;
        let leading = raft.state == StateRole::Leader && self.applied_term == raft.term;
        match (leading, self.leading_term) {
            (true, Some(term)) if term == raft.term => {}
            (true, _) => {
                let term = raft.term;
                self.leading_term = Some(term);
                let txs: Vec<Arc<Transaction>> = self
                    .machine
                    .active_gids()
                    .filter_map(|gid| self.machine.get(gid).cloned())
                    .collect();
                tracing::info!(
                    term,
                    unfinished = txs.len(),
                    "leading: resuming unfinished transactions"
                );
                self.leader_events
                    .leadership(LeaderEvent::Lead { term, txs });
                if self.machine.cluster_id().is_none() {
                    // The cluster's first leader names it (randomness on the
                    // proposing side; `apply` keeps the first name it sees).
                    let cluster_id = uuid::Uuid::new_v4();
                    tracing::info!(%cluster_id, "minting the cluster id");
                    self.propose(Command::InitCluster { cluster_id }, Pending::Internal);
                }
            }
            (false, Some(_)) if raft.state != StateRole::Leader => {
                self.leading_term = None;
                self.leader_events.leadership(LeaderEvent::Follow);
            }
            (false, _) => {}
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> NodeError {
        let leader_id = self.raw.raft.leader_id;
        NodeError::NotLeader {
            node_id: self.config.id,
            leader_id,
            leader_address: self.address_of(leader_id),
        }
    }

    fn address_of(&self, id: u64) -> Option<String> {
        self.machine
            .members()
            .get(&id)
            .or_else(|| self.config.peers.get(&id))
            .cloned()
    }

    fn propose(&mut self, command: Command, pending: Pending) {
        if !self.is_leader() {
            reply_err(pending, self.not_leader());
            return;
        }
        let data = codec::encode(&command);
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => self.track(pending),
            Err(raft::Error::ProposalDropped) => {
                reply_err(pending, NodeError::Overloaded(self.config.id))
            }
            Err(e) => {
                tracing::warn!(error = %e, "proposal refused by raft");
                reply_err(pending, NodeError::Overloaded(self.config.id));
            }
        }
    }

    /// Remembers who waits for the entry raft just appended.
    fn track(&mut self, pending: Pending) {
        let index = self.raw.raft.raft_log.last_index();
        let term = self.raw.raft.term;
        if let Some((_, old)) = self.pending.insert(index, (term, pending)) {
            // An older proposal at this index was overwritten by a newer leader's log.
            reply_err(old, NodeError::Unknown);
        }
    }

    fn change_membership(&mut self, change: MembershipChange, reply: Reply<ConfState>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.raw.raft.has_pending_conf() || !self.conf_state.voters_outgoing.is_empty() {
            let _ = reply.send(Err(NodeError::MembershipInProgress));
            return;
        }
        let voters = &self.conf_state.voters;
        let learners = &self.conf_state.learners;
        let known = |id: u64| voters.contains(&id) || learners.contains(&id);
        let (id, change_type, address) = match change {
            MembershipChange::AddLearner { id, address } => {
                if known(id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is already a member"
                    ))));
                    return;
                }
                (id, ConfChangeType::AddLearnerNode, Some(address))
            }
            MembershipChange::Promote { id } => {
                if !learners.contains(&id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is not a learner"
                    ))));
                    return;
                }
                (id, ConfChangeType::AddNode, None)
            }
            MembershipChange::Remove { id } => {
                if !known(id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is not a member"
                    ))));
                    return;
                }
                if voters.len() == 1 && voters.contains(&id) {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "node {id} is the only voter; a cluster needs one"
                    ))));
                    return;
                }
                if id == self.config.id {
                    // A leader cannot safely drive its own removal; hand over first.
                    match self.best_transferee() {
                        Some(to) => {
                            self.raw.transfer_leader(to);
                            let _ =
                                reply.send(Err(NodeError::TransferringLeadership { from: id, to }));
                        }
                        None => {
                            let _ = reply.send(Err(NodeError::Membership(
                                "no other voter is caught up to take over leadership".into(),
                            )));
                        }
                    }
                    return;
                }
                (id, ConfChangeType::RemoveNode, None)
            }
        };
        let mut cc = ConfChangeV2::default();
        let single = single_change(id, change_type);
        cc.set_changes(vec![single].into());
        // Joint consensus even for one change, leaving the joint state
        // automatically once it is committed.
        cc.set_transition(ConfChangeTransition::Implicit);
        let context = codec::encode(&MembershipContext { id, address });
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) => self.track(Pending::Membership(reply)),
            Err(e) => {
                let _ = reply.send(Err(NodeError::Membership(e.to_string())));
            }
        }
    }

    /// The voter other than this node with the most of the log.
    fn best_transferee(&self) -> Option<u64> {
        let me = self.config.id;
        self.conf_state
            .voters
            .iter()
            .filter(|&&id| id != me)
            .filter_map(|&id| self.raw.raft.prs().get(id).map(|p| (p.matched, id)))
            .max()
            .map(|(_, id)| id)
    }

    fn request_read_index(&mut self) {
        if self.reads_waiting.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            let err = self.not_leader();
            for (reply, _) in self.reads_waiting.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_le_bytes().to_vec());
        let replies = std::mem::take(&mut self.reads_waiting);
        self.reads.insert(
            ctx,
            ReadBatch {
                replies,
                term: self.raw.raft.term,
                read_index: None,
            },
        );
    }

    fn expire_reads(&mut self, now: Instant) {
        let term = self.raw.raft.term;
        let leader_known = self.raw.raft.leader_id != 0;
        let not_leader = self.not_leader();
        self.reads.retain(|_, batch| {
            // Raft drops read-index requests across leadership changes, and
            // a leader that stepped down (check-quorum) keeps its term: fail
            // unconfirmed reads fast so callers go elsewhere.
            let unconfirmable = batch.read_index.is_none() && (batch.term != term || !leader_known);
            let expired =
                batch.replies.iter().all(|(_, deadline)| *deadline <= now) || unconfirmable;

            if expired {
                for (reply, _) in batch.replies.drain(..) {
                    let _ = reply.send(Err(not_leader.clone()));
                }
            }
            !expired
        });
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, b)| b.read_index.is_some_and(|i| i <= applied))
            .map(|(ctx, _)| *ctx)
            .collect();
        if ready.is_empty() {
            return;
        }
        let view = self.view();
        for ctx in ready {
            if let Some(batch) = self.reads.remove(&ctx) {
                for (reply, _) in batch.replies {
                    let _ = reply.send(Ok(view.clone()));
                }
            }
        }
    }

    /// A view for readers. Built per read batch and never kept: the table is
    /// a persistent map, so a view still alive makes every later write copy
    /// the nodes it touches.
    fn view(&self) -> Arc<ReadView> {
        Arc::new(self.machine.view(self.applied))
    }

    fn on_ready(&mut self) {
        if !self.raw.has_ready() {
            return;
        }
        let mut ready = self.raw.ready();
        // 1. Messages that do not wait for our own write.
        self.transport.send(ready.take_messages());
        // 2. A snapshot from the leader.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot);
        }
        // 3. Committed entries (durable on a quorum already).
        self.apply(ready.take_committed_entries());
        // Linearizable reads whose leadership check completed.
        for state in ready.take_read_states() {
            let ctx =
                u64::from_le_bytes(state.request_ctx.as_slice().try_into().unwrap_or([0xff; 8]));
            if let Some(batch) = self.reads.get_mut(&ctx) {
                batch.read_index = Some(state.index);
            }
        }
        // 4. One durable write for the new entries and the hard state.
        if let Err(e) = self
            .raw
            .mut_store()
            .persist(ready.entries(), ready.hs(), ready.must_sync())
        {
            // Acknowledging anything after a failed write would break durability.
            panic!("writing the raft log failed: {e}");
        }
        // 5. Messages that promise what step 4 made durable.
        self.transport.send(ready.take_persisted_messages());
        // 6. Advance.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().note_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) {
        let meta = snapshot.get_metadata();
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing a snapshot from the leader"
        );
        if let Err(e) = self.raw.mut_store().install_snapshot(snapshot) {
            panic!("installing a snapshot failed: {e}");
        }
        self.machine = StateMachine::decode_snapshot(snapshot.get_data()).unwrap_or_else(|e| {
            panic!(
                "the leader's snapshot at {} cannot be read: {e}",
                meta.index
            )
        });
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.conf_state = meta.get_conf_state().clone();
        self.status_stale = true;
        // Entries up to the snapshot will never be applied here one by one.
        let resolved: Vec<u64> = self.pending.range(..=meta.index).map(|(i, _)| *i).collect();
        for index in resolved {
            if let Some((_, pending)) = self.pending.remove(&index) {
                reply_err(pending, NodeError::Unknown);
            }
        }
        self.refresh_addresses();
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.applied = entry.index;
            self.applied_term = entry.term;
            let ours = match self.pending.remove(&entry.index) {
                Some((term, pending)) if term == entry.term => Some(pending),
                Some((_, pending)) => {
                    reply_err(pending, NodeError::Unknown);
                    None
                }
                None => None,
            };
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        // A new leader's empty entry.
                        continue;
                    }
                    let command: Command = codec::decode(&entry.data).unwrap_or_else(|e| {
                        // Skipping a committed entry would make this replica diverge.
                        panic!(
                            "committed entry {} cannot be decoded ({e}); is this binary older than the log?",
                            entry.index
                        )
                    });
                    let ctx = ApplyContext {
                        index: entry.index,
                        term: entry.term,
                    };
                    let result = self.machine.apply(command, ctx);
                    if let Ok(Applied::ClusterId { .. }) = &result {
                        self.status_stale = true;
                    }
                    if let Some(tx) = result.as_ref().ok().and_then(|a| a.tx())
                        && tx.version == entry.index
                    {
                        self.watchers.notify(tx);
                        if self.leading_term.is_some() {
                            self.leader_events.changed(tx.clone());
                        }
                    }

                    match ours {
                        Some(Pending::Command(reply)) => {
                            let _ = reply.send(Ok(result));
                        }
                        Some(Pending::Internal) | None => {}
                        Some(Pending::Membership(reply)) => {
                            let _ = reply.send(Err(NodeError::Unknown));
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let result = self.apply_conf_change(&entry);
                    if let Some(Pending::Membership(reply)) = ours {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<ConfState, NodeError> {
        let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
            let mut v1 = ConfChange::default();
            #[allow(unused_mut)]
            v1.merge_from_bytes(&entry.data)
                .unwrap_or_else(|e| panic!("conf change at {} is corrupt: {e}", entry.index));
            // Tandem proposes only V2; a V1 entry is one simple change.
            let single = single_change(v1.node_id, v1.get_change_type());
            let mut v2 = ConfChangeV2::default();
            v2.set_changes(vec![single].into());
            v2.set_context(v1.take_context());
            v2
        } else {
            let mut v2 = ConfChangeV2::default();
            v2.merge_from_bytes(&entry.data)
                .unwrap_or_else(|e| panic!("conf change at {} is corrupt: {e}", entry.index));
            v2
        };
        let conf_state = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "a committed conf change was refused by raft");
                return Err(NodeError::Membership(e.to_string()));
            }
        };
        if let Ok(ctx) = codec::decode::<MembershipContext>(&entry.context) {
            for change in cc.get_changes() {
                if change.node_id != ctx.id {
                    continue;
                }
                match change.get_change_type() {
                    ConfChangeType::RemoveNode => self.machine.set_member(ctx.id, None),
                    _ => {
                        if let Some(address) = &ctx.address {
                            self.machine.set_member(ctx.id, Some(address.clone()));
                        }
                    }
                }
            }
        }
        tracing::info!(
            index = entry.index,
            voters = ?conf_state.voters,
            learners = ?conf_state.learners,
            outgoing = ?conf_state.voters_outgoing,
            "membership changed"
        );
        self.conf_state = conf_state.clone();
        self.status_stale = true;
        self.refresh_addresses();
        Ok(conf_state)
    }

    fn refresh_addresses(&self) {
        let mut book = self.config.peers.clone();
        book.extend(self.machine.members().iter().map(|(k, v)| (*k, v.clone())));
        self.transport.set_addresses(book);
    }

    fn maybe_snapshot(&mut self) {
        let last = self.raw.store().snapshot_meta().index;
        // Raft needed a snapshot the newest one cannot serve (a node added
        // since): take one now rather than at the next interval.
        let wanted = self.raw.store().take_snapshot_wanted() && self.applied > last;
        if self.snapshot_in_flight
            || (!wanted && self.applied < last + self.config.snapshot_interval_entries)
        {
            return;
        }

        self.snapshot_in_flight = true;
        let source = self.machine.snapshot_source();
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf_state.clone());
        let dir = self.raw.store().snapshot_dir().to_path_buf();
        let inputs = self.inputs_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                snapshot.set_data(source.encode().into());
                let input = match write_snapshot_file(&dir, &snapshot) {
                    Ok(path) => {
                        tracing::info!(
                            index = snapshot.get_metadata().index,
                            bytes = snapshot.get_data().len(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            path = %path.display(),
                            "snapshot written"
                        );
                        Input::SnapshotWritten(Box::new(snapshot))
                    }
                    Err(e) => Input::SnapshotFailed(e.to_string()),
                };
                let _ = inputs.send(input);
            });
        if let Err(e) = spawned {
            self.snapshot_in_flight = false;
            tracing::error!(error = %e, "cannot start the snapshot thread");
        }
    }

    fn adopt_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot_in_flight = false;
        let index = snapshot.get_metadata().index;
        let compact_to = (index + 1)
            .saturating_sub(self.config.log_retain_entries)
            .max(1);
        if let Err(e) = self.raw.mut_store().adopt_snapshot(snapshot, compact_to) {
            tracing::error!(error = %e, "compacting the raft log failed");
        }
    }

    /// On the leader: proposes the removal of finished transactions past
    /// their retention (or beyond the count limit).
    fn maybe_collect_garbage(&mut self, now: Instant) {
        if !self.is_leader() || now.duration_since(self.last_gc) < GC_INTERVAL {
            return;
        }
        self.last_gc = now;
        let before_ms = crate::clock::now_ms() - self.config.retention.as_millis() as i64;
        let gids = self.machine.gc_candidates(
            before_ms,
            self.config.finished_max,
            self.config.finished_bytes_max,
            validate::GC_BATCH_MAX,
        );
        if !gids.is_empty() {
            tracing::debug!(count = gids.len(), "collecting finished transactions");
            self.propose(Command::Gc { gids }, Pending::Internal);
        }
    }

    fn publish_status(&mut self, force: bool) {
        let raft = &self.raw.raft;
        let role_now = (raft.state, raft.term, raft.leader_id);
        let changed = role_now != self.last_role || self.status_stale;
        if !force && !changed && self.last_status.elapsed() < STATUS_INTERVAL {
            return;
        }
        self.status_stale = false;
        let role_changed = role_now != self.last_role;
        self.last_role = role_now;
        self.last_status = Instant::now();
        let id = self.config.id;
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if self.conf_state.learners.contains(&id) => Role::Learner,
            StateRole::Follower
                if !self.conf_state.voters.contains(&id)
                    && !self.conf_state.voters_outgoing.contains(&id) =>
            {
                Role::Detached
            }
            StateRole::Follower => Role::Follower,
        };
        let matched = if raft.state == StateRole::Leader {
            raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            BTreeMap::new()
        };
        let mut members = self.config.peers.clone();
        members.extend(self.machine.members().iter().map(|(k, v)| (*k, v.clone())));
        members.insert(id, self.config.address.clone());
        let status = NodeStatus {
            id,
            address: self.config.address.clone(),
            cluster_name: self.config.cluster_name.clone(),
            cluster_id: self.machine.cluster_id(),
            role,
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.raw.store().snapshot_meta().index,
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            members,
            matched,
            txs: self.machine.len(),
            active_txs: self.machine.active_count(),
            active_bytes: self.machine.active_bytes(),
        };
        if role_changed {
            tracing::info!(
                role = role.name(),
                term = status.term,
                leader = status.leader_id,
                "raft role changed"
            );
        }
        self.status_tx.send_replace(Arc::new(status));
    }
}

fn single_change(node_id: u64, change_type: ConfChangeType) -> ConfChangeSingle {
    let mut single = ConfChangeSingle {
        node_id,
        ..Default::default()
    };
    single.set_change_type(change_type);
    single
}

fn reply_err(pending: Pending, error: NodeError) {
    match pending {
        Pending::Command(reply) => {
            let _ = reply.send(Err(error));
        }
        Pending::Membership(reply) => {
            let _ = reply.send(Err(error));
        }
        Pending::Internal => {}
    }
}
