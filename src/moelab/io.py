"""Atomic outputs: write to a temporary sibling, fsync, rename only when complete.

Nothing half-written ever carries the final name, so an interrupted command leaves either the
previous output or nothing, never a file or directory that looks valid.

Temporaries are hidden siblings named `.NAME.tmp-PID@HOST-XXXXXXXX` (`.NAME.old-...` for an output
being replaced), PID@HOST naming the process that writes them. A process killed by SIGKILL cannot
remove its own, so every writer first removes those of dead processes in the directory it writes to
(`remove_stale`); a live process's are left alone. Liveness is a pid check, which only means
something on the writer's own host: temporaries of other hosts sharing the filesystem are never
touched, so two machines must not share a hostname as well as a filesystem (containers given one
fixed hostname), or one could remove the other's temporaries.

A write that fails because the disk (or a quota) is full becomes `DiskFullError`, one line naming the
output and the space at stake, raised after the temporary is removed so the disk is not left full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moelab.errors import MoelabError

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:32] or "localhost"
# .NAME.tmp-PID@HOST-XXXXXXXX: mkdtemp/mkstemp add the 8 random characters
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-\w{8}$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MoelabError):
    """No space left (or a quota exceeded) while writing an output; the partial output is removed."""

    def __init__(
        self, message: str, path: str | Path | None = None, needed: int | None = None, hint: str = ""
    ):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.needed, self.hint = needed, hint  # what disk_full was given, to restate it once space is back


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{os.getpid()}@{_HOST}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):  # no process can have that id
        return False
    return True


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(directory: str | Path) -> list[Path]:
    """Remove the temporaries in `directory` of processes on this host that no longer run.

    A `.NAME.old-...` whose NAME is missing is an output that was being replaced when its writer was
    killed between the two renames: it is renamed back instead. Returns the paths removed or restored.
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    done = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        final = path.with_name(m["name"])
        if m["kind"] == "old" and not os.path.lexists(final):
            with contextlib.suppress(OSError):  # another process may be restoring it too
                path.rename(final)
        else:
            _delete(path)
        done.append(path)
    return done


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that an interruption never leaves part of it under its own name: it is
    first renamed to a temporary, which `remove_stale` finishes off if this process is killed."""
    path = Path(path)
    doomed = path.with_name(_temp_prefix(path.name) + secrets.token_hex(4))
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _finish_tree(path: Path) -> None:
    """fsync every file and give it the mode of any new file (0666 & ~umask; some writers, such as
    safetensors, create 0600 files)."""
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        if f.stat().st_mode & 0o777 != mode:
            f.chmod(mode)


def tree_size(path: str | Path) -> int:
    """Bytes held by the files under `path` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds or would hold `path`."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def reserve(path: str | Path) -> None:
    """Allocate the blocks of a pre-sized (sparse) file now. Writing through a memory map into a file
    whose blocks the disk cannot supply kills the process with SIGBUS; reserved, a full disk fails
    here with ENOSPC instead. Filesystems that cannot reserve are left as they are."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in _FULL:
            raise
    finally:
        os.close(fd)


def human_bytes(n: int) -> str:
    """e.g. '1.2 GB (1,234,567,890 bytes)'."""
    if n < 1000:
        return f"{n:,} bytes"
    value, units = n / 1000, ("KB", "MB", "GB", "TB", "PB")
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]} ({n:,} bytes)"


def disk_full(
    path: str | Path,
    needed: int | None = None,
    written: int | None = None,
    hint: str = "",
    before: bool = False,
) -> DiskFullError:
    """The one-line error for a full disk while writing `path`: what it needs (or had written when the
    disk filled), what is free, and what to do (`hint` replaces the default advice). before: refused
    before writing anything."""
    what = f"{'not enough space' if before else 'no space left'} on the device holding {path}"
    free = free_bytes(path)
    if needed is not None:
        what += f": it needs about {human_bytes(needed)} and {human_bytes(free)} are free"
    elif written:
        what += f" (it had written {human_bytes(written)} when the disk filled; {human_bytes(free)} are free)"
    advice = hint or "free some space (or write elsewhere) and run the command again"
    return DiskFullError(f"{what}; {advice}", path, needed, hint)


def _no_room(directory: Path, probe: int = 1 << 20) -> bool:
    """Whether `directory` refuses `probe` more bytes for lack of space (a full disk or quota)."""
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix("space-probe"), dir=directory)
    except OSError as e:
        return e.errno in _FULL
    try:
        block = bytes(1 << 16)
        for _ in range(probe // len(block)):
            if os.write(fd, block) < len(block):
                return True
        os.fsync(fd)  # some filesystems (NFS) report a full disk only here
        return False
    except OSError as e:
        return e.errno in _FULL
    finally:
        os.close(fd)
        os.unlink(name)


# what libraries say when a write fails and they keep the errno to themselves (numpy's tofile,
# torch's stream writer, safetensors' I/O error)
_WRITE_FAILED = ("requested and", "unexpected pos", "file write failed", "i/o error")


def is_disk_full(exc: BaseException, directory: str | Path | None = None) -> bool:
    """Whether `exc` is a write that failed for lack of space: ENOSPC/EDQUOT, a library error saying so,
    or a library write failure without an errno while `directory` has no room left (checked by writing)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _FULL
    text = str(exc).lower()
    if "no space left on device" in text or "disk quota exceeded" in text:
        return True
    if isinstance(exc, MoelabError) or not isinstance(exc, Exception) or directory is None:
        return False
    if not (isinstance(exc, OSError) or any(s in text for s in _WRITE_FAILED)):
        return False
    directory = Path(directory)
    return directory.is_dir() and _no_room(directory)


def refuse_foreign_file(out: str | Path, signature: str, command: str) -> None:
    """Refuse an existing `out` unless its first 64 KB hold `signature` (a file `command` wrote before):
    a typo in --out must not replace somebody's file."""
    out = Path(out)
    if out.is_dir():
        raise MoelabError(f"--out {out} is a directory; give a file name")
    if not out.exists():
        return
    try:
        with open(out, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as e:
        raise MoelabError(
            f"--out {out} exists and cannot be read ({e.strerror}); choose another --out"
        ) from None
    if signature.encode() not in head:
        raise MoelabError(
            f"--out {out} exists and was not written by {command}; choose another --out (nothing was changed)"
        )


@contextlib.contextmanager
def atomic_dir(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block ends without error.

    Stale temporaries of dead processes beside `out` are removed first; a full disk raises
    DiskFullError once the temporary is gone."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; finished outputs get the usual permissions
    try:
        yield tmp
        _finish_tree(tmp)
        if out.exists():
            if not replace:
                raise FileExistsError(out)
            old = out.with_name(_temp_prefix(out.name, "old") + secrets.token_hex(4))
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        full = isinstance(e, DiskFullError) or is_disk_full(e, out.parent)  # a probe needs tmp still there
        written = tree_size(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # restated for `out` (not a path inside the temporary), with the space now free
            needed, hint = (e.needed, e.hint) if isinstance(e, DiskFullError) else (None, "")
            raise disk_full(out, needed=needed, written=written, hint=hint) from None
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary sibling of `out` for writing; it is renamed to `out` on success.

    Stale temporaries beside `out` are removed first; a full disk raises DiskFullError."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(out.name), dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
    except BaseException as e:
        full = is_disk_full(e, out.parent)
        written = tmp.stat().st_size if full and tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(out, written=written) from None
        raise
