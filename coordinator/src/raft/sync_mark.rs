//! The sync mark: a few bytes beside the raft log saying what the log held
//! after its last fsync — its last index, and the term and vote of the hard
//! state. Read on open, it tells a log that lost fsync'd records from a log
//! that lost only a torn, never-acknowledged write.
//!
//! Why: raft-engine, on open, cuts a corrupt record at the end of its
//! active file and carries on (`TolerateTailCorruption`), because that is
//! what a crash in the middle of a write leaves. But a byte that rots in the
//! last records *after* they were fsync'd looks the same, and then the node
//! has silently forgotten entries it acknowledged, or a vote it cast: with
//! one more failure elsewhere, a committed entry can be lost or a term get
//! two leaders. The mark is written after every fsync'd write, so a log
//! found shorter than its mark (or a hard state behind it) lost something
//! that was durable: the node refuses to start and says so, and the
//! operator replaces it (RELIABILITY.md, "Storage faults").
//!
//! Raising the mark costs one `pwrite` per fsync of the log, without an
//! fsync of its own: after a process crash the page cache keeps it, and
//! after a power loss it may be older than the log, which only makes it
//! check less, never wrongly. Writes that shorten the log on purpose (a new
//! leader's conflicting append, an installed snapshot) lower the mark first,
//! durably, so that no crash leaves it above a log shortened that way.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::storage::StoreError;

const MAGIC: &[u8; 8] = b"TNDMMRK1";
const LEN: usize = 8 + 3 * 8 + 4;
pub const FILE_NAME: &str = "raft-log.mark";

/// What the raft log held after an fsync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    pub last_index: u64,
    pub term: u64,
    pub vote: u64,
}

impl Mark {
    fn encode(&self) -> [u8; LEN] {
        let mut buf = [0u8; LEN];
        buf[..8].copy_from_slice(MAGIC);
        for (i, v) in [self.last_index, self.term, self.vote].iter().enumerate() {
            buf[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf[..LEN - 4]);
        buf[LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// `None` unless `buf` is a whole, intact mark.
    pub fn decode(buf: &[u8]) -> Option<Mark> {
        if buf.len() != LEN || &buf[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(buf[LEN - 4..].try_into().ok()?);
        if crc32fast::hash(&buf[..LEN - 4]) != crc {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(buf[8 + 8 * i..16 + 8 * i].try_into().unwrap());
        Some(Mark {
            last_index: word(0),
            term: word(1),
            vote: word(2),
        })
    }

    /// What the log as opened lost against this mark, if anything: entries
    /// up to `last_index` that were fsync'd, a term it had reached, or the
    /// vote it cast in its term.
    pub fn lost_by(&self, found: &Mark) -> Option<String> {
        let mut lost = Vec::new();
        if found.last_index < self.last_index {
            lost.push(format!(
                "entries {}..={} (the log ends at {})",
                found.last_index + 1,
                self.last_index,
                found.last_index
            ));
        }
        if found.term < self.term {
            lost.push(format!(
                "term {} (the hard state says {})",
                self.term, found.term
            ));
        } else if found.term == self.term && self.vote != 0 && found.vote != self.vote {
            lost.push(format!(
                "its vote for node {} in term {} (the hard state says {})",
                self.vote, self.term, found.vote
            ));
        }
        (!lost.is_empty()).then(|| lost.join(", "))
    }
}

/// The mark's file, open for the node's lifetime.
pub struct SyncMark {
    file: File,
    path: PathBuf,
    written: Mark,
}

impl SyncMark {
    /// Opens (creating) the mark in `dir`; returns it with the mark found,
    /// `None` if there was none (a new or an older data directory) or it is
    /// unreadable (then it checks nothing this time, and says so).
    pub fn open(dir: &Path) -> Result<(SyncMark, Option<Mark>), StoreError> {
        let path = dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut buf = vec![0u8; LEN];
        let len = file.metadata().map_err(io)?.len();
        let found = if len == 0 {
            None
        } else {
            let read = file
                .read_exact_at(&mut buf, 0)
                .ok()
                .and_then(|()| Mark::decode(&buf));
            if read.is_none() {
                tracing::warn!(path = %path.display(), "the raft log's sync mark is unreadable; not checking the log against it this time");
            }
            read
        };
        let written = found.unwrap_or_default();
        Ok((
            SyncMark {
                file,
                path,
                written,
            },
            found,
        ))
    }

    /// Records `mark` (no fsync: see the module doc).
    pub fn record(&mut self, mark: Mark) -> Result<(), StoreError> {
        if mark == self.written {
            return Ok(());
        }
        self.file
            .write_all_at(&mark.encode(), 0)
            .map_err(|source| StoreError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.written = mark;
        Ok(())
    }

    /// Lowers the recorded last index to `at_most` before a write that may
    /// shorten the log — durably (fdatasync), so that not even a power loss
    /// can leave a mark above a log that was shortened on purpose. Rare: a
    /// new leader's conflicting append, an installed snapshot.
    pub fn lower(&mut self, at_most: u64) -> Result<(), StoreError> {
        let mark = Mark {
            last_index: self.written.last_index.min(at_most),
            ..self.written
        };
        if mark == self.written {
            return Ok(());
        }
        self.record(mark)?;
        self.file.sync_data().map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(last_index: u64, term: u64, vote: u64) -> Mark {
        Mark {
            last_index,
            term,
            vote,
        }
    }

    #[test]
    fn durability_a_mark_round_trips_and_any_flipped_bit_is_refused() {
        let m = mark(123_456, 7, 3);
        let buf = m.encode();
        assert_eq!(Mark::decode(&buf), Some(m));
        for byte in 0..LEN {
            for bit in 0..8 {
                let mut bad = buf;
                bad[byte] ^= 1 << bit;
                assert_eq!(Mark::decode(&bad), None, "byte {byte} bit {bit}");
            }
        }
        assert_eq!(Mark::decode(&buf[..LEN - 1]), None);
    }

    #[test]
    fn durability_what_a_log_lost_against_its_mark() {
        let at = mark(100, 5, 2);
        // Nothing lost: the same, longer, a later term, a vote in a later term.
        for found in [at, mark(150, 5, 2), mark(100, 6, 0), mark(100, 6, 3)] {
            assert_eq!(at.lost_by(&found), None, "{found:?}");
        }
        // A vote not yet cast in the mark's term may be cast since.
        assert_eq!(mark(100, 5, 0).lost_by(&mark(100, 5, 1)), None);
        // Lost: fsync'd entries, a term, the vote of the term.
        let lost = at.lost_by(&mark(97, 5, 2)).expect("entries lost");
        assert!(lost.contains("entries 98..=100"), "{lost}");
        assert!(
            at.lost_by(&mark(100, 4, 2))
                .expect("term lost")
                .contains("term 5")
        );
        assert!(
            at.lost_by(&mark(100, 5, 0))
                .expect("vote lost")
                .contains("vote for node 2")
        );
        assert!(
            at.lost_by(&mark(100, 5, 3))
                .expect("other vote")
                .contains("vote for node 2")
        );
    }

    #[test]
    fn durability_the_mark_survives_reopen_and_lowering_only_lowers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, found) = SyncMark::open(dir.path()).unwrap();
        assert_eq!(found, None, "a new directory has no mark");
        m.record(mark(40, 2, 1)).unwrap();
        m.lower(50).unwrap();
        drop(m);
        let (mut m, found) = SyncMark::open(dir.path()).unwrap();
        assert_eq!(found, Some(mark(40, 2, 1)));
        m.lower(30).unwrap();
        drop(m);
        assert_eq!(SyncMark::open(dir.path()).unwrap().1, Some(mark(30, 2, 1)));
        // A rotten mark checks nothing, and is rewritten by the next record.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (mut m, found) = SyncMark::open(dir.path()).unwrap();
        assert_eq!(found, None);
        m.record(mark(60, 3, 0)).unwrap();
        drop(m);
        assert_eq!(SyncMark::open(dir.path()).unwrap().1, Some(mark(60, 3, 0)));
    }
}
