"""One job per folder at a time (an embedding folder, a finetuning workdir).

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

from pe_jax.errors import PeJaxError
from pe_jax.storage.atomic import StorageError, storage_error


class FolderBusy(PeJaxError, ValueError):
    """Another process holds the folder's job lock."""


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
