"""Where `pe-jax convert` and `pe-jax export` put their output, and what they may replace: never anything they
could not have written.

* An empty output path (an unset shell variable) is an error. `--force` replaces only an empty directory or a
  pe_jax checkpoint (a directory holding `pe_jax.json`, `state/` and nothing but what pe_jax writes beside
  them, whose checksums.json and pe_jax.json are pe_jax's and list exactly the files under state/) for convert,
  and only a safetensors file for export; anything else (a project folder, some other
  file, a link) is refused, named, and left as is.
* One writer per output: a lock file `.NAME.pe_jax-lock` beside it, flock()ed for the whole run (flock is
  released by the kernel when its holder dies, so a killed run never blocks the next). A second writer fails
  at once naming the holder's pid.
* Output is built in a sibling `NAME.pe_jax-tmp-PID-RANDOM@HOST` (pe_jax.storage.atomic, the one convention
  of pe-jax's temporaries) and renamed into place at the end, after the destination is checked again: it may
  have appeared while the conversion ran. The rename cannot clobber (storage.atomic.rename_noreplace:
  renameat2's RENAME_NOREPLACE, or its portable fallbacks), and a --force replacement is an exchange whose old
  side is checked once more and swapped back if it changed (storage.atomic.replace_checked): nothing with
  content is ever lost.
* Partial outputs of killed runs are swept by the next run into the same folder (the one sweeper,
  storage.atomic.sweep_temporaries): a temporary whose PID no longer runs on this machine and whose output's
  lock nobody holds (a live run on another machine sharing the folder holds it) is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import re
import stat

from pe_jax.checkpoints.orbax import METADATA_FILE, STATE_DIR
from pe_jax.errors import AlreadyExists, InUse, NoPermission, NotFound, UsageError
from pe_jax.storage.atomic import (  # noqa: F401 (the renames' former home)
    AT_FDCWD,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    TMP_MARK,
    atomic_file,
    atomic_folder,
    rename_noreplace,
    renameat2,
    replace_checked,
    sweep_temporaries,
)

ONLY = "--force replaces only an empty directory or a pe_jax checkpoint"
ONLY_FILE = "--force replaces only a safetensors file"
STAGING = re.compile(rf"^(?P<name>.+){re.escape(TMP_MARK)}(?P<pid>\d+)-[0-9a-f]{{8}}@.+$")  # pe-jax's temporaries
LOCK_SUFFIX = ".pe_jax-lock"
# What else pe_jax writes at a checkpoint's top level (pe_jax.checkpoints.verify.CHECKSUMS_FILE; a test checks).
CHECKPOINT_EXTRAS = frozenset({"checksums.json"})


def output_path(path, what: str = "DST") -> str:
    """The absolute output path; an empty one (an unset shell variable) is an error, never the current folder."""
    path = os.fspath(path)
    if not path.strip():
        raise UsageError(f"the output path {what} is empty ({path!r}; an unset shell variable?): name it explicitly")
    path = os.path.abspath(path)
    if not os.path.basename(path):
        raise UsageError(f"{path} cannot be an output: name a new folder or file inside it")
    return path


def _listing(path: str, limit: int = 5) -> str:
    names = sorted(os.listdir(path))
    if not names:
        return "nothing"
    shown = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names[:limit]]
    return f"{len(names)} entries: {', '.join(shown)}{', ...' if len(names) > limit else ''}"


def not_a_checkpoint(path: str) -> str | None:
    """None if --force may replace `path` (an empty directory or a pe_jax checkpoint), else what it is."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    if not stat.S_ISDIR(mode):
        return f"a file ({os.lstat(path).st_size} bytes)" if stat.S_ISREG(mode) else "not a directory"
    names = set(os.listdir(path))
    meta, state = os.path.join(path, METADATA_FILE), os.path.join(path, STATE_DIR)
    if not names:
        return None
    if not ({METADATA_FILE, STATE_DIR} <= names <= {METADATA_FILE, STATE_DIR, *CHECKPOINT_EXTRAS}
            and stat.S_ISREG(os.lstat(meta).st_mode) and stat.S_ISDIR(os.lstat(state).st_mode)):
        return f"a directory that is not a pe_jax checkpoint (holding {_listing(path)})"
    return _not_as_recorded(path)


def _not_as_recorded(path: str) -> str | None:
    """None if the checkpoint's checksums.json and pe_jax.json are pe_jax's (the table consistent with its
    content hash, the metadata naming the same hash) and the table names exactly the files under state/, with
    their sizes; else what does not fit. Names alone prove nothing: a user's file may sit in state/."""
    from pe_jax.checkpoints.verify import CHECKSUMS_FILE, CheckpointIntegrityError, read_checksums, state_files
    from pe_jax.storage.files import read_capped

    not_ours = "a directory that is not exactly a pe_jax checkpoint"
    if not os.path.lexists(os.path.join(path, CHECKSUMS_FILE)):
        return f"{not_ours} (no {CHECKSUMS_FILE}: what it holds cannot be told to be what pe_jax wrote)"
    try:
        table = read_checksums(path)
        meta = json.loads(read_capped(os.path.join(path, METADATA_FILE)))
    except (CheckpointIntegrityError, OSError, ValueError, RecursionError) as e:
        return f"{not_ours} ({e})"
    if not isinstance(meta, dict) or meta.get("content_hash") != table.get("content_hash"):
        return f"{not_ours} ({METADATA_FILE} does not name the content hash of its {CHECKSUMS_FILE})"
    disk, files = state_files(path), table["files"]
    for rel in sorted(set(disk) | set(files)):
        if rel not in files:
            return f"{not_ours} (holding {rel}, which its {CHECKSUMS_FILE} does not list)"
        if disk.get(rel) != files[rel][0]:
            return f"{not_ours} ({rel} is {'missing' if rel not in disk else 'of another size'})"
    return None


def is_safetensors(path: str) -> bool:
    """Whether `path` is a regular file with a well-formed safetensors header that accounts for its size."""
    try:
        size = os.lstat(path).st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode) or not 2 <= n <= min(size - 8, 1 << 27):
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return all(isinstance(e, int) for e in ends) and 8 + n + max(ends, default=0) == size
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


def not_a_safetensors_file(path: str) -> str | None:
    """None if --force may replace `path` (a safetensors file), else what it is."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    if stat.S_ISDIR(mode):
        return f"a directory (holding {_listing(path)})"
    return None if is_safetensors(path) else "not a safetensors file"


def check_destination(dst, force: bool, *, file: bool = False, appeared: bool = False) -> str:
    """The absolute `dst` if it may be written (missing, or replaceable with --force); else FileExistsError."""
    dst = output_path(dst, "OUT" if file else "DST")
    if not os.path.lexists(dst):
        return dst
    what = (not_a_safetensors_file if file else not_a_checkpoint)(dst)
    if what is not None:
        raise AlreadyExists(f"{dst} is {'now ' if appeared else ''}{what}; "
                              f"{ONLY_FILE if file else ONLY}, so it is left as it is: choose another output")
    if not force:
        raise AlreadyExists(f"{dst} {'was created while writing; not replacing it' if appeared else 'exists'}"
                              f"; pass --force to replace it")
    return dst


def check_parent(dst: str) -> str:
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise NotFound(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NoPermission(f"cannot write to {parent}")
    return parent


def commit(tmp: str, dst: str, force: bool, *, file: bool = False):
    """Renames the finished `tmp` to `dst`, checking `dst` again: it may have appeared or changed meanwhile."""
    if not os.path.lexists(dst):
        with contextlib.suppress(FileExistsError):
            return rename_noreplace(tmp, dst)
    check_destination(dst, force, file=file, appeared=True)
    replace_checked(tmp, dst, not_a_safetensors_file if file else not_a_checkpoint)


def _lock_path(dst: str) -> str:
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{LOCK_SUFFIX}")


def try_lock(dst: str) -> int | None:
    """A file descriptor holding the lock of output `dst`, or None if another process holds it."""
    path = _lock_path(dst)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted there: never written
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:  # no flock on this filesystem: go on unlocked (the renames still cannot clobber)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a lock file its last holder just removed
                if os.fstat(fd).st_nlink != 1:  # a hard link planted there: truncating would empty its other name
                    os.close(fd)
                    raise OSError(errno.EMLINK, "a hard link to another file", path)
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        os.close(fd)


def unlock(dst: str, fd: int):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(dst))  # before the unlock, so a waiter that opened it sees it gone and retries
    os.close(fd)


@contextlib.contextmanager
def locked(dst: str):
    """Holds the lock of output `dst` (see the module's docstring); BlockingIOError naming the holder if taken."""
    try:
        fd = try_lock(dst)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EINVAL, errno.EMLINK):  # never written through a link or into a FIFO
            raise NoPermission(f"cannot use the lock file {_lock_path(dst)}: it is "
                                  + {errno.ELOOP: "a symbolic link", errno.EMLINK: "a hard link to another file"}.get(
                                      e.errno, "not a regular file") + " (pe-jax never writes through it); remove it") \
                from None
        raise NoPermission(f"cannot write to {os.path.dirname(dst)}: {e.strerror}") from None
    if fd is None:
        with contextlib.suppress(OSError), open(_lock_path(dst)) as f:
            holder = f.read(20).strip()
        raise InUse(f"another pe-jax process (pid {holder or '?'}) is writing {dst}; wait for it or "
                    "choose another output")
    try:
        yield
    finally:
        unlock(dst, fd)


@contextlib.contextmanager
def _unclaimed(target: str, own: str | None):
    """Whether no live run writes `target` (its lock is free, or ours), held while its temporaries go."""
    fd = None if target == own else try_lock(target)
    try:
        yield target == own or fd is not None
    finally:
        if fd is not None:
            unlock(target, fd)


def sweep_stale(parent: str, own: str | None = None) -> list[str]:
    """Removes the partial outputs in `parent` of runs that died (see the module's docstring); returns them.
    `own`: the output this process holds the lock of."""
    return sweep_temporaries(parent, guard=functools.partial(_unclaimed, own=own))


@contextlib.contextmanager
def _locked_output(dst: str, force: bool, *, file: bool = False):
    parent = check_parent(dst)
    with locked(dst):
        check_destination(dst, force, file=file)
        with contextlib.suppress(OSError):
            sweep_stale(parent, own=dst)
        yield


@contextlib.contextmanager
def staging(dst, force: bool):
    """A temporary sibling folder of `dst`, renamed to `dst` on success (see commit) and removed on failure."""
    dst = output_path(dst)
    with _locked_output(dst, force), atomic_folder(dst, commit=functools.partial(commit, force=force)) as tmp:
        yield tmp


def write_file(out, force: bool, write):
    """Calls `write(tmp)` on a temporary sibling file of `out`, then renames it to `out` (see commit)."""
    out = output_path(out, "OUT")
    with _locked_output(out, force, file=True), \
            atomic_file(out, commit=functools.partial(commit, force=force, file=True)) as tmp:
        write(tmp)
