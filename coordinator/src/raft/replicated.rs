//! What the Raft loop replicates, and who hears about it. The loop knows
//! entries as bytes and a state machine through this trait; it knows nothing
//! of transactions (the coordinator's state machine and its observer live in
//! `replica/`).

use std::collections::BTreeMap;

use raft::eraftpb::ConfState;

/// A deterministic state machine over the log's entries.
pub trait Replicated: Sized + Send + 'static {
    /// What applying an entry gives back to whoever proposed it.
    type Output: Send + 'static;
    /// An immutable copy of the state for readers, cheap to make.
    type View: Send + Sync + 'static;

    /// The state a founding member starts with: nothing but its members.
    fn founding(members: BTreeMap<u64, String>) -> Self;

    /// Applies a committed entry's data at (`index`, `term`). Pure: no
    /// clock, no randomness, no I/O. An entry it cannot read is a reason to
    /// stop the node (panic), never to skip it: skipping would let replicas
    /// diverge.
    fn apply(&mut self, data: &[u8], index: u64, term: u64) -> Self::Output;

    /// The state as of `applied`, for readers.
    fn view(&self, applied: u64) -> Self::View;

    /// A copy of the state, taken now and encoded later — off the loop, on
    /// the snapshot thread.
    fn snapshot(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send>;

    /// The state a snapshot holds.
    fn restore(data: &[u8]) -> Result<Self, String>;

    /// Every member's address, replicated with the membership changes that
    /// introduced them (so snapshots carry them too).
    fn members(&self) -> &BTreeMap<u64, String>;

    fn set_member(&mut self, id: u64, address: Option<String>);
}

/// Hears what the loop does with the state: runs on the loop's thread, so it
/// must be quick (hand work to other tasks). The loop proposes what it
/// returns itself — the way a leader's housekeeping gets into the log.
pub trait Observer<S: Replicated>: Send + 'static {
    /// An entry was applied. `leading`: this node leads, and [`Observer::lead`]
    /// was called for its term.
    fn applied(&mut self, state: &S, output: &S::Output, index: u64, leading: bool);

    /// Every entry applied, by index and term: empty and membership entries
    /// included (the simulation's checker compares them across replicas).
    fn entry_applied(&mut self, _index: u64, _term: u64) {}

    /// The membership change at `index` was applied: the membership it
    /// left (`None`: raft refused it), and whether this node led, was
    /// removed by it and stepped down.
    fn membership_changed(&mut self, _index: u64, _conf: Option<&ConfState>, _stepped_down: bool) {}

    /// This node leads `term` and has applied an entry of that term, so its
    /// state holds every committed entry. Proposals to make now.
    fn lead(&mut self, state: &S, term: u64) -> Vec<Vec<u8>>;

    /// This node no longer leads.
    fn follow(&mut self);

    /// Once per tick. Proposals to make now (only taken from a leader).
    fn tick(&mut self, state: &S, leading: bool) -> Vec<Vec<u8>>;

    /// A snapshot from the leader replaced the state.
    fn restored(&mut self, state: &S);

    /// The loop stopped.
    fn closed(&mut self);
}
