//! Snapshots: taken every so many entries (or when raft needs one no
//! snapshot can serve), encoded off the loop from an O(1) copy of the state,
//! adopted (and the log compacted behind it) once durable; and installed
//! when the leader sends one.

use std::time::Duration;

use raft::eraftpb::Snapshot;

use super::handle::NodeError;
use super::node::{Loop, SnapshotJob, reply_err};
use super::replicated::{Observer, Replicated};
use super::storage::LogStorage;
use super::transport::PeerNet;

/// Log bytes applied since the last snapshot, per byte of that snapshot,
/// before the next is taken (with at least `snapshot_interval_entries`
/// entries): a snapshot then encodes at most half as many bytes as the log
/// wrote since the last, however large the retained state.
pub(super) const LOG_BYTES_PER_SNAPSHOT_BYTE: u64 = 2;
/// Nodes' snapshot thresholds differ in this many steps of a quarter
/// ([`Loop::snapshot_due`]).
pub(super) const SNAPSHOT_STAGGER_STEPS: u64 = 3;
/// What an entry costs the log beyond its data (raft-engine's record and
/// index, the entry's own header): counted so that tiny entries count.
pub(super) const ENTRY_OVERHEAD_BYTES: u64 = 32;
/// After a snapshot fails, the next waits this long, doubled with each
/// failure in a row up to [`SNAPSHOT_RETRY_MAX`].
pub(super) const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_secs(1);
pub(super) const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(32);

impl<S: Replicated, O: Observer<S>, St: LogStorage, N: PeerNet> Loop<S, O, St, N> {
    pub(super) fn install_snapshot(&mut self, snapshot: &Snapshot) {
        let meta = snapshot.get_metadata();
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing a snapshot from the leader"
        );
        if let Err(e) = self.raw.mut_store().install_snapshot(snapshot) {
            panic!("installing a snapshot failed: {e}");
        }
        self.machine = S::restore(snapshot.get_data()).unwrap_or_else(|e| {
            panic!(
                "the leader's snapshot at {} cannot be read: {e}",
                meta.index
            )
        });
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.log_bytes_at_snapshot = self.log_bytes_applied;
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
        self.observer.restored(&self.machine);
    }

    /// Whether enough was applied since the last snapshot for the next:
    /// at least the configured number of entries, *and* at least
    /// [`LOG_BYTES_PER_SNAPSHOT_BYTE`] log bytes per byte the last snapshot
    /// took. Encoding a snapshot costs in proportion to its bytes, replaying
    /// the log in proportion to the log's; spacing them by bytes keeps the
    /// encoding under half of what the log itself wrote, however many
    /// finished transactions are retained. (Every 20,000 entries with
    /// 29,000 sagas retained re-encoded 12 MB every 1.7 s at peak, 8 % of
    /// the leader's CPU; BENCHMARKS.md.) The log behind the newest snapshot
    /// stays within max(1.5 × interval entries, three times the snapshot's
    /// bytes) with the stagger below, and
    /// the snapshot is bounded by the active and finished limits, so replay
    /// after a restart stays bounded too.
    ///
    /// Each node waits a little longer than the last by its id (quarters:
    /// ×1, ×1.25, ×1.5 of both), so the members of a cluster, which apply
    /// the same log, do not all snapshot at the same instant: three at once
    /// held every commit for tens of milliseconds (BENCHMARKS.md, eleventh
    /// session); one at a time leaves a majority undisturbed.
    pub(super) fn snapshot_due(&self, last: u64) -> bool {
        let quarters = 4 + self.config.id % SNAPSHOT_STAGGER_STEPS;
        let entries = self.config.snapshot_interval_entries;
        let log_bytes = LOG_BYTES_PER_SNAPSHOT_BYTE * self.raw.store().snapshot_len() as u64;
        self.applied >= last + entries.saturating_mul(quarters) / 4
            && self.log_bytes_applied - self.log_bytes_at_snapshot
                >= log_bytes.saturating_mul(quarters) / 4
    }

    /// Takes a snapshot when one is due: its metadata now, its encoding a
    /// job for the shell to run off the loop (`snapshot_job`).
    pub(super) fn maybe_snapshot(&mut self) {
        // With the injected bug, the leader applies ahead of the commit; a
        // snapshot past it would compact what raft still needs.
        #[cfg(feature = "injected-bug")]
        if crate::injected::on(crate::injected::Bug::ApplyBeforeCommit)
            && self.applied > self.raw.raft.raft_log.applied
        {
            return;
        }
        let last = self.raw.store().snapshot_index();
        // Raft needed a snapshot the newest one cannot serve (a node added
        // since): take one now rather than at the next interval.
        let wanted = self.raw.store().take_snapshot_wanted() && self.applied > last;
        if self.snapshot_in_flight.is_some()
            || self.snapshot_wait_ticks > 0
            || !(wanted || self.snapshot_due(last))
        {
            // Raft asks again (`snapshot()`) when it next needs one.
            return;
        }

        // Counted from here once adopted; a failed one is simply due again.
        self.snapshot_in_flight = Some(self.log_bytes_applied);
        let encode = self.machine.snapshot();
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf_state.clone());
        self.snapshot_job = Some(SnapshotJob { snapshot, encode });
    }

    /// A snapshot could not be written (a full or failing disk, the
    /// directory gone). Nothing was adopted: the log stays as it was, and
    /// the snapshot is due again — but not at once. Every attempt encodes
    /// the whole state, so retrying each turn would spend a core and write
    /// an error line many times a second for as long as the disk stays
    /// bad; the wait doubles from [`SNAPSHOT_RETRY_FIRST`] to
    /// [`SNAPSHOT_RETRY_MAX`], and each failure is logged and counted
    /// (`tandem_raft_snapshot_failures_total`). Meanwhile the log is not
    /// compacted, so it grows: the metric is what to alert on.
    pub(super) fn snapshot_failed(&mut self, error: &str) {
        self.snapshot_in_flight = None;
        self.snapshot_failures = self.snapshot_failures.saturating_add(1);
        let wait = SNAPSHOT_RETRY_FIRST
            .saturating_mul(1 << (self.snapshot_failures - 1).min(16))
            .min(SNAPSHOT_RETRY_MAX);
        let tick = self.config.tick.max(Duration::from_millis(1));
        self.snapshot_wait_ticks = wait.as_nanos().div_ceil(tick.as_nanos()) as u64;
        crate::metrics::snapshot_failed();
        tracing::error!(
            %error,
            failures_in_a_row = self.snapshot_failures,
            retry_in_ms = wait.as_millis() as u64,
            "taking a snapshot failed; the log is not compacted until one is written"
        );
    }

    pub(super) fn adopt_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot_failures = 0;
        if let Some(at) = self.snapshot_in_flight.take() {
            self.log_bytes_at_snapshot = at;
        }
        let index = snapshot.get_metadata().index;
        let compact_to = (index + 1)
            .saturating_sub(self.config.log_retain_entries)
            .max(1);
        let started = std::time::Instant::now();
        if let Err(e) = self.raw.mut_store().adopt_snapshot(snapshot, compact_to) {
            tracing::error!(error = %e, "compacting the raft log failed");
        }
        tracing::info!(
            index,
            compact_to,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot adopted, log compacted"
        );
    }
}
