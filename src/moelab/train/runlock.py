"""One training process per run directory: an OS lock on RUN_DIR/.lock for the life of `moelab train`.

Two runs writing the same directory would interleave checkpoints and metrics, and the one that
finishes last silently wins. An flock belongs to the open file, so the kernel drops it however the
process ends (SIGKILL included): a dead run never blocks the next one and nothing stale needs
cleaning. The file holds the holder's pid, for the message that refuses a second run. Under
torchrun only rank 0 locks (the ranks of one job share the directory).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from moelab.errors import MoelabError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive lock on a run directory, created (with its missing parents) when acquired."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # directories acquire() made, deepest first

    def acquire(self) -> None:
        """Take the lock or raise MoelabError naming the process that holds it."""
        missing, p = [], self.run_dir
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise MoelabError(
                    f"{self.run_dir} is in use by another moelab train ({who}); wait for it to end, "
                    f"or give another --out"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning(
                    "%s: this filesystem has no file locks; make sure one run at a time uses it", self.path
                )
                return
            # a failed run that made the directory removes it with the lock file: lock the file that is there
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self, discard: tuple[str, ...] | None = None) -> None:
        """Unlock. discard: names this run wrote; a directory acquire() created that holds nothing
        else is removed again (with its created parents), so a run that failed its checks leaves none."""
        if discard is not None and self._created:
            ours = {LOCK_FILE, *discard}
            if self.run_dir.is_dir() and all(p.name in ours for p in self.run_dir.iterdir()):
                for name in ours:
                    (self.run_dir / name).unlink(missing_ok=True)  # before the unlock: see acquire()
                for d in self._created:
                    try:
                        d.rmdir()
                    except OSError:
                        break
            self._created = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
