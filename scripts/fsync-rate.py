"""Raw fdatasync rate of a disk: 512-byte appends, each followed by
fdatasync, for three seconds. The file lives under $FSYNC_PROBE_DIR
(default: target/)."""
import os
import time

path = os.path.join(os.environ.get("FSYNC_PROBE_DIR", "target"), "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
n, start = 0, time.time()
while time.time() - start < 3:
    os.write(fd, b"x" * 512)
    os.fdatasync(fd)
    n += 1
elapsed = time.time() - start
print(f"{n / elapsed:.0f} fdatasync/s ({elapsed / n * 1e6:.0f} us each)")
os.close(fd)
os.unlink(path)
