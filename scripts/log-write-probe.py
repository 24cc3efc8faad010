"""How a log record can reach the disk, compared on this machine: N
records of 2,400 bytes (about one Raft turn's batch), each made durable
before the next, written five ways:

  fallocated+fdatasync   into fallocated space, then fdatasync (what
                         raft-engine does, fallocating 2 MiB at a time:
                         the unwritten extents are converted at each sync)
  appending+fdatasync    extending the file, then fdatasync
  prewritten+fdatasync   into space already written and synced
  prewritten O_DSYNC     the same, the file opened O_DSYNC
  prewritten O_DIRECT    O_DIRECT|O_DSYNC, 4 KiB-aligned blocks (the
                         block a record ends in is written again)

Prints latency and CPU per record; a way the file system refuses (tmpfs
has no O_DIRECT) is named and skipped. The files live under
$FSYNC_PROBE_DIR (default: target/), as for scripts/fsync-rate.py.

    python3 scripts/log-write-probe.py [ROUNDS] [N]     (default 2 rounds of 3000)
"""
import mmap
import os
import statistics
import sys
import time

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
N = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
RECORD = 2400
DIR = os.environ.get("FSYNC_PROBE_DIR", "target")
TOTAL = N * RECORD + (1 << 20)
record = b"x" * RECORD
# O_DIRECT needs an aligned buffer: an anonymous mapping is page-aligned.
aligned = mmap.mmap(-1, 8192)
aligned.write(b"y" * 8192)


def prewritten(path, flags=0):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"\0" * TOTAL)
    os.fsync(fd)
    os.close(fd)
    return os.open(path, os.O_RDWR | flags)


def fallocated(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, TOTAL)
    os.fsync(fd)
    return fd


def appending(path):
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def write_then_sync(fd, i):
    os.pwrite(fd, record, i * RECORD)
    os.fdatasync(fd)


def write_only(fd, i):
    os.pwrite(fd, record, i * RECORD)


def write_blocks(fd, i):
    first = i * RECORD // 4096 * 4096
    end = i * RECORD + RECORD
    os.pwritev(fd, [memoryview(aligned)[: 4096 if end <= first + 4096 else 8192]], first)


WAYS = [
    ("fallocated+fdatasync", fallocated, write_then_sync),
    ("appending+fdatasync", appending, write_then_sync),
    ("prewritten+fdatasync", prewritten, write_then_sync),
    ("prewritten O_DSYNC", lambda p: prewritten(p, os.O_DSYNC), write_only),
    ("prewritten O_DIRECT", lambda p: prewritten(p, os.O_DIRECT | os.O_DSYNC), write_blocks),
]

for _ in range(ROUNDS):
    for name, open_file, write in WAYS:
        path = os.path.join(DIR, "log-write-probe")
        if os.path.exists(path):
            os.unlink(path)
        try:
            fd = open_file(path)
            write(fd, 0)
        except OSError as e:
            print(f"{name:22s} not possible here: {e.strerror}")
            if os.path.exists(path):
                os.unlink(path)
            continue
        took = []
        before = os.times()
        for i in range(N):
            start = time.perf_counter()
            write(fd, i)
            took.append(time.perf_counter() - start)
        after = os.times()
        os.close(fd)
        os.unlink(path)
        took.sort()
        cpu = (after.user + after.system - before.user - before.system) / N * 1e6
        print(
            f"{name:22s} mean {statistics.mean(took) * 1e6:4.0f} µs  p50 {took[N // 2] * 1e6:4.0f}"
            f"  p99 {took[int(N * 0.99)] * 1e6:5.0f}  CPU {cpu:3.0f} µs a record"
        )
