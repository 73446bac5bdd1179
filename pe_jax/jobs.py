"""What every job (an embedding folder, a finetuning workdir) shares: one job per folder at a time, and storage
faults that end in one line naming what failed and on which file.

Locks are advisory `fcntl.flock` locks on files in the folder (`job.lock`, and per part `locks/part-N.lock`):
the kernel releases them when their holder exits, even by SIGKILL, so a killed job never leaves a stale lock.
`job.lock` records its holder (pid, host, start time, command) for the refusal message. A job takes it
exclusively; `--join` takes it shared, so several joining processes share a folder (each then takes only
parts nobody holds) while a plain run is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time


class FolderBusy(ValueError):
    """Another process holds the folder's job lock."""


class StorageError(OSError):
    """A write or read that the storage refused: one line naming what failed and the file."""

    def __str__(self):
        return self.args[1] if len(self.args) > 1 else super().__str__()


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def storage_error(e: OSError, path: str, action: str = "write") -> StorageError:
    """`e` as one line: 'cannot write PATH: No space left on device'. An error without an errno (numpy's
    'N requested and M written' on a short write) is named by the free space left where `path` lives."""
    if isinstance(e, StorageError):
        return e
    code = e.errno
    if code is None and _free_bytes(path) == 0:
        code = errno.ENOSPC
    reason = _REASONS.get(code) or e.strerror or str(e)
    return StorageError(code, f"cannot {action} {path}: {reason[0].upper()}{reason[1:]}", path)


def _free_bytes(path: str) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
        return st.f_bavail * st.f_frsize
    return None


def atomic_write(path: str, write):
    """Calls `write(tmp)` with a temporary name beside `path` (`PATH.tmp-PID`), then renames it into place.
    Nothing half-written is left: on any error the temporary is removed; storage errors name `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise storage_error(e, path) from None
        raise


def write_text(path: str, text: str):
    atomic_write(path, lambda p: _write(p, text))


def _write(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------ locks


def _open_lock(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise storage_error(e, path, "create the lock file") from None


def try_lock(path: str, shared: bool = False) -> int | None:
    """A file descriptor holding a flock on `path` (created if needed), or None when another holds it."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


NO_LOCK = -1  # held where there is nothing to lock (an object store)


def release(fd: int | None):
    if fd is not None and fd != NO_LOCK:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def locked(path: str):
    """Waits for an exclusive flock on `path` (short critical sections: the manifest's check and write)."""
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        release(fd)


def holder(path: str) -> str:
    """Who holds the lock at `path`, from its record: 'pid 123 on host h since 2026-12-01 22:00:00 (pe-jax embed)'."""
    try:
        with open(path) as f:
            info = json.loads(f.read() or "null")
        return (f"pid {info['pid']} on {info['host']} since {info['started']}"
                + (" (--join)" if info.get("join") else "") + f": {info['command']}")
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (its record is unreadable)"


@contextlib.contextmanager
def folder_lock(folder: str, what: str, *, join: bool = False, hint: str = ""):
    """Holds `FOLDER/job.lock` for the block: exclusively, or shared with other joiners when `join`. Raises
    FolderBusy naming the holder when it cannot be taken."""
    path = os.path.join(folder, "job.lock")
    fd = try_lock(path, shared=join)
    if fd is None:
        raise FolderBusy(f"{folder} is in use by another {what} ({holder(path)}); wait for it to finish"
                         + (f", {hint}" if hint else "") + ", or use another folder")
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "join": join,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8", "surrogateescape"), 0)
        yield
    finally:
        release(fd)
