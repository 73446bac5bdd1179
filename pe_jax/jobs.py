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
import stat
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


TMP_MARK = ".pe_jax-tmp-"  # NAME.pe_jax-tmp-PID-RANDOM@HOST: what pe-jax's sweeps may remove (see sweep_temporaries)


def temporary_name(path: str) -> str:
    """A pe-jax temporary beside `path`: `PATH.pe_jax-tmp-PID-RANDOM@HOST` (host and pid say whose it is)."""
    return f"{path}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}@{socket.gethostname()}"


def temporary_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a pe-jax temporary's name, or None for any other name."""
    if TMP_MARK not in name:
        return None
    pid, _, host = name.rsplit(TMP_MARK, 1)[1].partition("@")
    pid = pid.split("-", 1)[0]
    return (int(pid), host) if pid.isdigit() and host else None


def create_new(path: str, mode: int = 0o644) -> int:
    """A file descriptor of a new file at `path`, opened for writing: O_EXCL and O_NOFOLLOW, so an existing file
    or a symbolic link planted there is never written through (FileExistsError)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def atomic_write(path: str, write):
    """Calls `write(f)` on a new binary file beside `path` (`temporary_name`, created exclusively: never through
    a link), then renames it into place. Nothing half-written is left: on any error the temporary is removed;
    storage errors name `path`."""
    tmp = temporary_name(path)
    try:
        with os.fdopen(create_new(tmp), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise storage_error(e, path) from None
        raise


def write_text(path: str, text: str):
    """`text` written to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))


# ------------------------------------------------------------------------------------------------ locks


def _open_lock(path: str) -> int:
    """The lock file, never followed through a symbolic link nor opened when it is not a regular file (a FIFO, a
    device): one line naming it instead."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StorageError(e.errno, f"cannot use the lock file {path}: it is a symbolic link (pe-jax never "
                                        "writes through links); remove it", path) from None
        raise storage_error(e, path, "create the lock file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(errno.EINVAL, f"cannot use the lock file {path}: it is not a regular file; remove it", path)
    return fd


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
        if os.fstat(fd).st_nlink == 1:  # a hard link planted there would make the record overwrite its other name
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode("utf-8", "surrogateescape"), 0)
        yield
    finally:
        release(fd)
