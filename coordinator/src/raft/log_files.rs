//! How the raft log's records reach the disk: raft-engine's files, written
//! without the page cache into space written before.
//!
//! raft-engine appends a record with `pwrite` and makes it durable with
//! `fdatasync`, into space it `fallocate`d 2 MiB at a time. On ext4 (and
//! XFS) `fallocate`d blocks are *unwritten* extents, so every `fdatasync`
//! after a first write into them also writes the extent tree, and the
//! record's pages go through the page cache first. Here, instead:
//! - **space is written, not reserved**: [`WriteExt::allocate`] writes the
//!   zeros and syncs them once, so later records overwrite blocks that are
//!   already the file's;
//! - **records go straight to the device**: the file is opened a second
//!   time `O_DIRECT | O_DSYNC`, and every write is of whole 4 KiB blocks,
//!   durable when `pwrite` returns (a pure overwrite needs no metadata, so
//!   the kernel can make it durable with a forced-unit-access write instead
//!   of a cache flush). The last, partial block is kept in memory and
//!   written again, whole, with the next record — its earlier bytes
//!   unchanged, so a torn rewrite leaves each sector old or new, which are
//!   the same bytes where an acknowledged record lies;
//! - **`sync` costs nothing when nothing is pending**: only a truncation or
//!   zeros written through the page cache leave something for `fdatasync`.
//!
//! `scripts/log-write-probe.py` measured the difference on this machine's
//! disk (BENCHMARKS.md): a third off a durable record's latency and CPU.
//!
//! What raft-engine relies on, and why it still holds:
//! - **The file's size is what it allocated.** raft-engine cuts the zeros
//!   past its last record when it closes a file only if it allocated more
//!   than it wrote, and on open it refuses a *closed* file whose tail does
//!   not parse. So a whole-block write never leaves the file longer than
//!   what was allocated or the record's end, whichever is further: where
//!   the padding reaches past that, the file is cut back (rare: a file's
//!   header, the record that crosses the target size).
//! - **A recycled file is renamed durably** before its first block is
//!   written over (`FileSystem::reuse` below).
//! - **Reads see the writes.** Reads go through the ordinary descriptor; a
//!   direct write drops the cached pages it covers, so a read after it
//!   comes from the device.
//! - **A file system without `O_DIRECT`** (older tmpfs, some overlays)
//!   keeps raft-engine's own way for that file: buffered writes,
//!   `fallocate`, `fdatasync`.
//! - **A full disk says "nospace"**, as raft-engine's own files do: that is
//!   how it knows to start a new file and ask the caller to try again.

use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind, Read, Result, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use raft_engine::env::{FileSystem, Handle, Permission, WriteExt};

/// The unit of a direct write: the largest logical block size of the
/// devices we run on, and the page size.
const BLOCK: usize = 4096;

/// Failpoint: a direct write refused with `EINVAL`, as a file system
/// that took the `O_DIRECT` open but not the write would.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub const FAILPOINT_DIRECT_WRITE_REFUSED: &str = "raft-log-direct-write-refused";

/// Failpoint: evaluated right after every change this module makes to a
/// log file or the log's directory (a write, a truncation, a creation, a
/// rename, a deletion) — each instant a killed process could leave the
/// files in. Tests hang a callback on it that checks a copy of the files
/// there.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub const FAILPOINT_FILES_CHANGED: &str = "raft-log-files-changed";

/// [`FAILPOINT_FILES_CHANGED`], where a change happened.
fn changed() {
    fail::fail_point!(FAILPOINT_FILES_CHANGED);
}

/// The zeros `allocate` writes, a piece at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// raft-engine's files, written as the module doc says.
pub struct LogFiles {
    /// Try `O_DIRECT`; false keeps raft-engine's own way for every file.
    direct: bool,
}

impl Default for LogFiles {
    fn default() -> LogFiles {
        LogFiles { direct: true }
    }
}

/// One open log file.
pub struct LogFile {
    /// Reads, size, truncation, `fdatasync`, and every write where there
    /// is no `direct`.
    file: File,
    /// The same file `O_DIRECT | O_DSYNC`, for writes; `None` when the file
    /// is read-only or its file system refuses `O_DIRECT`.
    direct: Option<File>,
    /// Cleared for good when the file system took the `O_DIRECT` open but
    /// refused a direct write (some FUSE file systems, devices whose blocks
    /// are larger than [`BLOCK`]): the page cache's way from then on.
    direct_works: AtomicBool,
    /// Something went through the page cache since the last `sync`.
    dirty: AtomicBool,
}

impl LogFile {
    fn open(path: &Path, create: bool, perm: Permission, direct: bool) -> Result<LogFile> {
        let write = perm == Permission::ReadWrite;
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .create(create)
            .truncate(false)
            .open(path)?;
        let direct = if write && direct {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                .open(path)
            {
                Ok(direct) => Some(direct),
                // tmpfs and a few others: raft-engine's own way.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        Ok(LogFile {
            file,
            direct,
            direct_works: AtomicBool::new(true),
            dirty: AtomicBool::new(false),
        })
    }

    /// The direct descriptor, while direct writes work.
    fn direct(&self) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| self.direct_works.load(Ordering::Acquire))
    }

    fn size(&self) -> Result<usize> {
        Ok(self.file.metadata()?.len() as usize)
    }
}

impl Handle for LogFile {
    fn truncate(&self, offset: usize) -> Result<()> {
        self.file.set_len(offset as u64)?;
        self.dirty.store(true, Ordering::Release);
        changed();
        Ok(())
    }

    fn file_size(&self) -> Result<usize> {
        self.size()
    }

    fn sync(&self) -> Result<()> {
        let pending = self.dirty.swap(false, Ordering::AcqRel);
        if self.direct().is_some() && !pending {
            // Every write since the last sync was durable when it returned.
            return Ok(());
        }
        self.file.sync_data().inspect_err(|_| {
            self.dirty.store(true, Ordering::Release);
        })
    }
}

/// Reads at an offset through the ordinary descriptor.
pub struct LogReader {
    handle: Arc<LogFile>,
    offset: u64,
}

impl Read for LogReader {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.handle.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl Seek for LogReader {
    fn seek(&mut self, pos: SeekFrom) -> Result<u64> {
        self.offset = seek_to(self.offset, pos, || self.handle.size())? as u64;
        Ok(self.offset)
    }
}

fn seek_to(current: u64, pos: SeekFrom, size: impl FnOnce() -> Result<usize>) -> Result<usize> {
    let to = match pos {
        SeekFrom::Start(o) => Some(o as i128),
        SeekFrom::Current(d) => Some(current as i128 + d as i128),
        SeekFrom::End(d) => Some(size()? as i128 + d as i128),
    };
    to.filter(|&o| o >= 0 && o <= usize::MAX as i128)
        .map(|o| o as usize)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "seek before the start of a log file",
            )
        })
}

/// A buffer whose start is aligned to [`BLOCK`], as `O_DIRECT` requires.
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let mut a = Aligned {
            bytes: Vec::new(),
            start: 0,
            len: 0,
        };
        a.reserve(4 * BLOCK);
        a
    }

    /// Room for `len` bytes, the contents up to `self.len` kept.
    fn reserve(&mut self, len: usize) {
        if self.start + len <= self.bytes.len() {
            return;
        }
        let mut bytes = vec![0u8; len.next_power_of_two().max(BLOCK) + BLOCK];
        let start = (BLOCK - bytes.as_ptr() as usize % BLOCK) % BLOCK;
        bytes[start..start + self.len]
            .copy_from_slice(&self.bytes[self.start..self.start + self.len]);
        self.bytes = bytes;
        self.start = start;
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

/// Appends to a log file. With a direct descriptor it writes whole blocks
/// and keeps the last partial one: `tail` holds the bytes from the start of
/// the block `offset` lies in up to `offset`.
pub struct LogWriter {
    handle: Arc<LogFile>,
    offset: usize,
    /// The file's size: only this writer changes it.
    size: usize,
    tail: Aligned,
    /// `tail` holds the file's bytes before `offset` in its block; false
    /// after a seek or a truncation, until the next write reads them.
    tail_loaded: bool,
}

impl LogWriter {
    fn block_start(&self) -> usize {
        self.offset - self.offset % BLOCK
    }

    /// Reads the bytes before `offset` in its block from the device
    /// itself (`direct`), not from the page cache: they are written back
    /// whole with the next record, so they must be what the disk holds.
    fn load_tail(&mut self, direct: &File) -> Result<()> {
        let start = self.block_start();
        let len = self.offset - start;
        self.tail.len = 0;
        self.tail.reserve(BLOCK);
        let buf = self.tail.slice(BLOCK);
        // One whole block, as `O_DIRECT` wants; at the file's end the
        // read returns what there is.
        let read = loop {
            match direct.read_at(buf, start as u64) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if read < len {
            if start + read < self.size {
                return Err(Error::other(format!(
                    "a log file's last block read short: {read} of {len} bytes at {start}"
                )));
            }
            // Past the file's end: zeros, as the file reads once extended.
            buf[read..len].fill(0);
        }
        self.tail.len = len;
        self.tail_loaded = true;
        Ok(())
    }

    fn write_direct(&mut self, direct: &File, data: &[u8]) -> Result<()> {
        if !self.tail_loaded {
            self.load_tail(direct)?;
        }
        let start = self.block_start();
        let end = self.tail.len + data.len();
        let padded = end.div_ceil(BLOCK) * BLOCK;
        self.tail.reserve(padded);
        let buf = self.tail.slice(padded);
        buf[end - data.len()..end].copy_from_slice(data);
        buf[end..].fill(0);
        fail::fail_point!(FAILPOINT_DIRECT_WRITE_REFUSED, |_| {
            Err(Error::from_raw_os_error(libc::EINVAL))
        });
        if let Err(e) = direct.write_all_at(buf, start as u64) {
            // The tail is as before the write; what reached the file past
            // `offset` raft-engine writes over or cuts.
            self.tail_loaded = false;
            return Err(no_space(e));
        }
        changed();
        let new_offset = self.offset + data.len();
        let size = self.size.max(new_offset);
        if start + padded > size {
            // The padding reached past the file's end: cut it back, or a
            // closed file could end in zeros raft-engine refuses on open
            // (module doc).
            self.handle.truncate(size)?;
        }
        self.size = size;
        // Keep the new last partial block at the front.
        let keep_from = new_offset - new_offset % BLOCK - start;
        self.tail.bytes.copy_within(
            self.tail.start + keep_from..self.tail.start + end,
            self.tail.start,
        );
        self.tail.len = end - keep_from;
        self.offset = new_offset;
        Ok(())
    }
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let handle = self.handle.clone();
        if let Some(direct) = handle.direct() {
            match self.write_direct(direct, data) {
                Ok(()) => return Ok(data.len()),
                // Refused before any byte was written: the page cache's
                // way, for this file, from now on (`LogFile::direct_works`).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        error = %e,
                        "the raft log's file system refused a direct write; \
                         writing this file through the page cache"
                    );
                    handle.direct_works.store(false, Ordering::Release);
                }
                Err(e) => return Err(e),
            }
        }
        handle
            .file
            .write_all_at(data, self.offset as u64)
            .map_err(no_space)?;
        handle.dirty.store(true, Ordering::Release);
        changed();
        self.offset += data.len();
        self.size = self.size.max(self.offset);
        Ok(data.len())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Seek for LogWriter {
    fn seek(&mut self, pos: SeekFrom) -> Result<u64> {
        let to = seek_to(self.offset as u64, pos, || Ok(self.size))?;
        if to != self.offset {
            self.offset = to;
            self.tail_loaded = false;
        }
        Ok(to as u64)
    }
}

impl WriteExt for LogWriter {
    fn truncate(&mut self, offset: usize) -> Result<()> {
        self.handle.truncate(offset)?;
        self.size = offset;
        self.offset = offset;
        self.tail_loaded = false;
        Ok(())
    }

    /// With a direct descriptor: writes the zeros and syncs them, so that
    /// records overwrite blocks the file already has (module doc); only
    /// past the file's end, where no record lies. Without: `fallocate`, as
    /// raft-engine does.
    fn allocate(&mut self, offset: usize, size: usize) -> Result<()> {
        let end = offset + size;
        if end <= self.size {
            return Ok(());
        }
        // From the file's end, not from `offset`: after an allocation that
        // failed, raft-engine counts space the file never got.
        let from = self.size;
        let done = if self.handle.direct().is_none() {
            fallocate(&self.handle.file, from, end - from).inspect(|()| changed())
        } else {
            self.write_zeros(from, end)
        };
        if let Err(e) = done {
            // Whatever part reached the file: a size read back, and a sync
            // owed for it.
            self.handle.dirty.store(true, Ordering::Release);
            self.size = self.handle.size().unwrap_or(self.size);
            return Err(e);
        }
        self.size = end;
        Ok(())
    }
}

impl LogWriter {
    /// Makes `[from, end)` zeros in written blocks and syncs them. The block
    /// `from` lies in holds acknowledged bytes before `from`: it is left to
    /// the direct writes (past the file's end it reads as zeros anyway), so
    /// the page cache never writes a block a direct write also writes.
    fn write_zeros(&mut self, from: usize, end: usize) -> Result<()> {
        let zeros_from = from.div_ceil(BLOCK) * BLOCK;
        let mut at = zeros_from;
        while at < end {
            let n = (end - at).min(ZEROS.len());
            self.handle
                .file
                .write_all_at(&ZEROS[..n], at as u64)
                .map_err(no_space)?;
            changed();
            at += n;
        }
        if zeros_from >= end {
            // All of it within `from`'s block, so no zeros were written:
            // only the size moves.
            self.handle.file.set_len(end as u64).map_err(no_space)?;
            changed();
        }
        self.handle.file.sync_data()
    }
}

/// raft-engine knows a full disk by "nospace" in the error's text (its
/// own files say so); it then starts a new file and asks to try again.
fn no_space(e: Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::new(ErrorKind::StorageFull, format!("nospace: {e}"))
    } else {
        e
    }
}

fn fallocate(file: &File, offset: usize, len: usize) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` owns.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let e = Error::last_os_error();
    match e.raw_os_error() {
        // Not every file system reserves space; writes will allocate it.
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(no_space(e)),
    }
}

impl FileSystem for LogFiles {
    type Handle = LogFile;
    type Reader = LogReader;
    type Writer = LogWriter;

    fn create<P: AsRef<Path>>(&self, path: P) -> Result<LogFile> {
        let file = LogFile::open(path.as_ref(), true, Permission::ReadWrite, self.direct)?;
        changed();
        Ok(file)
    }

    fn open<P: AsRef<Path>>(&self, path: P, perm: Permission) -> Result<LogFile> {
        LogFile::open(path.as_ref(), false, perm, self.direct)
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        std::fs::remove_file(path)?;
        changed();
        Ok(())
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> Result<()> {
        std::fs::rename(src_path, dst_path)?;
        changed();
        Ok(())
    }

    /// A purged file taken for a new one: the rename is made durable
    /// before raft-engine writes the new header. A whole-block write puts
    /// zeros over the old file's first records; were the rename lost in a
    /// power cut, the old file would come back under its old name, among
    /// the files replayed, broken — and the node would refuse to start.
    /// (raft-engine's own files write only the header's bytes, the same
    /// as before, and sync the directory after.)
    fn reuse<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> Result<()> {
        let dst = dst_path.as_ref();
        std::fs::rename(src_path.as_ref(), dst)?;
        changed();
        let dir = dst.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    }

    fn new_reader(&self, handle: Arc<LogFile>) -> Result<LogReader> {
        Ok(LogReader { handle, offset: 0 })
    }

    fn new_writer(&self, handle: Arc<LogFile>) -> Result<LogWriter> {
        let size = handle.size()?;
        Ok(LogWriter {
            handle,
            offset: 0,
            size,
            tail: Aligned::new(),
            tail_loaded: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What raft-engine's `LogFileWriter` does with a writer, reduced to
    /// its bookkeeping: it allocates ahead in chunks, never fewer bytes
    /// than the record needs, and counts the file's size as what it
    /// allocated (`capacity`).
    struct Engineish {
        writer: LogWriter,
        written: usize,
        capacity: usize,
        chunk: usize,
    }

    impl Engineish {
        fn open(dir: &Path, chunk: usize) -> Engineish {
            let path = dir.join("0000000000000001.raftlog");
            let handle = Arc::new(LogFiles::default().create(&path).unwrap());
            assert!(
                handle.direct.is_some(),
                "the test directory refused O_DIRECT: this test would not test direct writes"
            );
            let size = handle.file_size().unwrap();
            let mut writer = LogFiles::default().new_writer(handle).unwrap();
            writer.seek(SeekFrom::Start(size as u64)).unwrap();
            Engineish {
                writer,
                written: size,
                capacity: size,
                chunk,
            }
        }

        fn append(&mut self, record: &[u8]) {
            let new_written = self.written + record.len();
            if self.capacity < new_written {
                let alloc = (new_written - self.capacity).max(self.chunk);
                self.writer.allocate(self.capacity, alloc).unwrap();
                self.capacity += alloc;
            }
            self.writer.write_all(record).unwrap();
            self.written = new_written;
        }

        /// As raft-engine closes a file: cut what was allocated and not
        /// written, then sync.
        fn close(&mut self) {
            if self.written < self.capacity {
                WriteExt::truncate(&mut self.writer, self.written).unwrap();
                self.capacity = self.written;
            }
            self.writer.handle.sync().unwrap();
        }
    }

    fn record(seed: usize, len: usize) -> Vec<u8> {
        // Never a zero byte: a zero where a record was would hide in padding.
        (0..len)
            .map(|i| (((seed * 31 + i) % 251) + 1) as u8)
            .collect()
    }

    fn check(dir: &Path, e: &Engineish, model: &[u8]) {
        let path = dir.join("0000000000000001.raftlog");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes.len(),
            e.capacity,
            "the file's size must be what was allocated"
        );
        assert!(bytes[..model.len()] == *model, "the records read back");
        assert!(
            bytes[model.len()..].iter().all(|&b| b == 0),
            "zeros past them"
        );
        // And through a reader of the same handle, after the direct writes.
        let mut reader = LogFiles::default()
            .new_reader(e.writer.handle.clone())
            .unwrap();
        let mut through = Vec::new();
        reader.read_to_end(&mut through).unwrap();
        assert!(through == bytes, "a reader sees what the writes left");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// 4 Durability: whatever the record sizes, the allocation chunk
        /// and the reopenings, a file holds exactly its records, then
        /// zeros up to what was allocated, and is never longer — the
        /// condition for raft-engine to open a closed file again.
        #[test]
        fn durability_a_log_file_is_its_records_and_exactly_as_long_as_allocated(
            lens in proptest::collection::vec(1usize..12_000, 1..60),
            chunk in prop_oneof![Just(1usize), 1usize..9_000, Just(2 << 20)],
            reopen_every in 2usize..20,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut e = Engineish::open(dir.path(), chunk);
            let mut model = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let r = record(i, *len);
                e.append(&r);
                model.extend_from_slice(&r);
                check(dir.path(), &e, &model);
                if i % reopen_every == reopen_every - 1 {
                    // A new writer picks the last partial block up from the file.
                    e.close();
                    e = Engineish::open(dir.path(), chunk);
                }
            }
            e.close();
            check(dir.path(), &e, &model);
        }
    }

    /// 4 Durability: a writer sent back (raft-engine seeks to the last
    /// good offset after a failed write, or rewinds to rewrite a header)
    /// writes over what followed, and the block before it keeps its bytes.
    #[test]
    fn durability_a_rewind_writes_over_without_touching_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engineish::open(dir.path(), 1 << 16);
        let a = record(1, 5_000);
        e.append(&a);
        e.append(&record(2, 3_000));
        e.writer.seek(SeekFrom::Start(a.len() as u64)).unwrap();
        e.written = a.len();
        let c = record(3, 100);
        e.append(&c);
        let bytes = std::fs::read(dir.path().join("0000000000000001.raftlog")).unwrap();
        assert!(bytes[..a.len()] == *a);
        assert!(bytes[a.len()..a.len() + c.len()] == *c);
        // What followed `c` in its block was the second record: the
        // whole-block write replaced it with zeros, as raft-engine expects
        // of space past its offset.
        let block_end = (a.len() + c.len()).div_ceil(BLOCK) * BLOCK;
        assert!(bytes[a.len() + c.len()..block_end].iter().all(|&b| b == 0));
    }

    /// Where `O_DIRECT` is refused (older tmpfs), a file keeps
    /// raft-engine's own way: writes through the page cache, each `sync`
    /// an `fdatasync`.
    #[test]
    fn durability_without_o_direct_the_page_cache_way_is_kept() {
        let files = LogFiles { direct: false };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0000000000000001.raftlog");
        let handle = Arc::new(files.create(&path).unwrap());
        assert!(handle.direct.is_none());
        let mut writer = files.new_writer(handle.clone()).unwrap();
        writer.allocate(0, 10_000).unwrap();
        writer.write_all(&record(7, 3_333)).unwrap();
        assert!(handle.dirty.load(Ordering::Acquire));
        handle.sync().unwrap();
        assert!(!handle.dirty.load(Ordering::Acquire));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes[..3_333] == *record(7, 3_333));
    }

    /// raft-engine with 64 KiB files, so that a test fills and closes many.
    fn small_files(dir: &Path, purge_threshold: raft_engine::ReadableSize) -> raft_engine::Config {
        raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: raft_engine::ReadableSize::kb(64),
            purge_threshold,
            batch_compression_threshold: raft_engine::ReadableSize(0),
            ..Default::default()
        }
    }

    fn try_open_ours(
        config: &raft_engine::Config,
    ) -> raft_engine::Result<raft_engine::Engine<LogFiles>> {
        raft_engine::Engine::open_with_file_system(config.clone(), Arc::new(LogFiles::default()))
    }

    fn open_ours(config: &raft_engine::Config) -> raft_engine::Engine<LogFiles> {
        try_open_ours(config).unwrap()
    }

    /// 4 Durability, through raft-engine itself: after many files were
    /// filled, closed and opened again, every record reads back — a closed
    /// file left longer than its records would be refused on open.
    #[test]
    fn durability_raft_engine_reopens_every_file_it_filled() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_files(dir.path(), raft_engine::ReadableSize::mb(4));
        let open = || open_ours(&config);
        let value = |i: usize| record(i, 1 + (i * 7_919) % 9_000);
        let writes: usize = 400;
        for round in 0..2 {
            let engine = open();
            for i in round * writes..(round + 1) * writes {
                let mut batch = raft_engine::LogBatch::default();
                batch.put(1, i.to_be_bytes().to_vec(), value(i)).unwrap();
                engine.write(&mut batch, true).unwrap();
            }
        }
        let files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "raftlog")
            })
            .count();
        assert!(
            files >= 10,
            "only {files} files: the test must fill and close many"
        );
        let engine = open();
        for i in 0..2 * writes {
            assert_eq!(
                engine.get(1, &i.to_be_bytes()),
                Some(value(i)),
                "record {i}"
            );
        }
    }

    /// raft-engine recognises a full disk by the text of the error; a full
    /// disk under these files must read as one to it.
    #[test]
    fn durability_a_full_disk_reads_as_one_to_raft_engine() {
        let e = no_space(Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::StorageFull);
        assert!(e.to_string().contains("nospace"), "{e}");
        let other = no_space(Error::from_raw_os_error(libc::EIO));
        assert!(!other.to_string().contains("nospace"));
    }

    /// 4 Durability across an upgrade and back: a log raft-engine's own
    /// files wrote is read and continued by these, and what these wrote
    /// is read by raft-engine's own files again.
    #[test]
    fn durability_a_log_crosses_to_and_from_raft_engines_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_files(dir.path(), raft_engine::ReadableSize::mb(4));
        let value = |i: usize| record(i, 1 + (i * 7_919) % 9_000);
        let write = |engine: &dyn Fn(&mut raft_engine::LogBatch), from: usize, to: usize| {
            for i in from..to {
                let mut batch = raft_engine::LogBatch::default();
                batch.put(1, i.to_be_bytes().to_vec(), value(i)).unwrap();
                engine(&mut batch);
            }
        };
        let own = || raft_engine::Engine::open(config.clone()).unwrap();
        let ours = || open_ours(&config);
        {
            let e = own();
            write(
                &|b| {
                    e.write(b, true).unwrap();
                },
                0,
                150,
            );
        }
        {
            let e = ours();
            for i in 0..150usize {
                assert_eq!(e.get(1, &i.to_be_bytes()), Some(value(i)), "record {i}");
            }
            write(
                &|b| {
                    e.write(b, true).unwrap();
                },
                150,
                300,
            );
        }
        let e = own();
        for i in 0..300usize {
            assert_eq!(e.get(1, &i.to_be_bytes()), Some(value(i)), "record {i}");
        }
    }

    /// 4 Durability: where the file system takes the `O_DIRECT` open but
    /// refuses the write, the record goes through the page cache instead,
    /// and `sync` is an `fdatasync` again — nothing lost, nothing refused.
    #[test]
    fn durability_a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Engineish::open(dir.path(), 1 << 16);
        let a = record(1, 5_000);
        e.append(&a);
        fail::cfg(FAILPOINT_DIRECT_WRITE_REFUSED, "return").unwrap();
        let b = record(2, 3_000);
        e.append(&b);
        fail::remove(FAILPOINT_DIRECT_WRITE_REFUSED);
        let handle = e.writer.handle.clone();
        assert!(handle.direct().is_none(), "direct writes turned off");
        assert!(handle.dirty.load(Ordering::Acquire), "a sync is owed");
        handle.sync().unwrap();
        let c = record(3, 700);
        e.append(&c);
        e.close();
        check(dir.path(), &e, &[a, b, c].concat());
    }

    /// 4 Durability: files raft-engine purged and takes again for new ones
    /// (recycling, on by default) read back right after many rounds and a
    /// reopening; `reuse` makes each rename durable before the new header
    /// is written over the old records.
    #[test]
    fn durability_recycled_files_hold_what_was_written_last() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_files(dir.path(), raft_engine::ReadableSize::kb(512));
        let open = || open_ours(&config);
        let value = |round: usize, key: usize| {
            record(round * 100 + key, 1 + (round * 7_919 + key * 131) % 9_000)
        };
        let rounds = 40;
        {
            let engine = open();
            for round in 0..rounds {
                for key in 0..20usize {
                    let mut batch = raft_engine::LogBatch::default();
                    batch
                        .put(1, key.to_be_bytes().to_vec(), value(round, key))
                        .unwrap();
                    engine.write(&mut batch, true).unwrap();
                }
                engine.purge_expired_files().unwrap();
            }
        }
        let engine = open();
        for key in 0..20usize {
            assert_eq!(
                engine.get(1, &key.to_be_bytes()),
                Some(value(rounds - 1, key)),
                "key {key}"
            );
        }
    }

    /// The keys the crash test writes over and over.
    const KEYS: usize = 12;

    /// What a run wrote and had acknowledged, for the checks made at every
    /// change to its files.
    #[derive(Default)]
    struct Acknowledged {
        /// Each key's value as of the last write that returned.
        values: std::collections::BTreeMap<usize, Vec<u8>>,
        /// The write under way: it may or may not be found.
        pending: Option<(usize, Vec<u8>)>,
        instants: usize,
        failures: Vec<String>,
    }

    /// Copies `from`'s files into a fresh directory, opens raft-engine
    /// there, and notes in `ack` where it disagrees with what was
    /// acknowledged.
    fn check_a_crash_here(from: &Path, config: &raft_engine::Config, ack: &mut Acknowledged) {
        ack.instants += 1;
        let instant = ack.instants;
        let copy = tempfile::tempdir().unwrap();
        for file in std::fs::read_dir(from).unwrap() {
            let file = file.unwrap();
            if file.file_type().unwrap().is_file() {
                std::fs::copy(file.path(), copy.path().join(file.file_name())).unwrap();
            }
        }
        let mut config = config.clone();
        config.dir = copy.path().to_string_lossy().into_owned();
        let engine = match try_open_ours(&config) {
            Ok(engine) => engine,
            Err(e) => {
                ack.failures
                    .push(format!("instant {instant}: cannot open: {e}"));
                return;
            }
        };
        for key in 0..KEYS {
            let found = engine.get(1, &key.to_be_bytes());
            let acknowledged = ack.values.get(&key);
            let pending = ack
                .pending
                .as_ref()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v);
            if found.as_ref() != acknowledged && found.as_ref() != pending {
                ack.failures.push(format!(
                    "instant {instant}: key {key} read {:?} bytes, acknowledged {:?}",
                    found.map(|v| v.len()),
                    acknowledged.map(|v| v.len())
                ));
            }
        }
    }

    /// 4 Durability, at every instant a killed process could stop in: after
    /// each change this module makes to the files (each block written,
    /// each cut-back, each allocation's zeros, each file created, renamed
    /// for reuse or deleted), a copy of the directory as it stands opens
    /// in raft-engine and holds every acknowledged write — through file
    /// rotations, purges that recycle files, and a reopening mid-run. A
    /// process crash keeps the page cache, so the copy is exactly what the
    /// restarted node would find. (A power cut drops more; what `fsync`
    /// promises there is written down in RELIABILITY.md.)
    #[test]
    fn durability_a_crash_at_any_change_to_the_files_keeps_every_acknowledged_write() {
        use std::sync::Mutex;
        let dir = tempfile::tempdir().unwrap();
        let config = small_files(dir.path(), raft_engine::ReadableSize::kb(256));
        let ack = Arc::new(Mutex::new(Acknowledged::default()));
        // The checks open raft-engine themselves, which changes files too.
        let checking = Arc::new(AtomicBool::new(false));
        {
            let (ack, checking, config) = (ack.clone(), checking.clone(), config.clone());
            let from = dir.path().to_path_buf();
            fail::cfg_callback(FAILPOINT_FILES_CHANGED, move || {
                if checking.swap(true, Ordering::AcqRel) {
                    return;
                }
                check_a_crash_here(&from, &config, &mut ack.lock().unwrap());
                checking.store(false, Ordering::Release);
            })
            .unwrap();
        }
        let value = |i: usize| record(i, 1 + (i * 7_919) % 9_000);
        let writes = 240;
        let mut engine = Some(open_ours(&config));
        for i in 0..writes {
            let key = i % KEYS;
            ack.lock().unwrap().pending = Some((key, value(i)));
            let mut batch = raft_engine::LogBatch::default();
            batch.put(1, key.to_be_bytes().to_vec(), value(i)).unwrap();
            engine.as_ref().unwrap().write(&mut batch, true).unwrap();
            {
                let mut ack = ack.lock().unwrap();
                ack.pending = None;
                ack.values.insert(key, value(i));
            }
            if i % 30 == 29 {
                engine.as_ref().unwrap().purge_expired_files().unwrap();
            }
            if i == writes / 2 {
                // A writer that starts inside a block written before.
                drop(engine.take());
                engine = Some(open_ours(&config));
            }
        }
        drop(engine);
        fail::remove(FAILPOINT_FILES_CHANGED);
        let ack = ack.lock().unwrap();
        assert!(
            ack.failures.is_empty(),
            "{} of {} instants lost or broke acknowledged writes, first: {:?}",
            ack.failures.len(),
            ack.instants,
            &ack.failures[..ack.failures.len().min(5)]
        );
        let files_made = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(
            ack.instants > writes && files_made > 3,
            "the run must reach rotations and many instants: {} instants, {files_made} files",
            ack.instants
        );
    }
}
