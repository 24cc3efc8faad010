//! Durable Raft state: the log and hard state in TiKV's raft-engine, and
//! state-machine snapshots as checksummed files. Implements `raft::Storage`.
//!
//! Layout of a data directory:
//! * `raft-log/` — raft-engine files: entries, the hard state, and the
//!   `truncated` mark (index and term of the last entry compaction removed).
//! * `snapshots/snap-<index>-<term>.snap` — the newest state-machine snapshot
//!   (older ones are deleted once a newer one is durable).
//! * `raft-log.mark` — what the log held after its last fsync
//!   ([`super::sync_mark`]): a log found shorter than it, or a hard state
//!   behind it, lost records that were durable, and the node refuses to
//!   start.
//!
//! Crash safety rests on two orderings: a snapshot file is durable (written to
//! a temporary name, fsync'd, renamed, directory fsync'd) before the log is
//! compacted behind it or cleaned for it; and a snapshot installed from the
//! leader replaces the log, hard state and truncated mark in one raft-engine
//! batch. `open` repairs the one gap left — a crash after the file but before
//! that batch — by cleaning a log that does not continue the snapshot.

use std::cell::Cell;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command as EngineCommand, Engine, LogBatch, MessageExt};

use super::entry_cache::EntryCache;
use super::log_files::LogFiles;
use super::sync_mark::{Mark, SyncMark};

/// Delays the purge of the log's old files (tests: a slow disk).
pub const FAILPOINT_SLOW_PURGE: &str = "raft-slow-log-purge";
/// Fails a snapshot's write (tests: a full or failing disk).
pub const FAILPOINT_SNAPSHOT_WRITE: &str = "raft-snapshot-write";
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
const SNAPSHOT_MAGIC: &[u8; 8] = b"TNDMSNP1";
/// Snapshot files larger than this are refused when read (a corrupt length
/// must not make us allocate the machine's memory).
const SNAPSHOT_BYTES_MAX: u64 = 8 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log: {0}")]
    Engine(#[from] raft_engine::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {problem}")]
    CorruptSnapshot { path: PathBuf, problem: String },
    #[error("raft log: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    #[error(
        "raft log {dir}: corrupt — it lost {lost}, which were fsync'd (the sync mark says so); \
         the engine cut a corrupted tail on open. This node may have acknowledged what it no \
         longer has, so it refuses to start: `tandem cluster remove` it, empty its data \
         directory, start it with --join and `tandem cluster add` it again; it re-syncs from the leader"
    )]
    LostDurable { dir: PathBuf, lost: String },
    /// The simulation crashed the node in the middle of this write (what
    /// reached the disk is kept or lost whole).
    #[cfg(feature = "sim")]
    #[error("the node crashed in the middle of a log write")]
    CrashedMidWrite,
}

/// What the Raft loop needs of its durable store beyond what raft itself
/// reads (`raft::Storage`): [`LogStore`] (raft-engine and snapshot files)
/// on a node, memory in the simulation — the same loop runs over both.
pub trait LogStorage: raft::Storage {
    /// Appends entries and records the hard state in one write, fsync'd
    /// when `sync`. An error means the write may or may not have reached
    /// the disk; the node must stop.
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError>;

    /// Notes a commit index learnt after a Ready; written with the next
    /// write (losing it in a crash is harmless: it is relearnt).
    fn note_commit(&mut self, commit: u64);

    /// Installs a snapshot received from the leader in place of the log.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// Adopts a snapshot this node made itself (already durable) and
    /// compacts the log up to `compact_to` (exclusive), which must not pass
    /// the snapshot.
    fn adopt_snapshot(&mut self, snapshot: Snapshot, compact_to: u64) -> Result<(), StoreError>;

    /// Flushes everything written without sync (on shutdown).
    fn sync(&self) -> Result<(), StoreError>;

    /// The newest snapshot's metadata (index, term, membership).
    fn snapshot_metadata(&self) -> SnapshotMetadata;

    fn snapshot_index(&self) -> u64;

    /// The newest snapshot's size in bytes (what taking the next costs).
    fn snapshot_len(&self) -> usize;

    /// Whether raft needed a newer snapshot than the store has; clears the flag.
    fn take_snapshot_wanted(&self) -> bool;
}

/// Whether the newest snapshot (`meta`) can serve raft's request for one at
/// `request_index` or later to node `to`: a node added after the snapshot
/// would refuse it, since it is not in the snapshot's configuration. When
/// it cannot, the store notes that a fresh snapshot is wanted. (Every
/// `LogStorage` serves snapshots by this rule.)
pub fn snapshot_serves(meta: &SnapshotMetadata, request_index: u64, to: u64) -> bool {
    let conf = meta.get_conf_state();
    let includes_receiver = conf.voters.contains(&to) || conf.learners.contains(&to);
    meta.index >= request_index.max(1) && includes_receiver
}

/// The hard state once a snapshot from the leader is installed: its commit
/// and term at least the snapshot's.
pub fn raise_to_snapshot(hard_state: &mut HardState, meta: &SnapshotMetadata) {
    hard_state.commit = hard_state.commit.max(meta.index);
    hard_state.term = hard_state.term.max(meta.term);
}

/// Whether a snapshot this node made (at `index`) replaces the newest one
/// (at `newest`); a compaction up to `compact_to` must not pass it.
pub fn adopts(newest: u64, index: u64, compact_to: u64) -> bool {
    assert!(
        compact_to <= index + 1,
        "compaction would pass the snapshot"
    );
    index > newest
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// The initial state of a brand-new cluster member.
pub struct Bootstrap {
    pub voters: Vec<u64>,
    /// The state machine at index 1 (the members' addresses), encoded.
    pub state: Vec<u8>,
}

/// Index of the bootstrap snapshot. Every founding member starts from the same
/// snapshot at this index, so a node that joins later (empty log, index 0)
/// always needs a snapshot or the log from here on.
pub const BOOTSTRAP_INDEX: u64 = 1;
pub const BOOTSTRAP_TERM: u64 = 1;

pub struct LogStore {
    /// Shared with the thread that purges old log files.
    engine: Arc<Engine<LogFiles>>,
    /// The purge of old log files started last (see `purge_in_background`);
    /// the store waits for it when dropped, so the engine (and its lock on
    /// the directory) goes with the store.
    purge: Option<std::thread::JoinHandle<()>>,
    /// The Raft group this store holds in the engine (raft-engine
    /// multiplexes groups by id).
    group: u64,
    hard_state: HardState,
    /// Index and term of the last entry compaction removed; `first_index` is
    /// one past it, and raft needs its term to match the next append.
    truncated: (u64, u64),
    /// The newest snapshot, data included, for followers that need it.
    snapshot: Snapshot,
    snap_dir: PathBuf,
    /// Set when raft asked for a snapshot the newest one cannot serve (it
    /// predates the receiver joining); the loop then takes a fresh one.
    snapshot_wanted: Cell<bool>,
    /// What the log held after its last fsync.
    mark: SyncMark,
    /// The log's newest entries, for Raft's reads of what it just wrote.
    cache: EntryCache,
    /// The batch every append is encoded into, kept so its buffer keeps its
    /// size: raft-engine empties a batch it wrote, and a new one starts at
    /// 4 KiB and grows by copying while the entries are encoded into it.
    batch: LogBatch,
}

impl Drop for LogStore {
    fn drop(&mut self) {
        if let Some(running) = self.purge.take() {
            let _ = running.join();
        }
    }
}

impl LogStore {
    /// Lets raft-engine recycle the log files compaction emptied (and
    /// rewrite what little older files still hold), on a thread of its
    /// own: done on the loop, it took up to ~70 ms at a time, during which
    /// every proposal waited (BENCHMARKS.md, thirteenth session). One purge
    /// at a time: files a running purge misses go with the next one. A
    /// failed purge leaves files behind, nothing else, so it is reported,
    /// not fatal.
    fn purge_in_background(&mut self) {
        if self.purge.as_ref().is_some_and(|p| !p.is_finished()) {
            return;
        }
        if let Some(done) = self.purge.take() {
            let _ = done.join();
        }
        let engine = self.engine.clone();
        let purge = move || {
            fail::fail_point!(FAILPOINT_SLOW_PURGE);
            if let Err(e) = engine.purge_expired_files() {
                tracing::warn!(error = %e, "could not purge the raft log's old files");
            }
        };
        match std::thread::Builder::new()
            .name("log-purge".into())
            .spawn(purge)
        {
            Ok(running) => self.purge = Some(running),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the log purge thread; old log files stay")
            }
        }
    }

    /// Opens (creating if needed) the store under `dir`. `bootstrap` seeds an
    /// empty store as a founding member; without it an empty store waits for a
    /// leader to send a snapshot (joining an existing cluster).
    pub fn open(
        dir: &Path,
        group: u64,
        bootstrap: Option<Bootstrap>,
    ) -> Result<LogStore, StoreError> {
        let log_dir = dir.join("raft-log");
        let snap_dir = dir.join("snapshots");
        fs::create_dir_all(&log_dir).map_err(io_err(&log_dir))?;
        fs::create_dir_all(&snap_dir).map_err(io_err(&snap_dir))?;
        let config = raft_engine::Config {
            dir: log_dir.to_string_lossy().into_owned(),
            // The engine may rewrite or purge files once they exceed this;
            // compaction behind snapshots keeps the live log far smaller.
            purge_threshold: raft_engine::ReadableSize::gb(1),
            target_file_size: raft_engine::ReadableSize::mb(64),
            // Entries are small and the disk's bandwidth is not the limit;
            // LZ4 on every large batch only costs the Raft thread CPU.
            batch_compression_threshold: raft_engine::ReadableSize(0),

            ..Default::default()
        };
        let engine = Arc::new(Engine::open_with_file_system(
            config,
            Arc::new(LogFiles::default()),
        )?);
        let hard_state = engine
            .get_message::<HardState>(group, KEY_HARD_STATE)?
            .unwrap_or_default();
        let truncated = engine
            .get(group, KEY_TRUNCATED)
            .map(|v| decode_pair(&v))
            .unwrap_or((0, 0));
        let (mark, marked) = SyncMark::open(dir)?;
        let snapshot = load_newest_snapshot(&snap_dir)?.unwrap_or_default();
        let mut store = LogStore {
            engine,
            purge: None,
            group,
            hard_state,
            truncated,
            snapshot,
            snap_dir,
            snapshot_wanted: Cell::new(false),
            mark,
            cache: EntryCache::default(),
            batch: LogBatch::default(),
        };
        // Before anything is written: the log as the engine recovered it.
        if let Some(lost) = marked.and_then(|m| m.lost_by(&store.durable_now())) {
            return Err(StoreError::LostDurable { dir: log_dir, lost });
        }
        let fresh = store.snapshot.get_metadata().index == 0
            && store.hard_state == HardState::default()
            && store.engine.last_index(group).is_none();
        match bootstrap {
            Some(bootstrap) if fresh => store.bootstrap(bootstrap)?,
            _ => store.reconcile_with_snapshot()?,
        }
        store.record_mark()?;
        Ok(store)
    }

    /// What the log holds now, in the sync mark's terms.
    fn durable_now(&self) -> Mark {
        Mark {
            last_index: self.last_index_raw(),
            term: self.hard_state.term,
            vote: self.hard_state.vote,
        }
    }

    /// Records what the log holds now as durable: call after an fsync'd
    /// write.
    fn record_mark(&mut self) -> Result<(), StoreError> {
        self.mark.record(self.durable_now())
    }

    fn bootstrap(&mut self, bootstrap: Bootstrap) -> Result<(), StoreError> {
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = BOOTSTRAP_INDEX;
        meta.term = BOOTSTRAP_TERM;
        meta.mut_conf_state().set_voters(bootstrap.voters);
        snapshot.set_data(bootstrap.state.into());
        write_snapshot_file(&self.snap_dir, &snapshot)?;
        self.hard_state.term = BOOTSTRAP_TERM;
        self.hard_state.commit = BOOTSTRAP_INDEX;
        self.truncated = (BOOTSTRAP_INDEX, BOOTSTRAP_TERM);
        let mut batch = LogBatch::default();
        batch.put_message(self.group, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        batch.put(
            self.group,
            KEY_TRUNCATED.to_vec(),
            encode_pair(self.truncated),
        )?;
        self.engine.write(&mut batch, true)?;
        self.snapshot = snapshot;
        Ok(())
    }

    /// Makes the log continue the newest snapshot: if a crash came between
    /// writing a received snapshot and replacing the log, the old log is
    /// cleaned now.
    fn reconcile_with_snapshot(&mut self) -> Result<(), StoreError> {
        let meta = self.snapshot.get_metadata().clone();
        if meta.index == 0 {
            return Ok(());
        }
        let continues = meta.index <= self.truncated.0
            || (meta.index <= self.last_index_raw()
                && self.entry_term(meta.index)? == Some(meta.term));
        let mut batch = LogBatch::default();
        if !continues {
            tracing::warn!(
                snapshot_index = meta.index,
                "the raft log does not continue the newest snapshot; replacing it"
            );
            self.mark.lower(meta.index)?;
            batch.add_command(self.group, EngineCommand::Clean);
            self.truncated = (meta.index, meta.term);
        }
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        batch.put_message(self.group, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        batch.put(
            self.group,
            KEY_TRUNCATED.to_vec(),
            encode_pair(self.truncated),
        )?;
        self.engine.write(&mut batch, true)?;
        Ok(())
    }

    fn last_index_raw(&self) -> u64 {
        self.engine
            .last_index(self.group)
            .unwrap_or(self.truncated.0)
    }

    fn entry_term(&self, index: u64) -> Result<Option<u64>, StoreError> {
        if let Some(term) = self.cache.term(index) {
            return Ok(Some(term));
        }
        Ok(self
            .engine
            .get_entry::<EntryExt>(self.group, index)?
            .map(|e| e.term))
    }

    pub fn snapshot_meta(&self) -> &SnapshotMetadata {
        self.snapshot.get_metadata()
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snap_dir
    }

    /// The newest snapshot's state-machine bytes, to rebuild the state on start.
    pub fn snapshot_data(&self) -> &[u8] {
        self.snapshot.get_data()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }
}

impl LogStorage for LogStore {
    /// Appends entries and records the hard state in one write; one fsync
    /// when `sync`. This is the group commit: every proposal gathered into
    /// one Raft Ready shares it.
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StoreError> {
        if let Some(first) = entries.first()
            && first.index <= self.last_index_raw()
        {
            // A conflicting append replaces the tail: the log gets shorter.
            self.mark.lower(first.index - 1)?;
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        let batch = &mut self.batch;
        let written = (|| {
            if !entries.is_empty() {
                batch.add_entries::<EntryExt>(self.group, entries)?;
            }
            if hard_state.is_some() || !entries.is_empty() {
                batch.put_message(self.group, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
            }
            if batch.is_empty() {
                return Ok(false);
            }
            self.engine.write(batch, sync)?;
            Ok::<_, raft_engine::Error>(true)
        })();
        match written {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.cache.append(entries);
                if sync {
                    self.record_mark()?;
                }
                Ok(())
            }
            Err(e) => {
                // A batch a failed write left half-filled is not reused.
                self.batch = LogBatch::default();
                Err(e.into())
            }
        }
    }

    /// Notes a commit index learnt after a Ready; written with the next batch.
    /// (Losing it in a crash is harmless: the commit index is relearnt from
    /// the leader, and snapshots raise it on open.)
    fn note_commit(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// Installs a snapshot received from the leader: the file first, then the
    /// log replaced by it in one batch.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        write_snapshot_file(&self.snap_dir, snapshot)?;
        self.truncated = (meta.index, meta.term);
        raise_to_snapshot(&mut self.hard_state, meta);
        self.mark.lower(meta.index)?;
        let mut batch = LogBatch::default();
        batch.add_command(self.group, EngineCommand::Clean);
        batch.put_message(self.group, KEY_HARD_STATE.to_vec(), &self.hard_state)?;
        batch.put(
            self.group,
            KEY_TRUNCATED.to_vec(),
            encode_pair(self.truncated),
        )?;
        self.cache.clear();
        self.engine.write(&mut batch, true)?;
        self.record_mark()?;
        self.snapshot = snapshot.clone();
        remove_snapshots_before(&self.snap_dir, meta.index);
        Ok(())
    }

    /// Adopts a snapshot this node made itself (its file already durable) and
    /// compacts the log up to `compact_to` (exclusive), which must not pass
    /// the snapshot: entries after it must stay.
    fn adopt_snapshot(&mut self, snapshot: Snapshot, compact_to: u64) -> Result<(), StoreError> {
        let index = snapshot.get_metadata().index;
        if !adopts(self.snapshot.get_metadata().index, index, compact_to) {
            return Ok(());
        }
        self.snapshot = snapshot;
        remove_snapshots_before(&self.snap_dir, index);
        if compact_to > self.truncated.0 + 1 {
            let last = compact_to - 1;
            let term = self
                .entry_term(last)?
                .unwrap_or(self.snapshot.get_metadata().term);
            let mut batch = LogBatch::default();
            batch.add_command(self.group, EngineCommand::Compact { index: compact_to });
            batch.put(
                self.group,
                KEY_TRUNCATED.to_vec(),
                encode_pair((last, term)),
            )?;
            self.engine.write(&mut batch, false)?;
            self.cache.compact_to(compact_to);
            self.truncated = (last, term);
            self.purge_in_background();
        }
        Ok(())
    }

    /// Flushes everything written without sync (on shutdown).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(self.engine.sync()?)
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.snapshot.get_metadata().clone()
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn snapshot_len(&self) -> usize {
        self.snapshot.get_data().len()
    }

    fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        // The conf state as of the snapshot: committed entries after it are
        // re-applied on start (Config::applied is the snapshot index), and
        // their conf changes with them.
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index_raw() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        if let Some(entries) =
            self.cache
                .entries(low, high, max_size.filter(|&m| m != raft::NO_LIMIT))
        {
            return Ok(entries);
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let max_size = max_size.map(|s| s as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(self.group, low, high, max_size, &mut out)
            .map_err(|e| raft::Error::Store(StorageError::Other(Box::new(e))))?;
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry_term(idx) {
            Ok(Some(term)) => Ok(term),
            Ok(None) => Err(raft::Error::Store(StorageError::Unavailable)),
            Err(e) => Err(raft::Error::Store(StorageError::Other(Box::new(e)))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_raw())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if snapshot_serves(self.snapshot.get_metadata(), request_index, to) {
            Ok(self.snapshot.clone())
        } else {
            self.snapshot_wanted.set(true);
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
        }
    }
}

fn encode_pair((a, b): (u64, u64)) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&a.to_le_bytes());
    v.extend_from_slice(&b.to_le_bytes());
    v
}

fn decode_pair(v: &[u8]) -> (u64, u64) {
    let word = |i: usize| {
        v.get(i..i + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    };
    (word(0), word(8))
}

fn snapshot_file_name(index: u64, term: u64) -> String {
    format!("snap-{index:020}-{term:020}.snap")
}

fn parse_snapshot_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    let (index, term) = rest.split_once('-')?;
    Some((index.parse().ok()?, term.parse().ok()?))
}

/// The superseded snapshot file kept to be written over by the next one
/// (see [`remove_snapshots_before`]). Not a snapshot's name: never read
/// as one, never a recovery point.
const SPARE_SNAPSHOT: &str = "spare.snapshot";

/// A snapshot file is pushed to the disk as it is written, this much at a
/// time (see [`write_behind`]).
const SNAPSHOT_WRITE_BEHIND_BYTES: usize = 1 << 20;

/// Starts writing `len` bytes of `file` from `offset` to the disk and waits
/// for them, without a journal commit. Written whole at the end instead, a
/// snapshot's megabytes could be flushed by whichever log fsync came first
/// (ext4's ordered mode writes a file's new blocks before the journal
/// commit any fsync triggers), holding every node's log write on that
/// disk. The final `sync_all` still makes the file durable; this only
/// spreads the work. Best effort: an error here leaves it to `sync_all`.
fn write_behind(file: &fs::File, offset: usize, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` keeps open, with
    // no pointers.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
}

/// Writes a snapshot durably: temporary file (the spare, written over, if
/// there is one), fsync, rename, fsync of the directory. Safe to call from
/// any thread.
///
/// Layout: magic, index, term, conf-state length and bytes (protobuf), data
/// length and bytes, then a CRC32 of everything before it.
pub fn write_snapshot_file(dir: &Path, snapshot: &Snapshot) -> Result<PathBuf, StoreError> {
    let meta = snapshot.get_metadata();
    let final_path = dir.join(snapshot_file_name(meta.index, meta.term));
    let tmp_path = final_path.with_extension("tmp");
    write_snapshot_tmp(dir, snapshot, &tmp_path)
        .and_then(|()| fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path)))
        .inspect_err(|_| {
            // A failed write (or rename) leaves no file holding the space a
            // full disk needs (the next attempt writes under another name).
            let _ = fs::remove_file(&tmp_path);
        })?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(final_path)
}

/// [`write_snapshot_file`]'s bytes, fsync'd, under `tmp_path`.
fn write_snapshot_tmp(dir: &Path, snapshot: &Snapshot, tmp_path: &Path) -> Result<(), StoreError> {
    let meta = snapshot.get_metadata();
    let conf = meta.get_conf_state().write_to_bytes()?;
    let data = snapshot.get_data();
    // The data (megabytes) is written from where it is, not copied behind
    // the header first; the checksum covers header and data alike.
    let mut head = Vec::with_capacity(64 + conf.len());
    head.extend_from_slice(SNAPSHOT_MAGIC);
    head.extend_from_slice(&meta.index.to_le_bytes());
    head.extend_from_slice(&meta.term.to_le_bytes());
    head.extend_from_slice(&(conf.len() as u64).to_le_bytes());
    head.extend_from_slice(&conf);
    head.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(data);
    let crc = crc.finalize();
    // Into the spare's blocks when there is one: a file written over needs
    // no new blocks, and the old one needs no freeing (see
    // `remove_snapshots_before`).
    let mut file = match fs::rename(dir.join(SPARE_SNAPSHOT), tmp_path) {
        Ok(()) => fs::OpenOptions::new().write(true).open(tmp_path),
        Err(_) => fs::File::create(tmp_path),
    }
    .map_err(io_err(tmp_path))?;
    let mut written = 0;
    for part in [&head[..], data, &crc.to_le_bytes()] {
        for chunk in part.chunks(SNAPSHOT_WRITE_BEHIND_BYTES) {
            file.write_all(chunk).map_err(io_err(tmp_path))?;
            write_behind(&file, written, chunk.len());
            written += chunk.len();
        }
    }
    // What is left of a longer spare goes.
    file.set_len(written as u64).map_err(io_err(tmp_path))?;
    fail::fail_point!(FAILPOINT_SNAPSHOT_WRITE, |_| Err(StoreError::Io {
        path: tmp_path.to_path_buf(),
        source: std::io::Error::other("failpoint: the snapshot's fsync fails"),
    }));
    file.sync_all().map_err(io_err(tmp_path))
}

fn read_snapshot_file(path: &Path) -> Result<Snapshot, StoreError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len > SNAPSHOT_BYTES_MAX {
        return Err(StoreError::CorruptSnapshot {
            path: path.to_path_buf(),
            problem: "larger than the snapshot size limit".into(),
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.read_to_end(&mut buf).map_err(io_err(path))?;
    decode_snapshot_file(path, &buf)
}

/// A snapshot file's bytes (read from `path`, named in errors) as the
/// snapshot they hold: magic, checksum, then the layout
/// [`write_snapshot_file`] writes. Anything else is an error, never a panic.
pub fn decode_snapshot_file(path: &Path, buf: &[u8]) -> Result<Snapshot, StoreError> {
    let corrupt = |problem: &str| StoreError::CorruptSnapshot {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    };
    if buf.len() < SNAPSHOT_MAGIC.len() + 36 || &buf[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt("not a Tandem snapshot"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut at = 8;
    let mut word = || -> Result<u64, StoreError> {
        let w = body
            .get(at..at + 8)
            .ok_or_else(|| corrupt("truncated"))?
            .try_into()
            .expect("8-byte slice");
        at += 8;
        Ok(u64::from_le_bytes(w))
    };
    let index = word()?;
    let term = word()?;
    let conf_len = usize::try_from(word()?).map_err(|_| corrupt("truncated"))?;
    let conf_end = at
        .checked_add(conf_len)
        .ok_or_else(|| corrupt("truncated"))?;
    let conf_bytes = body.get(at..conf_end).ok_or_else(|| corrupt("truncated"))?;
    let conf = ConfState::parse_from_bytes(conf_bytes)?;
    at = conf_end;
    let data_len = usize::try_from(u64::from_le_bytes(
        body.get(at..at + 8)
            .ok_or_else(|| corrupt("truncated"))?
            .try_into()
            .expect("8-byte slice"),
    ))
    .map_err(|_| corrupt("truncated"))?;
    at += 8;
    let data_end = at
        .checked_add(data_len)
        .ok_or_else(|| corrupt("truncated"))?;
    let data = body.get(at..data_end).ok_or_else(|| corrupt("truncated"))?;
    let mut snapshot = Snapshot::default();
    let meta = snapshot.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf);
    snapshot.set_data(data.to_vec().into());
    Ok(snapshot)
}

/// `body` framed as a snapshot file: magic in front, its checksum behind —
/// so a fuzzer's bytes get past the checksum to the parser.
pub fn frame_snapshot_file(body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(body.len() + 12);
    buf.extend_from_slice(SNAPSHOT_MAGIC);
    buf.extend_from_slice(body);
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

fn snapshot_files(dir: &Path) -> Result<Vec<(u64, u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((index, term)) = parse_snapshot_file_name(name) {
            out.push((index, term, entry.path()));
        } else if name.ends_with(".tmp") {
            // A snapshot whose write was interrupted; never renamed, never used.
            let _ = fs::remove_file(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn load_newest_snapshot(dir: &Path) -> Result<Option<Snapshot>, StoreError> {
    match snapshot_files(dir)?.pop() {
        Some((_, _, path)) => Ok(Some(read_snapshot_file(&path)?)),
        None => Ok(None),
    }
}

/// Snapshots older than `index` are superseded. The newest of them is kept
/// as the spare the next snapshot is written over; the rest are deleted.
/// Deleting every one at once freed ~10 MB per snapshot, and on a disk
/// mounted with `discard` the journal commit that frees them held every
/// node's log fsync for 50-170 ms (BENCHMARKS.md, thirteenth session).
fn remove_snapshots_before(dir: &Path, index: u64) {
    let Ok(files) = snapshot_files(dir) else {
        return;
    };
    let spare = dir.join(SPARE_SNAPSHOT);
    let mut spare_taken = spare.exists();
    for (i, _, path) in files.into_iter().rev() {
        if i >= index {
            continue;
        }
        if !spare_taken && fs::rename(&path, &spare).is_ok() {
            spare_taken = true;
            continue;
        }
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an old snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;
    use std::time::{Duration, Instant};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn bootstrap() -> Option<Bootstrap> {
        Some(Bootstrap {
            voters: vec![1, 2, 3],
            state: b"initial".to_vec(),
        })
    }

    #[test]
    fn durability_bootstrap_then_appends_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
            assert_eq!(store.first_index().unwrap(), 2);
            assert_eq!(store.last_index().unwrap(), 1);
            assert_eq!(store.term(1).unwrap(), 1);
            let mut hs = store.hard_state().clone();
            hs.term = 2;
            hs.vote = 3;
            store
                .persist(&[entry(2, 2), entry(3, 2)], Some(&hs), true)
                .unwrap();
        }
        let store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        let state = store.initial_state().unwrap();
        assert_eq!(state.hard_state.vote, 3);
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(store.last_index().unwrap(), 3);
        let got = store
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got, vec![entry(2, 2), entry(3, 2)]);
        assert_eq!(store.snapshot_data(), b"initial");
    }

    #[test]
    fn durability_conflicting_append_replaces_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        store
            .persist(&[entry(2, 2), entry(3, 2), entry(4, 2)], None, true)
            .unwrap();
        store.persist(&[entry(3, 3)], None, true).unwrap();
        assert_eq!(store.last_index().unwrap(), 3);
        assert_eq!(store.term(3).unwrap(), 3);
        // A log shortened by a conflicting append is not taken for a log
        // that lost durable entries.
        drop(store);
        let store = LogStore::open(dir.path(), 1, bootstrap()).expect("reopens");
        assert_eq!(store.last_index().unwrap(), 3);
    }

    fn refused(dir: &Path) -> String {
        match LogStore::open(dir, 1, bootstrap()) {
            Err(e @ StoreError::LostDurable { .. }) => e.to_string(),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(store) => panic!("opened, log ends at {}", store.last_index().unwrap()),
        }
    }

    #[test]
    fn durability_a_log_behind_its_sync_mark_is_refused_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
            let mut hs = store.hard_state().clone();
            (hs.term, hs.vote) = (2, 3);
            let entries: Vec<_> = (2..=20).map(|i| entry(i, 2)).collect();
            store.persist(&entries, Some(&hs), true).unwrap();
        }
        // As if the log had lost entries 21..=25, and then the vote.
        let (mut mark, found) = SyncMark::open(dir.path()).unwrap();
        let found = found.expect("a mark after an fsync");
        assert_eq!((found.last_index, found.term, found.vote), (20, 2, 3));
        mark.record(Mark {
            last_index: 25,
            ..found
        })
        .unwrap();
        drop(mark);
        let why = refused(dir.path());
        assert!(
            why.contains("corrupt") && why.contains("entries 21..=25"),
            "{why}"
        );
        let (mut mark, _) = SyncMark::open(dir.path()).unwrap();
        mark.record(Mark { vote: 1, ..found }).unwrap();
        drop(mark);
        assert!(refused(dir.path()).contains("vote for node 1 in term 2"));
    }

    fn flip_near_the_end_of_the_log(dir: &Path) {
        let log_dir = dir.join("raft-log");
        let file = fs::read_dir(&log_dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .expect("a log file");
        let mut bytes = fs::read(&file).unwrap();
        let at = bytes.len() - 8;
        bytes[at] ^= 0x5a;
        fs::write(&file, &bytes).unwrap();
    }

    /// What the engine cuts past the last fsync'd write (here a commit
    /// index noted without sync, as a follower writes before it stops) was
    /// never promised to anyone: the node starts, all its entries there.
    #[test]
    fn durability_a_cut_record_past_the_last_fsync_is_no_reason_to_refuse() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
            let entries: Vec<_> = (2..=40).map(|i| entry(i, 2)).collect();
            store.persist(&entries, None, true).unwrap();
            let mut hs = store.hard_state().clone();
            hs.commit = 40;
            store.persist(&[], Some(&hs), false).unwrap();
            store.sync().unwrap();
        }
        flip_near_the_end_of_the_log(dir.path());
        let store = LogStore::open(dir.path(), 1, bootstrap()).expect("starts");
        assert_eq!(store.last_index().unwrap(), 40);
    }

    /// The hazard itself: a byte of the last fsync'd record rots; the
    /// engine cuts the record on open as if it were a torn write, and the
    /// mark catches it.
    #[test]
    fn durability_a_rotten_byte_in_the_last_fsynced_record_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
            for i in 2..=40 {
                store.persist(&[entry(i, 2)], None, true).unwrap();
            }
        }
        flip_near_the_end_of_the_log(dir.path());
        let why = refused(dir.path());
        assert!(why.contains("corrupt") && why.contains("..=40"), "{why}");
    }

    /// A bootstrapped store holding entries 2..=10 of term 2, and a snapshot
    /// at 8 written to its directory but not adopted yet.
    fn entries_to_10_and_a_snapshot_at_8(dir: &Path) -> (LogStore, Snapshot) {
        let mut store = LogStore::open(dir, 1, bootstrap()).unwrap();
        let entries: Vec<_> = (2..=10).map(|i| entry(i, 2)).collect();
        store.persist(&entries, None, true).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 8;
        snap.mut_metadata().term = 2;
        snap.mut_metadata()
            .mut_conf_state()
            .set_voters(vec![1, 2, 3]);
        snap.set_data(b"at 8".to_vec().into());
        write_snapshot_file(store.snapshot_dir(), &snap).unwrap();
        (store, snap)
    }

    #[test]
    fn compaction_behind_a_snapshot_keeps_later_entries_and_terms() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, snap) = entries_to_10_and_a_snapshot_at_8(dir.path());
        store.adopt_snapshot(snap, 6).unwrap();
        assert_eq!(store.first_index().unwrap(), 6);
        assert_eq!(store.term(5).unwrap(), 2);
        assert!(
            store
                .entries(5, 7, None, GetEntriesContext::empty(false))
                .is_err()
        );
        assert_eq!(store.snapshot(8, 2).unwrap().get_data(), b"at 8");
        drop(store);
        let store = LogStore::open(dir.path(), 1, None).unwrap();
        assert_eq!(store.first_index().unwrap(), 6);
        assert_eq!(store.last_index().unwrap(), 10);
        assert_eq!(store.snapshot_meta().index, 8);
        let files = snapshot_files(store.snapshot_dir()).unwrap();
        assert_eq!(
            files.len(),
            1,
            "the bootstrap snapshot is removed: {files:?}"
        );
    }

    /// No blocking: purging the log's old files after a compaction (it
    /// took ~70 ms on the Raft loop) runs on a thread of its own. With the
    /// purge held for 600 ms, adopting the snapshot that compacts the log
    /// returns at once; dropping the store then waits for the purge.
    #[test]
    fn no_blocking_the_purge_after_a_compaction_runs_off_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, snap) = entries_to_10_and_a_snapshot_at_8(dir.path());
        fail::cfg(FAILPOINT_SLOW_PURGE, "sleep(600)").unwrap();
        let started = Instant::now();
        store.adopt_snapshot(snap, 6).unwrap();
        let adopted = started.elapsed();
        drop(store);
        let dropped = started.elapsed();
        fail::remove(FAILPOINT_SLOW_PURGE);
        assert!(
            adopted < Duration::from_millis(300),
            "the caller waited for the purge: {adopted:?}"
        );
        assert!(
            dropped >= Duration::from_millis(550),
            "the purge did not run (or was not joined): {dropped:?}"
        );
    }

    /// A snapshot at `index` (term 2, voter 1) holding `data`.
    fn snap(index: u64, data: &[u8]) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().set_voters(vec![1]);
        snap.set_data(data.to_vec().into());
        snap
    }

    /// Durability: the fuzz target's framing is a snapshot file's own — a
    /// file's body framed again is the file, byte for byte, and reads
    /// back as its snapshot (else the fuzzer would stop at the checksum).
    #[test]
    fn durability_a_framed_body_is_the_snapshot_file_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_snapshot_file(dir.path(), &snap(5, b"five")).unwrap();
        let file = fs::read(&written).unwrap();
        let body = &file[SNAPSHOT_MAGIC.len()..file.len() - 4];
        assert_eq!(frame_snapshot_file(body), file);
        let read = decode_snapshot_file(&written, &frame_snapshot_file(body)).unwrap();
        assert_eq!(
            (read.get_metadata().index, read.get_data()),
            (5, &b"five"[..])
        );
    }

    /// Durability: a superseded snapshot file is kept as the spare and
    /// written over by the next snapshot (no new blocks, none freed), and
    /// what it held never leaks into the new one or into recovery.
    #[test]
    fn durability_a_superseded_snapshot_is_written_over_not_deleted() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let old = write_snapshot_file(dir.path(), &snap(5, &[7; 300_000])).unwrap();
        let inode = fs::metadata(&old).unwrap().ino();
        write_snapshot_file(dir.path(), &snap(8, b"eight")).unwrap();
        remove_snapshots_before(dir.path(), 8);
        assert!(!old.exists());
        let spare = dir.path().join(SPARE_SNAPSHOT);
        assert_eq!(fs::metadata(&spare).unwrap().ino(), inode);
        assert_eq!(
            load_newest_snapshot(dir.path())
                .unwrap()
                .unwrap()
                .get_data(),
            b"eight",
            "the spare is never read as a snapshot"
        );
        let new = write_snapshot_file(dir.path(), &snap(12, b"twelve")).unwrap();
        assert_eq!(
            fs::metadata(&new).unwrap().ino(),
            inode,
            "not written over the spare"
        );
        assert!(!spare.exists());
        let read = read_snapshot_file(&new).unwrap();
        assert_eq!(read.get_data(), b"twelve");
        assert_eq!(read.get_metadata().index, 12);
        assert!(
            fs::metadata(&new).unwrap().len() < 1_000,
            "the spare's tail stayed"
        );
        remove_snapshots_before(dir.path(), 12);
        let files = snapshot_files(dir.path()).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(spare.exists(), "the snapshot at 8 is the spare now");
        // A crash while the next snapshot is written over the spare: the
        // half-written file is dropped on open, the newest is what loads.
        let torn = dir
            .path()
            .join(snapshot_file_name(20, 2))
            .with_extension("tmp");
        fs::rename(&spare, &torn).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&torn)
            .unwrap()
            .write_all(b"half a snapshot")
            .unwrap();
        let loaded = load_newest_snapshot(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.get_data(), b"twelve");
        assert!(!torn.exists());
    }

    /// Durability (and a full disk's space): a snapshot whose write fails
    /// (here its fsync) leaves no temporary file, not even the spare it was
    /// being written over; the newest good snapshot is still the one loaded,
    /// and the next write succeeds.
    #[test]
    fn durability_a_failed_snapshot_write_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot_file(dir.path(), &snap(5, b"five")).unwrap();
        write_snapshot_file(dir.path(), &snap(8, b"eight")).unwrap();
        remove_snapshots_before(dir.path(), 8);
        assert!(dir.path().join(SPARE_SNAPSHOT).exists());
        fail::cfg(FAILPOINT_SNAPSHOT_WRITE, "return").unwrap();
        let failed = write_snapshot_file(dir.path(), &snap(12, &[7; 200_000]));
        fail::remove(FAILPOINT_SNAPSHOT_WRITE);
        let error = failed.unwrap_err().to_string();
        assert!(error.contains("fsync fails"), "{error}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![snapshot_file_name(8, 2)], "left behind");
        let loaded = load_newest_snapshot(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.get_data(), b"eight");
        let next = write_snapshot_file(dir.path(), &snap(12, b"twelve")).unwrap();
        assert_eq!(read_snapshot_file(&next).unwrap().get_data(), b"twelve");
    }

    #[test]
    fn a_snapshot_predating_the_receiver_is_refused_and_a_new_one_requested() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        assert!(
            store.snapshot(1, 2).is_ok(),
            "node 2 is in the bootstrap configuration"
        );
        assert!(!store.take_snapshot_wanted());
        // Node 4 joined after the bootstrap snapshot: it would refuse it.
        assert_eq!(
            store.snapshot(1, 4).unwrap_err(),
            raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)
        );
        assert!(store.take_snapshot_wanted());
        assert!(!store.take_snapshot_wanted(), "taking the flag clears it");
    }

    #[test]
    fn durability_received_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        store
            .persist(&[entry(2, 2), entry(3, 2)], None, true)
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = 7;
        snap.mut_metadata()
            .mut_conf_state()
            .set_voters(vec![1, 2, 3, 4]);
        snap.set_data(b"leader state".to_vec().into());
        store.install_snapshot(&snap).unwrap();
        store.persist(&[entry(51, 7)], None, true).unwrap();
        drop(store);
        let store = LogStore::open(dir.path(), 1, None).unwrap();
        assert_eq!(store.first_index().unwrap(), 51);
        assert_eq!(store.last_index().unwrap(), 51);
        assert_eq!(store.term(50).unwrap(), 7);
        assert_eq!(store.hard_state().commit, 50);
        assert_eq!(
            store.initial_state().unwrap().conf_state.voters,
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn durability_crash_between_snapshot_file_and_log_replacement_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        store
            .persist(&[entry(2, 2), entry(3, 2)], None, true)
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 40;
        snap.mut_metadata().term = 5;
        snap.set_data(b"x".to_vec().into());
        // The file is written, then the node dies before the log batch.
        write_snapshot_file(store.snapshot_dir(), &snap).unwrap();
        drop(store);
        let store = LogStore::open(dir.path(), 1, None).unwrap();
        assert_eq!(store.first_index().unwrap(), 41);
        assert_eq!(store.last_index().unwrap(), 40);
        assert_eq!(store.term(40).unwrap(), 5);
        assert_eq!(store.hard_state().commit, 40);
    }

    #[test]
    fn a_corrupt_snapshot_is_refused_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), 1, bootstrap()).unwrap();
        let path = snapshot_files(store.snapshot_dir()).unwrap()[0].2.clone();
        drop(store);
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = LogStore::open(dir.path(), 1, bootstrap()).err().unwrap();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }
}
