//! What a node's real code runs on in the simulation: for the Raft loop
//! (`raft::Loop`) a disk in memory that a crash can tear and a network that
//! hands its messages to the simulated one; for the driver
//! (`driver::Driver`) a branch transport whose calls the simulated network
//! carries to simulated participants, and a wall clock that can jump; and
//! beside the node's own observer (`replica::ReplicaObserver`: waiters, the
//! driver's feed, the leader's housekeeping) ears that report what the loop
//! applied to the checker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use raft::eraftpb::{ConfState, Entry, HardState, Message, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tokio::sync::oneshot;

use crate::branch::{BranchCall, BranchTransport};
use crate::clock::Clock;
use crate::model::ApplyResult;
use crate::model::command::OpOutcome;
use crate::model::types::{Fence, Op};
use crate::raft::storage::{
    BOOTSTRAP_INDEX, BOOTSTRAP_TERM, LogStorage, StoreError, adopts, raise_to_snapshot,
    snapshot_serves,
};
use crate::raft::transport::PeerNet;
use crate::raft::{Observer, Replicated};
use crate::replica::ReplicaObserver;
use crate::state::StateMachine;

/// Crashes in the middle of a log write, drawn per write from the seed
/// (one source for the whole cluster, so a run draws them in event order).
pub(super) struct Tears {
    rng: StdRng,
    /// The chance that a write tears.
    pub(super) chance: f64,
    /// How many more this run may have.
    pub(super) left: u32,
}

impl Tears {
    pub(super) fn new(seed: u64, chance: f64, left: u32) -> Arc<Mutex<Tears>> {
        Arc::new(Mutex::new(Tears {
            rng: StdRng::seed_from_u64(seed ^ 0x7465_6172),
            chance,
            left,
        }))
    }

    /// Heads or tails, from the same source.
    fn coin(&mut self) -> bool {
        self.rng.random_bool(0.5)
    }

    /// `Some(kept)` if this write tears: the node dies while it is under
    /// way, and the write is kept or lost whole (raft-engine writes a batch
    /// as one checksummed record and drops a torn tail on recovery).
    fn draw(&mut self) -> Option<bool> {
        if self.left == 0 || self.chance <= 0.0 || !self.rng.random_bool(self.chance) {
            return None;
        }
        self.left -= 1;
        Some(self.rng.random_bool(0.5))
    }
}

/// A node's disk: what `LogStore` keeps in raft-engine and snapshot files,
/// kept the same way — entries after a truncation mark, the hard state,
/// the newest snapshot — and shared by the running loop and the node that
/// outlives its crashes.
#[derive(Clone)]
pub(super) struct Disk(Arc<Mutex<DiskState>>);

struct DiskState {
    hard_state: HardState,
    /// The commit index as of the last synced write: a write without sync
    /// (only ever a new commit index: entries, term and vote are synced)
    /// is lost if the node crashes before the next one.
    synced_commit: u64,
    /// Index and term of the last entry compaction (or a snapshot) removed.
    truncated: (u64, u64),
    /// The entries from `truncated.0 + 1` on.
    entries: Vec<Entry>,
    snapshot: Snapshot,
    /// Raft asked for a snapshot the newest cannot serve.
    wanted: bool,
    /// A synced write happened in the loop's current turn: what it sends
    /// afterwards waited for the disk.
    synced: bool,
    /// The node crashed in its last write: whether the write was kept.
    torn: Option<bool>,
    tears: Arc<Mutex<Tears>>,
    /// Promises the node sent that its disk did not hold yet (see
    /// `broken_promise`), for the checker.
    broken: Vec<String>,
}

impl Disk {
    /// Promises the node sent before its disk held them.
    pub(super) fn take_broken(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().broken)
    }

    /// An empty disk (a node that joins later), or a founding member's,
    /// with the bootstrap snapshot `LogStore` writes (index 1, `voters`).
    pub(super) fn new(voters: Option<&[u64]>, tears: Arc<Mutex<Tears>>) -> Disk {
        let mut state = DiskState {
            hard_state: HardState::default(),
            synced_commit: 0,
            truncated: (0, 0),
            entries: Vec::new(),
            snapshot: Snapshot::default(),
            wanted: false,
            synced: false,
            torn: None,
            tears,
            broken: Vec::new(),
        };
        if let Some(voters) = voters {
            let mut snap = Snapshot::default();
            snap.set_data(Replicated::snapshot(&StateMachine::new(BTreeMap::new()))().into());
            let meta = snap.mut_metadata();
            meta.index = BOOTSTRAP_INDEX;
            meta.term = BOOTSTRAP_TERM;
            meta.set_conf_state(ConfState::from((voters.to_vec(), vec![])));
            state.snapshot = snap;
            state.truncated = (BOOTSTRAP_INDEX, BOOTSTRAP_TERM);
            state.hard_state.term = BOOTSTRAP_TERM;
            state.hard_state.commit = BOOTSTRAP_INDEX;
            state.synced_commit = BOOTSTRAP_INDEX;
        }
        Disk(Arc::new(Mutex::new(state)))
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.0.lock().expect("the simulation runs on one thread")
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        self.lock().snapshot.clone()
    }

    /// A turn of the loop begins.
    pub(super) fn begin_turn(&self) {
        self.lock().synced = false;
    }

    /// Whether the last write tore, and if so whether it was kept.
    pub(super) fn take_torn(&self) -> Option<bool> {
        self.lock().torn.take()
    }

    /// The node crashed: what it wrote without a sync since its last synced
    /// write (a commit index) is lost or kept, as the seed draws it.
    /// Returns whether something was lost.
    pub(super) fn crash(&self) -> bool {
        let mut state = self.lock();
        let lost = state.hard_state.commit > state.synced_commit
            && state.tears.lock().expect("one thread").coin();
        if lost {
            // Never below the snapshot: `LogStore` raises it to that on open.
            let floor = state.snapshot.get_metadata().index;
            state.hard_state.commit = state.synced_commit.max(floor);
        }
        lost
    }
}

impl DiskState {
    /// Durability (§4.4) at the instant of the promise: a node that
    /// acknowledges an append, or grants a vote, must hold what it promises
    /// on its disk already — a crash right after must not take it back.
    /// (Whether such a crash then loses a committed entry takes a rarer
    /// run of faults; this sees the broken promise itself, in any run.)
    /// Everything but the commit index is synced here, so what the disk
    /// holds is what the loop wrote.
    fn broken_promise(&self, m: &Message) -> Option<String> {
        use raft::eraftpb::MessageType;
        match m.get_msg_type() {
            MessageType::MsgAppendResponse if !m.reject => {
                let held = m.index <= self.last_index();
                (!held).then(|| {
                    format!(
                        "durability: node {} acknowledged entry {} before it was durable (its log ends at {})",
                        m.from,
                        m.index,
                        self.last_index()
                    )
                })
            }
            MessageType::MsgRequestVoteResponse if !m.reject => {
                let hs = &self.hard_state;
                let held = hs.term == m.term && hs.vote == m.to;
                (!held).then(|| {
                    format!(
                        "durability: node {} granted its vote to {} in term {} before the vote was durable",
                        m.from, m.to, m.term
                    )
                })
            }
            _ => None,
        }
    }

    fn first_index(&self) -> u64 {
        self.truncated.0 + 1
    }

    fn last_index(&self) -> u64 {
        self.truncated.0 + self.entries.len() as u64
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }
}

impl raft::Storage for Disk {
    fn initial_state(&self) -> raft::Result<RaftState> {
        // As `LogStore`: the membership as of the snapshot; committed
        // changes after it are applied again on start.
        let state = self.lock();
        Ok(RaftState::new(
            state.hard_state.clone(),
            state.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let state = self.lock();
        if low < state.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > state.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let first = state.first_index();
        let mut entries = state.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.lock().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.lock().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.lock().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut state = self.lock();
        if !snapshot_serves(state.snapshot.get_metadata(), request_index, to) {
            state.wanted = true;
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(state.snapshot.clone())
    }
}

impl LogStorage for Disk {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let torn = state.tears.lock().expect("one thread").draw();
        if torn == Some(false) {
            state.torn = torn;
            return Err(StoreError::CrashedMidWrite);
        }
        if let Some(first) = entries.first() {
            // A conflicting append replaces the tail.
            let keep = first.index.saturating_sub(state.first_index()) as usize;
            state.entries.truncate(keep);
            state.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            state.hard_state = hs.clone();
        }
        if torn.is_some() {
            // Kept whole, as a synced write.
            state.synced_commit = state.hard_state.commit;
            state.torn = torn;
            return Err(StoreError::CrashedMidWrite);
        }
        if sync {
            state.synced_commit = state.hard_state.commit;
        }
        state.synced |= sync;
        Ok(())
    }

    fn note_commit(&mut self, commit: u64) {
        let mut state = self.lock();
        state.hard_state.commit = state.hard_state.commit.max(commit);
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut state = self.lock();
        let meta = snapshot.get_metadata();
        state.truncated = (meta.index, meta.term);
        raise_to_snapshot(&mut state.hard_state, meta);
        state.entries.clear();
        state.snapshot = snapshot.clone();
        state.synced = true;
        state.synced_commit = state.hard_state.commit;
        Ok(())
    }

    fn adopt_snapshot(&mut self, snapshot: Snapshot, compact_to: u64) -> Result<(), StoreError> {
        let mut state = self.lock();
        let index = snapshot.get_metadata().index;
        if !adopts(state.snapshot.get_metadata().index, index, compact_to) {
            return Ok(());
        }
        let term = snapshot.get_metadata().term;
        state.snapshot = snapshot;
        if compact_to > state.first_index() {
            let last = compact_to - 1;
            let last_term = state.term(last).unwrap_or(term);
            let drop = ((compact_to - state.first_index()) as usize).min(state.entries.len());
            state.entries.drain(..drop);
            state.truncated = (last, last_term);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.lock().snapshot.get_metadata().clone()
    }

    fn snapshot_index(&self) -> u64 {
        self.lock().snapshot.get_metadata().index
    }

    fn snapshot_len(&self) -> usize {
        self.lock().snapshot.get_data().len()
    }

    fn take_snapshot_wanted(&self) -> bool {
        std::mem::take(&mut self.lock().wanted)
    }
}

/// The loop's side of the simulated network: what it sends, collected for
/// the world to deliver after the turn, each with whether it left after a
/// synced write (then it waited for the disk).
#[derive(Clone)]
pub(super) struct Net {
    pub(super) out: Arc<Mutex<Vec<(Message, bool)>>>,
    pub(super) disk: Disk,
}

impl PeerNet for Net {
    fn send(&self, messages: Vec<Message>) {
        let mut disk = self.disk.lock();
        for m in &messages {
            if let Some(broken) = disk.broken_promise(m) {
                disk.broken.push(broken);
            }
        }
        let after_sync = disk.synced;
        drop(disk);
        self.out
            .lock()
            .expect("one thread")
            .extend(messages.into_iter().map(|m| (m, after_sync)));
    }

    fn set_addresses(&self, _addresses: BTreeMap<u64, String>) {}
}

/// What the loop told its observer, for the checker.
#[derive(Clone, Debug)]
pub(super) enum Heard {
    Entry {
        index: u64,
        term: u64,
    },
    Membership {
        index: u64,
        conf: Option<ConfState>,
        stepped_down: bool,
    },
    /// A snapshot from the leader replaced the state.
    Restored,
    /// The node leads a term (its driver resumes).
    Lead,
}

/// What the checker hears of a node's loop, collected for the world.
#[derive(Clone, Default)]
pub(super) struct Ears(pub(super) Arc<Mutex<Vec<Heard>>>);

impl Ears {
    fn hear(&self, heard: Heard) {
        self.0.lock().expect("one thread").push(heard);
    }
}

/// A simulated node's observer: the node's own (`ReplicaObserver`), and
/// the checker's ears beside it.
pub(super) struct Observers {
    pub(super) replica: ReplicaObserver,
    pub(super) ears: Ears,
}

impl Observer<StateMachine> for Observers {
    fn applied(&mut self, state: &StateMachine, output: &ApplyResult, index: u64, leading: bool) {
        self.replica.applied(state, output, index, leading);
    }

    fn lead(&mut self, state: &StateMachine, term: u64) -> Vec<Vec<u8>> {
        self.ears.hear(Heard::Lead);
        self.replica.lead(state, term)
    }

    fn follow(&mut self) {
        self.replica.follow();
    }

    fn tick(&mut self, state: &StateMachine, leading: bool) -> Vec<Vec<u8>> {
        self.replica.tick(state, leading)
    }

    fn restored(&mut self, state: &StateMachine) {
        self.ears.hear(Heard::Restored);
        self.replica.restored(state);
    }

    fn closed(&mut self) {
        self.replica.closed();
    }

    fn entry_applied(&mut self, index: u64, term: u64) {
        self.ears.hear(Heard::Entry { index, term });
    }

    fn membership_changed(&mut self, index: u64, conf: Option<&ConfState>, stepped_down: bool) {
        self.ears.hear(Heard::Membership {
            index,
            conf: conf.cloned(),
            stepped_down,
        });
    }
}

/// A node's wall clock: the simulated time since the start, from an epoch,
/// plus the node's own jumps.
pub(super) struct SimClock {
    pub(super) start: tokio::time::Instant,
    pub(super) epoch_ms: i64,
    pub(super) offset_ms: Arc<AtomicI64>,
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        let since = tokio::time::Instant::now() - self.start;
        self.epoch_ms + since.as_millis() as i64 + self.offset_ms.load(Ordering::Relaxed)
    }
}

/// A call the driver made, for the world to carry to its participant; the
/// answer goes back on `reply`.
pub(super) struct OutCall {
    pub(super) node: u64,
    pub(super) gid: String,
    pub(super) branch_id: String,
    pub(super) op: Op,
    pub(super) fence: Fence,
    pub(super) endpoint: String,
    pub(super) reply: oneshot::Sender<OpOutcome>,
}

/// The driver's branch transport in the simulation: each call is handed to
/// the world, which carries it (or loses it); no answer within the call's
/// timeout is a transient failure, as over HTTP.
pub(super) struct SimCaller {
    pub(super) node: u64,
    pub(super) out: Arc<Mutex<Vec<OutCall>>>,
}

impl BranchTransport for SimCaller {
    fn call(&self, call: BranchCall<'_>) -> impl std::future::Future<Output = OpOutcome> + Send {
        let (reply, answer) = oneshot::channel();
        self.out.lock().expect("one thread").push(OutCall {
            node: self.node,
            gid: call.gid.to_string(),
            branch_id: call.branch_id.to_string(),
            op: call.op,
            fence: call.fence,
            endpoint: call.endpoint.to_string(),
            reply,
        });
        let timeout = call.timeout;
        async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(outcome)) => outcome,
                _ => OpOutcome::Transient("timed out".into()),
            }
        }
    }
}
