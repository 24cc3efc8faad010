//! The Raft loop: one OS thread owns the `RawNode`, its log store and the
//! state machine. Everything else talks to it through [`NodeHandle`] (an input
//! channel and a published status) — there is no shared mutable state.
//!
//! It is a thread, not a tokio task, because raft-engine's writes block on
//! fsync; a blocked task would stall a runtime worker on a 2-core machine.
//!
//! The loop is in two parts. [`Loop`] is everything a turn does — taking an
//! input, ticking, the Ready contract below, reads, snapshots, membership —
//! over a [`LogStorage`] and a [`PeerNet`], with the time passed in; it
//! blocks on nothing but its store's writes. [`Thread`] is the shell that
//! runs it on a node: it waits on the input channels, keeps the tick's
//! timer, gathers a group commit and runs snapshot jobs on their own
//! thread. The simulation (`sim/`) drives the same `Loop` over its own
//! disk, network and clock.
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
//!    proposers whose entries they are — a leader here, before its write
//!    (its proposers wait); a follower after step 5 instead, since the
//!    leader's commit waits on its acknowledgement and nobody on the
//!    follower waits on its apply;
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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, ReadOnlyOption, StateRole};
use tokio::sync::watch;

use super::handle::{Input, NodeError, NodeHandle, Reply};
use super::inbound::{Inbound, InboundLink, Inputs};
use super::reads::ReadBatch;
use super::replicated::{Observer, Replicated};
use super::status::NodeStatus;
use super::storage::{Bootstrap, LogStorage, LogStore, StoreError, write_snapshot_file};
use super::transport::{PeerEvent, PeerNet, Transport};
pub(super) use crate::codec;

/// Inputs handled in one turn before raft gets a chance to produce a Ready;
/// bounds the latency one turn adds.
const INPUTS_PER_TURN: usize = 4096;
/// Capacity of the input channel; beyond it callers get `Overloaded`.
pub const INPUT_QUEUE_MAX: usize = 65_536;
/// Admitted peer-wire links waiting for the loop to take them.
const LINKS_QUEUE_MAX: usize = 64;
/// A turn of the loop this long holds every proposal and peer message
/// behind it: it is counted and reported (at most once per
/// [`SLOW_TURN_REPORT_EVERY`]), with where its time went.
const SLOW_TURN: Duration = Duration::from_millis(50);
const SLOW_TURN_REPORT_EVERY: Duration = Duration::from_secs(1);
/// Delays the log write of a turn (tests: a slow disk).
pub const FAILPOINT_SLOW_LOG_WRITE: &str = "raft-slow-log-write";
/// Minimum gap between two status publications when nothing important changed.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_millis(20);

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
    /// The Raft group this node replicates (its key in the log engine):
    /// one per node today; several groups on one node are a matter of
    /// wiring, not of this loop.
    pub group: u64,
    pub tick: Duration,
    pub election_ticks: usize,
    /// The election timeout is drawn from `election_ticks` up to this
    /// (exclusive); `None`: twice `election_ticks`, raft's default. (The
    /// simulation fixes it: raft draws from its own random source.)
    pub election_ticks_max: Option<usize>,
    pub heartbeat_ticks: usize,
    /// Take a snapshot after this many entries have been applied since the last.
    pub snapshot_interval_entries: u64,
    /// Entries kept behind a snapshot, so a slightly lagging follower catches
    /// up from the log rather than by a whole snapshot.
    pub log_retain_entries: u64,
    /// Group commit: a log write that needs an fsync waits until at least
    /// this long after the previous one, gathering what arrives meanwhile
    /// into the same write. Zero writes as soon as a turn ends.
    pub group_commit_gap: Duration,
    /// The gap applies only after a write of at least this many entries:
    /// such a batch says proposals are arriving faster than fsyncs finish,
    /// so waiting gathers more. A smaller write means light load, where
    /// there is nothing to gather and the gap would only add latency.
    /// Zero: the gap always applies.
    pub group_commit_min_entries: usize,
}

/// Runs the calling thread at the lowest priority (nice 19): for work that
/// can wait, such as writing a snapshot. Encoding and writing one takes a
/// core for up to hundreds of milliseconds, and on a loaded machine every
/// saga in flight waited behind it (three nodes at 5,500 sagas/s: p99
/// 76-116 ms, 57-66 ms with snapshots off, 52-65 ms with this;
/// BENCHMARKS.md, seventh session). At nice 19 it takes the cores the hot
/// path leaves idle, and a little more under full load (the scheduler
/// starves no thread), so a snapshot still finishes; meanwhile the log
/// only grows, and no other snapshot starts.
fn yield_to_the_hot_path() {
    // SAFETY: a plain system call with no pointers; on Linux, `who` 0 with
    // PRIO_PROCESS names the calling thread only (nice is per thread).
    let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if lowered != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the snapshot thread's priority");
    }
}

/// What is waiting for the entry at a given log index.
pub(super) enum Pending<S: Replicated> {
    Command(Reply<S::Output>),
    Membership(Reply<ConfState>),
    /// Proposed by the loop itself (the observer's housekeeping); nobody waits.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the snapshot in the data directory cannot be read: {0}")]
    Snapshot(String),
    #[error("{0}")]
    Config(String),
}

/// Opens the data directory, starts the loop thread over state machine `S`
/// (told to `observer` as it changes) and returns the node's handle.
pub fn start<S: Replicated, O: Observer<S>>(
    config: NodeConfig,
    transport: Transport,
    observer: O,
) -> Result<(NodeHandle<S>, std::thread::JoinHandle<()>), StartError> {
    let inbound = Inbound::new()
        .map_err(|e| StartError::Config(format!("cannot make the raft loop's poll: {e}")))?;
    let bell = Some(inbound.bell());
    let (inputs_tx, inputs_rx) = crossbeam_channel::bounded(INPUT_QUEUE_MAX);
    let inputs_tx = Inputs::new(inputs_tx, bell.clone());
    let (peers_tx, peers_rx) = crossbeam_channel::bounded(INPUT_QUEUE_MAX);
    let peers_tx = Inputs::new(peers_tx, bell.clone());
    let (links_tx, links_rx) = crossbeam_channel::bounded(LINKS_QUEUE_MAX);
    let links_tx = super::lane::reads().then(|| Inputs::new(links_tx, bell));
    transport.set_loop(peers_tx, links_tx);
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
        let machine = S::founding(config.peers.clone());
        Some(Bootstrap {
            voters: config.peers.keys().copied().collect(),
            state: machine.snapshot()(),
        })
    };
    let store = LogStore::open(&config.data_dir, config.group, bootstrap)?;
    let machine = if store.snapshot_meta().index == 0 {
        S::founding(BTreeMap::new())
    } else {
        S::restore(store.snapshot_data()).map_err(StartError::Snapshot)?
    };
    let id = config.id;
    let (core, status) = Loop::new(config, store, machine, transport, observer)?;
    let handle = NodeHandle {
        inputs: inputs_tx.clone(),
        status,
        id,
        request_timeout: Duration::from_secs(10),
    };
    let thread = Thread {
        core,
        inputs_rx,
        peers_rx,
        links_rx,
        inbound,
        inputs_tx,
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || thread.run())
        .map_err(|e| StartError::Config(format!("cannot start the raft thread: {e}")))?;
    Ok((handle, thread))
}

/// A snapshot to finish off the loop: its metadata is set, its data is
/// encoded by `encode`; once durable it comes back as
/// `Input::SnapshotWritten` (or `SnapshotFailed`).
pub(crate) struct SnapshotJob {
    pub(crate) snapshot: Snapshot,
    pub(crate) encode: Box<dyn FnOnce() -> Vec<u8> + Send>,
}

/// The shell that runs a [`Loop`] on a node: the input channels, the tick's
/// timer, group commit and the snapshot thread.
struct Thread<S: Replicated, O: Observer<S>> {
    core: Loop<S, O, LogStore, Transport>,
    inputs_rx: Receiver<Input<S>>,
    /// What the transport delivers: peers' messages and delivery reports.
    /// A channel of its own, so that the transport knows nothing of the
    /// loop's inputs.
    peers_rx: Receiver<PeerEvent>,
    /// Plaintext peer-wire links, admitted, for the loop to read.
    links_rx: Receiver<InboundLink>,
    /// What the loop waits on: its links, and a doorbell its inputs ring.
    inbound: Inbound,
    /// For the snapshot writer thread to report back.
    inputs_tx: Inputs<Input<S>>,
}

/// One node's Raft state and everything a turn does with it (see the
/// module's documentation); driven by [`Thread`] on a node and by the
/// simulation.
pub(crate) struct Loop<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> {
    pub(super) config: NodeConfig,
    pub(super) raw: RawNode<St>,
    pub(super) machine: S,
    pub(super) transport: N,
    pub(super) status_tx: watch::Sender<Arc<NodeStatus>>,
    /// The membership as of `applied`.
    pub(super) conf_state: ConfState,
    pub(super) applied: u64,
    pub(super) applied_term: u64,
    /// Proposals by log index, with the term they were proposed in: the entry
    /// applied at that index is theirs iff its term matches (log matching).
    pub(super) pending: BTreeMap<u64, (u64, Pending<S>)>,
    /// Reads that arrived this turn, not yet given a read-index request.
    pub(super) reads_waiting: Vec<(Reply<Arc<S::View>>, Instant)>,
    /// Read batches by read-index context.
    /// Ordered: batches are answered, or failed, oldest first — and the
    /// same way every time (the simulation replays runs exactly).
    pub(super) reads: BTreeMap<u64, ReadBatch<S::View>>,
    pub(super) next_read_ctx: u64,
    /// A snapshot being written: `log_bytes_applied` when it was taken.
    pub(super) snapshot_in_flight: Option<u64>,
    /// A snapshot taken this turn, for the shell to finish.
    pub(super) snapshot_job: Option<SnapshotJob>,
    /// Snapshots failed in a row since the last one written, and the ticks
    /// left before the next may be taken ([`Loop::snapshot_failed`]).
    pub(super) snapshot_failures: u32,
    pub(super) snapshot_wait_ticks: u64,
    /// Log bytes applied since the node started (entry data and overhead).
    pub(super) log_bytes_applied: u64,
    /// `log_bytes_applied` at the newest snapshot's point.
    pub(super) log_bytes_at_snapshot: u64,
    /// When the log was last fsync'd, and how many entries that write
    /// carried (for the group-commit gap and its measure of load).
    pub(super) last_sync: Instant,
    pub(super) last_sync_entries: usize,
    /// The last turn's log write (with its fsync, if any) and entries
    /// applied: what a slow turn is reported with.
    pub(super) turn_write: Duration,
    pub(super) turn_applied: usize,
    pub(super) last_status: Instant,
    /// (role, term, leader) when status was last published.
    pub(super) last_role: (StateRole, u64, u64),
    /// Membership changed since the status was last published.
    pub(super) status_stale: bool,
    /// Hears what happens to the state (waiters, the driver's feed, the
    /// leader's housekeeping).
    pub(super) observer: O,
    /// The term this node leads and has told the observer.
    pub(super) leading_term: Option<u64>,
}

impl<S: Replicated, O: Observer<S>> Thread<S, O> {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.core.config.tick;
        let mut last_report: Option<Instant> = None;
        'outer: loop {
            self.wait(next_tick);
            let turn_started = Instant::now();
            let messages = self.inbound.read(&self.core.transport);
            if !messages.is_empty() && !self.core.handle(Input::Peer(PeerEvent::Raft(messages))) {
                break 'outer;
            }
            if !self.take_waiting() {
                break 'outer;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.core.tick(now);
                next_tick = now + self.core.config.tick;
            }
            if !self.gather_for_group_commit() {
                break 'outer;
            }
            let ending = Instant::now();
            if let Err(e) = self.core.end_turn() {
                // Acknowledging anything after a failed write would break durability.
                panic!("writing the raft log failed: {e}");
            }
            let took = turn_started.elapsed();
            if took >= SLOW_TURN {
                crate::metrics::slow_turn();
                if last_report.is_none_or(|at| at.elapsed() >= SLOW_TURN_REPORT_EVERY) {
                    last_report = Some(Instant::now());
                    tracing::warn!(
                        took_ms = took.as_millis() as u64,
                        inputs_ms = (ending - turn_started).as_millis() as u64,
                        log_write_ms = self.core.turn_write.as_millis() as u64,
                        applied = self.core.turn_applied,
                        "a turn of the raft loop took long; proposals waited behind it"
                    );
                }
            }
            if let Some(job) = self.core.take_snapshot_job() {
                self.write_snapshot(job);
            }
        }
        self.core.stop();
    }

    /// Handles the inputs already waiting, up to a turn's worth, and takes
    /// the links handed over. Returns false when the loop must stop.
    fn take_waiting(&mut self) -> bool {
        while let Ok(link) = self.links_rx.try_recv() {
            self.inbound.adopt(link);
        }
        for _ in 0..INPUTS_PER_TURN {
            let input = match self.inputs_rx.try_recv() {
                Ok(input) => input,
                Err(_) => match self.peers_rx.try_recv() {
                    Ok(event) => Input::Peer(event),
                    Err(_) => break,
                },
            };
            if !self.core.handle(input) {
                return false;
            }
        }
        true
    }

    /// Group commit: when new entries wait to be written, the previous
    /// write carried at least `group_commit_min_entries` (the load is
    /// high) and its fsync was less than `group_commit_gap` ago, sleeps
    /// until the gap has passed and then takes what arrived meanwhile, so
    /// it shares the write. Sleeping rather than waking for each arrival
    /// is the point: a thread woken per proposal costs a context switch
    /// each (most of a moderate load's CPU on a virtual machine), one
    /// woken per gap does not. Under light load the previous write was
    /// small, or its fsync long past, and nothing waits; under heavy load
    /// the fsyncs (each a device flush) are at most one per gap, and each
    /// carries more. Returns false when the loop must stop.
    fn gather_for_group_commit(&mut self) -> bool {
        let gap = self.core.config.group_commit_gap;
        if gap.is_zero()
            || !self.core.is_leader()
            || self.core.raw.raft.raft_log.unstable_entries().is_empty()
        {
            return true;
        }
        if self.core.last_sync_entries >= self.core.config.group_commit_min_entries {
            let wait = (self.core.last_sync + gap).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                crate::metrics::group_commit_wait();
                std::thread::sleep(wait);
            }
            return self.take_waiting();
        }
        true
    }

    /// Waits until an input, a link's bytes or `until`, whichever is
    /// first (not at all if inputs are waiting).
    fn wait(&mut self, until: Instant) {
        let timeout = until.saturating_duration_since(Instant::now());
        let (inputs, peers, links) = (&self.inputs_rx, &self.peers_rx, &self.links_rx);
        self.inbound.wait(timeout, || {
            inputs.is_empty() && peers.is_empty() && links.is_empty()
        });
    }

    /// Encodes and writes a snapshot on a thread of its own; the loop hears
    /// of it as an input.
    fn write_snapshot(&mut self, job: SnapshotJob) {
        let SnapshotJob {
            mut snapshot,
            encode,
        } = job;
        let dir = self.core.raw.store().snapshot_dir().to_path_buf();
        let inputs = self.inputs_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                yield_to_the_hot_path();
                let started = Instant::now();
                snapshot.set_data(encode().into());
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
            // Out of threads or memory: waited out like a failed write.
            self.core
                .snapshot_failed(&format!("cannot start the snapshot thread: {e}"));
        }
    }
}

impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    /// A loop over `store` (opened, with `machine` restored from its newest
    /// snapshot) and `transport`, and the receiver of the status it
    /// publishes. A cluster of one campaigns at once.
    pub(crate) fn new(
        config: NodeConfig,
        store: St,
        machine: S,
        transport: N,
        observer: O,
    ) -> Result<(Self, watch::Receiver<Arc<NodeStatus>>), StartError> {
        let snapshot_meta = store.snapshot_metadata();
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config
                .election_ticks_max
                .unwrap_or(2 * config.election_ticks),
            applied: snapshot_meta.index,
            check_quorum: true,
            pre_vote: true,
            batch_append: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 64 << 20,
            read_only_option: ReadOnlyOption::Safe,
            // A follower learns that its entries committed from the next
            // append or heartbeat instead of from an append of its own: at
            // moderate load that halves the messages and wake-ups per entry
            // (BENCHMARKS.md, sixth session). Nothing waits on a follower's
            // apply: reads ask the leader for the index (its heartbeat
            // round brings the commit), and a leader serves only once an
            // entry of its own term is applied.
            skip_bcast_commit: true,
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
        let mut node = Loop {
            conf_state: snapshot_meta.get_conf_state().clone(),
            applied: snapshot_meta.index,
            applied_term: snapshot_meta.term,
            config,
            raw,
            machine,
            transport,
            status_tx,
            pending: BTreeMap::new(),
            reads_waiting: Vec::new(),
            reads: BTreeMap::new(),
            next_read_ctx: 0,
            snapshot_in_flight: None,
            snapshot_job: None,
            snapshot_failures: 0,
            snapshot_wait_ticks: 0,
            log_bytes_applied: 0,
            log_bytes_at_snapshot: 0,
            last_sync: Instant::now(),
            last_sync_entries: 0,
            turn_write: Duration::ZERO,
            turn_applied: 0,
            last_status: Instant::now() - STATUS_INTERVAL,
            last_role: (StateRole::Follower, 0, 0),
            status_stale: false,
            observer,
            leading_term: None,
        };
        node.refresh_addresses();
        node.publish_status(true);
        tracing::info!(
            id = node.config.id,
            applied = node.applied,
            voters = ?node.conf_state.voters,
            "raft loop started"
        );
        // A cluster of one has nobody to wait for: lead at once.
        if node.conf_state.voters == [node.config.id]
            && let Err(e) = node.raw.campaign()
        {
            tracing::warn!(error = %e, "cannot campaign");
        }
        Ok((node, status_rx))
    }

    /// A tick of raft's logical clock, at `now`: elections and heartbeats,
    /// reads past their deadline, the observer's housekeeping.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.raw.tick();
        self.snapshot_wait_ticks = self.snapshot_wait_ticks.saturating_sub(1);
        self.expire_reads(now);
        let housekeeping = self
            .observer
            .tick(&self.machine, self.leading_term.is_some());
        if self.is_leader() {
            for data in housekeeping {
                self.propose(data, Pending::Internal);
            }
        }
    }

    /// What ends a turn, once its inputs are taken: read-index requests,
    /// the Ready contract, leadership, reads, snapshots, status. An error
    /// is a failed log write: the node must stop.
    pub(crate) fn end_turn(&mut self) -> Result<(), StoreError> {
        self.turn_write = Duration::ZERO;
        self.turn_applied = 0;
        self.request_read_index();
        self.on_ready()?;
        self.track_leadership();
        self.answer_reads();
        self.maybe_snapshot();
        self.publish_status(false);
        Ok(())
    }

    /// The snapshot this turn took, for the shell to encode and write.
    pub(crate) fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_job.take()
    }

    /// The loop stops: flushes the log and tells the observer.
    fn stop(&mut self) {
        if let Err(e) = self.raw.store().sync() {
            tracing::error!(error = %e, "could not flush the raft log on shutdown");
        }
        self.observer.closed();
        tracing::info!(id = self.config.id, "raft loop stopped");
    }

    /// Takes one input. Returns false when the loop must stop.
    pub(crate) fn handle(&mut self, input: Input<S>) -> bool {
        match input {
            Input::Propose { data, reply } => self.propose(data, Pending::Command(reply)),
            Input::ChangeMembership { change, reply } => self.change_membership(change, reply),
            // The bug the simulation's checker must catch
            // (tests/simulation.rs): a node answers from its own state
            // without asking the leader.
            #[cfg(feature = "injected-bug")]
            Input::Read { reply, .. } if crate::injected::on(crate::injected::Bug::StaleRead) => {
                let _ = reply.send(Ok(Arc::new(self.machine.view(self.applied))));
            }
            Input::Read { reply, deadline } => self.reads_waiting.push((reply, deadline)),
            Input::Peer(PeerEvent::Raft(messages)) => {
                for mut message in messages {
                    self.clamp_heartbeat_commit(&mut message);
                    if let Err(e) = self.raw.step(message) {
                        tracing::debug!(error = %e, "dropped a raft message");
                    }
                }
            }
            Input::Peer(PeerEvent::Unreachable(id)) => self.raw.report_unreachable(id),
            Input::Peer(PeerEvent::SnapshotSent { to, delivered }) => {
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::SnapshotWritten(snapshot) => {
                crate::metrics::snapshot_written();
                self.adopt_snapshot(*snapshot)
            }
            Input::SnapshotFailed(error) => self.snapshot_failed(&error),
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

    /// Tells the observer when this node starts or stops leading. It starts
    /// once an entry of its own term is applied: then its state machine holds
    /// every committed entry, so whoever resumes from it misses nothing.
    fn track_leadership(&mut self) {
        let raft = &self.raw.raft;
        let leading = raft.state == StateRole::Leader && self.applied_term == raft.term;
        match (leading, self.leading_term) {
            (true, Some(term)) if term == raft.term => {}
            (true, _) => {
                let term = raft.term;
                self.leading_term = Some(term);
                tracing::info!(term, "leading");
                for data in self.observer.lead(&self.machine, term) {
                    self.propose(data, Pending::Internal);
                }
            }
            (false, Some(_)) if raft.state != StateRole::Leader => {
                self.leading_term = None;
                self.observer.follow();
            }
            (false, _) => {}
        }
    }

    pub(super) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub(super) fn not_leader(&self) -> NodeError {
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

    fn propose(&mut self, data: Vec<u8>, pending: Pending<S>) {
        if !self.is_leader() {
            reply_err(pending, self.not_leader());
            return;
        }
        #[cfg(feature = "injected-bug")]
        let data_copy =
            crate::injected::on(crate::injected::Bug::ApplyBeforeCommit).then(|| data.clone());
        match self.raw.propose(Vec::new(), data) {
            // The bug the simulation's checker must catch
            // (tests/simulation.rs): the leader applies and answers before
            // the entry is committed.
            #[cfg(feature = "injected-bug")]
            Ok(())
                if data_copy.is_some()
                    && self.applied + 1 == self.raw.raft.raft_log.last_index() =>
            {
                let index = self.applied + 1;
                let term = self.raw.raft.term;
                let data = data_copy.expect("the bug is on");
                let output = self.machine.apply(&data, index, term);
                self.applied = index;
                self.applied_term = term;
                if let Pending::Command(reply) = pending {
                    let _ = reply.send(Ok(output));
                }
            }
            Ok(()) => {
                crate::metrics::proposals(1);
                self.track(pending)
            }
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
    pub(super) fn track(&mut self, pending: Pending<S>) {
        let index = self.raw.raft.raft_log.last_index();
        let term = self.raw.raft.term;
        if let Some((_, old)) = self.pending.insert(index, (term, pending)) {
            // An older proposal at this index was overwritten by a newer leader's log.
            reply_err(old, NodeError::Unknown);
        }
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // 1. Messages that do not wait for our own write.
        self.transport.send(ready.take_messages());
        // 2. A snapshot from the leader.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot);
        }
        // 3. Committed entries (durable on a quorum already) — now, or
        // after step 5 when a peer waits on this node's write (a
        // follower's acknowledgement, a vote): nobody on a follower waits
        // on its apply, while the leader's commit waits on that
        // acknowledgement. The leader applies first: its proposers wait.
        let mut committed = ready.take_committed_entries();
        if ready.persisted_messages().is_empty() {
            self.apply(std::mem::take(&mut committed));
        }
        // Linearizable reads whose leadership check completed.
        for state in ready.take_read_states() {
            let ctx =
                u64::from_le_bytes(state.request_ctx.as_slice().try_into().unwrap_or([0xff; 8]));
            if let Some(batch) = self.reads.get_mut(&ctx) {
                batch.read_index = Some(state.index);
            }
        }
        // The bug the simulation's checker must catch (tests/simulation.rs):
        // what promises the write leaves before it.
        #[cfg(feature = "injected-bug")]
        if crate::injected::on(crate::injected::Bug::AckBeforeDurable) {
            self.transport.send(ready.take_persisted_messages());
        }
        // 4. One durable write for the new entries and the hard state.
        let must_sync = ready.must_sync();
        let entries = ready.entries().len();
        let write_started = std::time::Instant::now();
        // A slow disk, for tests (`sleep(ms)`).
        fail::fail_point!(FAILPOINT_SLOW_LOG_WRITE);
        let written = self
            .raw
            .mut_store()
            .persist(ready.entries(), ready.hs(), must_sync);
        self.turn_write = write_started.elapsed();
        if must_sync {
            crate::metrics::fsync(self.turn_write);
            self.last_sync = Instant::now();
            self.last_sync_entries = entries;
        }
        // Nothing of this Ready may go further after a failed write.
        written?;
        // 5. Messages that promise what step 4 made durable, then what
        // step 3 left to apply.
        self.transport.send(ready.take_persisted_messages());
        self.apply(committed);
        // 6. Advance.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().note_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            self.turn_applied += 1;
            self.applied = entry.index;
            self.applied_term = entry.term;
            self.observer.entry_applied(entry.index, entry.term);
            self.log_bytes_applied +=
                entry.data.len() as u64 + super::snapshots::ENTRY_OVERHEAD_BYTES;
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
                    let output = self.machine.apply(&entry.data, entry.index, entry.term);
                    self.observer.applied(
                        &self.machine,
                        &output,
                        entry.index,
                        // Not `leading_term` alone: in the turn a leader
                        // steps down it still applies the new leader's
                        // entries, and its driver must not start workers
                        // for them (a worker running ahead on a deposed
                        // node could make the real leader's exact decision
                        // wrong).
                        self.is_leader() && self.leading_term.is_some(),
                    );
                    match ours {
                        Some(Pending::Command(reply)) => {
                            let _ = reply.send(Ok(output));
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
}

/// What the simulation reads of a loop it drives.
#[cfg(feature = "sim")]
impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    pub(crate) fn machine(&self) -> &S {
        &self.machine
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// The membership as of the applied index.
    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Leads, and has told the observer so (an entry of its term applied).
    pub(crate) fn leading(&self) -> bool {
        self.is_leader() && self.leading_term.is_some()
    }

    pub(crate) fn raft(&self) -> &raft::Raft<St> {
        &self.raw.raft
    }
}

pub(super) fn reply_err<S: Replicated>(pending: Pending<S>, error: NodeError) {
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
