//! The newest log entries, kept in memory beside the engine that holds them
//! durably, so that the reads Raft makes of entries it has just written
//! (their terms when it commits or sends an append, the committed ones to
//! apply) do not go back to the files: raft-engine keeps only where an
//! entry lies, and every read of one was a file read and a decode.
//!
//! The cache mirrors the tail of the log exactly or holds nothing of it: it
//! is a run of consecutive entries ending at the log's last, fed by the
//! same writes as the engine (`LogStore::persist`), cut where a conflicting
//! append cuts the log, and emptied when a snapshot replaces the log. A
//! read it cannot serve in full goes to the engine.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::Entry;

/// What the cache holds at most, by entries and by bytes (data and
/// context; an entry is counted 128 bytes more for its fields and its slot).
/// An entry's data may keep up to as much again in spare capacity (it is
/// the encoder's buffer), so the memory held stays under twice the bytes. At peak the
/// log grows by ~12,000 entries of a few hundred bytes a second, and Raft
/// reads back an entry within milliseconds of writing it: a second's worth
/// covers a follower a little behind as well.
pub const ENTRIES_MAX: usize = 16_384;
pub const BYTES_MAX: usize = 4 << 20;
const ENTRY_OVERHEAD: usize = 128;

#[derive(Default)]
pub struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn cost(entry: &Entry) -> usize {
    entry.data.len() + entry.context.len() + ENTRY_OVERHEAD
}

impl EntryCache {
    /// Entries written to the log after those it holds, or replacing its
    /// tail from `entries[0].index` on (a conflicting append): the cache
    /// then ends where the log ends. Entries that do not continue it (a gap)
    /// replace it.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        match self.first_index() {
            Some(start) if first.index > start && first.index <= self.next_index() => {
                let keep = (first.index - start) as usize;
                while self.entries.len() > keep {
                    if let Some(e) = self.entries.pop_back() {
                        self.bytes -= cost(&e);
                    }
                }
            }
            _ => self.clear(),
        }
        // More than it can hold: only the last of them, and nothing before.
        let skip = entries.len().saturating_sub(ENTRIES_MAX);
        if skip > 0 {
            self.clear();
        }
        for entry in &entries[skip..] {
            self.bytes += cost(entry);
            self.entries.push_back(entry.clone());
        }
        while self.entries.len() > ENTRIES_MAX || self.bytes > BYTES_MAX {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= cost(&e),
                None => break,
            }
        }
    }

    /// Forgets entries before `index` (the log was compacted up to it).
    pub fn compact_to(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index < index) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= cost(&e);
            }
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// One past the last entry held (meaningless when empty).
    fn next_index(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.index + 1)
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        let start = self.first_index()?;
        let at = usize::try_from(index.checked_sub(start)?).ok()?;
        self.entries.get(at)
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        self.get(index).map(|e| e.term)
    }

    /// Entries `low..high`, at most `max_size` bytes of them as Raft counts
    /// them (at least one), if the cache holds all of `low..high`; `None`
    /// sends the read to the engine.
    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        if high <= low {
            return Some(Vec::new());
        }
        let start = self.first_index()?;
        if low < start || high > self.next_index() {
            return None;
        }
        let from = (low - start) as usize;
        let count = (high - low) as usize;
        let mut out = Vec::with_capacity(count.min(1024));
        let mut size = 0u64;
        for entry in self.entries.range(from..from + count) {
            size += u64::from(entry.compute_size());
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry.clone());
        }
        Some(out)
    }

    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(index: u64, term: u64, len: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; len].into(),
            ..Default::default()
        }
    }

    /// What the log holds, the simple way: every entry from index 1 (the
    /// tests' logs start there), cut and extended as the store's writes
    /// cut and extend it.
    #[derive(Default)]
    struct Model {
        log: Vec<Entry>,
    }

    impl Model {
        fn append(&mut self, entries: &[Entry]) {
            let first = entries[0].index as usize;
            self.log.truncate(first - 1);
            self.log.extend_from_slice(entries);
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Append `count` entries of `len` bytes at `back` before the end
        /// (0: right after it; more: a conflicting append).
        Append {
            back: u64,
            count: u64,
            len: usize,
            term_up: bool,
        },
        Compact(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u64..6, 1u64..40, 0usize..700, any::<bool>()).prop_map(
                |(back, count, len, term_up)| Step::Append { back, count, len, term_up }
            ),
            1 => (0u64..400).prop_map(Step::Compact),
        ]
    }

    proptest! {
        /// Durability (§4.4) rests on Raft reading back what the log holds:
        /// whatever the cache answers, for a term or a range of entries, is
        /// what the log holds at that index — through appends, conflicting
        /// appends cutting the tail, compaction and eviction.
        #[test]
        fn durability_the_cache_answers_only_what_the_log_holds(
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut cache = EntryCache::default();
            let mut model = Model::default();
            let mut compacted = 0u64;
            let mut term = 1;
            for step in steps {
                match step {
                    Step::Append { back, count, len, term_up } => {
                        let last = model.log.len() as u64;
                        let first = last.saturating_sub(back).max(compacted) + 1;
                        if term_up {
                            term += 1;
                        }
                        let new: Vec<_> =
                            (first..first + count).map(|i| entry(i, term, len)).collect();
                        model.append(&new);
                        cache.append(&new);
                    }
                    Step::Compact(to) => {
                        let to = to.min(model.log.len() as u64);
                        compacted = compacted.max(to);
                        cache.compact_to(compacted + 1);
                    }
                }
                let (held, bytes) = cache.held();
                prop_assert!(held <= ENTRIES_MAX && bytes <= BYTES_MAX);
                let last = model.log.len() as u64;
                for i in 1..=last + 1 {
                    if let Some(t) = cache.term(i) {
                        prop_assert!(i > compacted && i <= last, "index {} answered", i);
                        prop_assert_eq!(t, model.log[i as usize - 1].term);
                    }
                }
                for (low, high) in [(1, last + 1), (last.saturating_sub(3).max(1), last + 1), (compacted + 1, last + 1)] {
                    if let Some(got) = cache.entries(low, high, None) {
                        prop_assert_eq!(&got[..], &model.log[low as usize - 1..high as usize - 1]);
                    }
                }
                // Whatever was appended last is held.
                if last > compacted {
                    prop_assert_eq!(cache.term(last), Some(model.log[last as usize - 1].term));
                }
            }
        }
    }

    #[test]
    fn a_size_limit_returns_at_least_one_entry_and_stops_past_the_limit() {
        let mut cache = EntryCache::default();
        cache.append(&(1..=10).map(|i| entry(i, 1, 100)).collect::<Vec<_>>());
        let one = u64::from(entry(1, 1, 100).compute_size());
        assert_eq!(cache.entries(1, 11, Some(0)).unwrap().len(), 1);
        assert_eq!(cache.entries(1, 11, Some(3 * one)).unwrap().len(), 3);
        assert_eq!(cache.entries(1, 11, None).unwrap().len(), 10);
        // Not all held: the engine answers.
        assert!(cache.entries(1, 12, None).is_none());
        cache.compact_to(4);
        assert!(cache.entries(3, 5, None).is_none());
        assert_eq!(cache.entries(4, 5, None).unwrap(), vec![entry(4, 1, 100)]);
    }

    #[test]
    fn limits_the_cache_holds_at_most_its_bytes() {
        let mut cache = EntryCache::default();
        let big = 1 << 20;
        cache.append(&(1..=20).map(|i| entry(i, 1, big)).collect::<Vec<_>>());
        let (held, bytes) = cache.held();
        assert!(bytes <= BYTES_MAX, "{bytes}");
        assert_eq!(held, BYTES_MAX / (big + ENTRY_OVERHEAD));
        assert_eq!(cache.term(20), Some(1));
        assert_eq!(cache.term(1), None);
    }
}
