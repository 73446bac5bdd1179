"""The one way pe-jax puts bytes where they are read: nothing half-written is ever seen under a final name.

`atomic_write` (with `write_bytes`, `write_text`, `write_json` on it) writes a file through a new temporary
beside it (created exclusively: never through a link) renamed into place, and a URL as one PUT of the whole
object; `atomic_file` / `atomic_folder` give writers that take a name (faiss, safetensors, Orbax, a dataset
generator) a temporary file or folder, renamed into place when the block ends and removed when it fails;
`rename_noreplace`, `rename_into_place` and `replace_checked` are the renames; `sweep_temporaries` is the one
sweeper of what killed writers left.

Every temporary is `PATH.pe_jax-tmp-PID-RANDOM@HOST` (`temporary_name`): the sweeper removes only those of
processes that no longer run on this host, and nothing else. A folder several processes write together (a
multi-host save) is `PATH.pe_jax-tmp-shared`: it names no pid, so no sweeper takes it; its writer removes a
leftover itself. Storage faults are one line naming the file (`StorageError`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import io
import json
import os
import shutil
import socket
import stat

from pe_jax.errors import AlreadyExists, PeJaxError
from pe_jax.storage.urls import filesystem, is_url, network_error


class StorageError(PeJaxError, OSError):
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


TMP_MARK = ".pe_jax-tmp-"  # NAME.pe_jax-tmp-PID-RANDOM@HOST: what pe-jax's sweeper may remove (see sweep_temporaries)


def temporary_name(path: str) -> str:
    """A pe-jax temporary beside `path`: `PATH.pe_jax-tmp-PID-RANDOM@HOST` (host and pid say whose it is)."""
    return f"{path}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}@{socket.gethostname()}"


def shared_temporary_name(path: str) -> str:
    """The temporary of `path` that several processes write together (`PATH.pe_jax-tmp-shared`): no pid in it,
    so the sweeper never takes it; whoever writes it removes a leftover first."""
    return f"{path}{TMP_MARK}shared"


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
    a link), then renames it into place; for a URL, `write` fills a buffer sent as one PUT of the whole object.
    Nothing half-written is left: on any error the temporary is removed; storage errors name `path`.

    Args:
        path: a local path or an fsspec URL (s3://, gs://, memory://...).
        write: called with a binary file object.

    Example:
        >>> atomic_write("out/scores.npy", lambda f: np.save(f, scores))  # doctest: +SKIP
    """
    if is_url(path):
        try:
            buffer = io.BytesIO()
            write(buffer)
            fs, p = filesystem(path)
            fs.pipe_file(p, buffer.getvalue())
        except Exception as e:
            error = network_error(path, e) or (storage_error(e, path) if isinstance(e, OSError) else None)
            if error is None:
                raise
            raise error from None
        return
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


def write_bytes(path: str, data: bytes):
    """`data` written to the file or object `path` atomically (see atomic_write).

    Args:
        path: a local path or a URL.
        data: the whole content.

    Example:
        >>> write_bytes("s3://bucket/emb/failures.jsonl", b"")  # doctest: +SKIP
    """
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str):
    """`text` written to `path` atomically as UTF-8 (see atomic_write); undecodable file-name bytes held with
    surrogate escapes are written back as the bytes they were."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json(path: str, obj, **dumps) -> bytes:
    """`obj` as JSON (`json.dumps(obj, **dumps)`) written to `path` atomically (see atomic_write); returns the
    bytes written (a checkpoint's checksum table records them without reading them back).

    Args:
        path: a local path or a URL.
        obj: what json.dumps takes.
        **dumps: json.dumps's options (indent, separators, ...).

    Example:
        >>> write_json("run/config.json", {"steps": 100}, indent=1)  # doctest: +SKIP
    """
    data = json.dumps(obj, **dumps).encode()
    write_bytes(path, data)
    return data


RENAME_NOREPLACE, RENAME_EXCHANGE, AT_FDCWD = 1, 2, -100


@functools.cache
def _renameat2_function():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def renameat2(src: str, dst: str, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False where the call or the flag is unsupported; OSError."""
    fn = _renameat2_function()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: str, dst: str):
    """Renames `src` to `dst`; FileExistsError if `dst` exists. Atomic where the system allows: renameat2's
    RENAME_NOREPLACE on Linux; elsewhere a file goes by link()+unlink() (link fails if the name exists) and a
    folder by a check right before rename(), which at worst replaces a folder that became empty-and-new in
    those microseconds (rename onto a non-empty folder or a file fails): nothing with content is ever lost.

    Args:
        src: the finished file or folder.
        dst: its new name, which must not exist.

    Example:
        >>> rename_noreplace("data.pe_jax-tmp-1-ab12cd34@host", "data")  # doctest: +SKIP
    """
    try:
        if renameat2(src, dst, RENAME_NOREPLACE):
            return
        if not os.path.isdir(src):
            try:
                os.link(src, dst, follow_symlinks=False)  # fails if dst exists, atomically
                os.unlink(src)
                return
            except FileExistsError:
                raise
            except OSError:  # no hard links here (FAT, some FUSE): check, then rename
                pass
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst)  # fails onto a non-empty directory or a file
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        raise


def rename_into_place(src: str, dst: str):
    """Renames `src` to `dst`, replacing what is there (a cache entry, an earlier export the caller checked):
    a file atomically; a folder by an atomic exchange where renameat2 allows, else removed first (rename
    cannot replace a non-empty folder).

    Args:
        src: the finished file or folder (a temporary).
        dst: its final name.

    Example:
        >>> rename_into_place(tmp, "cache/ckpt")  # doctest: +SKIP
    """
    if os.path.isdir(dst) and not os.path.islink(dst):
        if renameat2(src, dst, RENAME_EXCHANGE):
            return remove_temporary(src)  # src now holds what dst held
        shutil.rmtree(dst)
    os.replace(src, dst)


def replace_checked(src: str, dst: str, check):
    """Replaces `dst` by `src` only while `check(old)` (None: it may be replaced; else what it is) holds for what
    is replaced: atomically exchanged (renameat2) and checked, swapped back if it changed; elsewhere moved aside
    into a temporary, checked, and put back if it changed. FileExistsError naming what `dst` became; a `dst`
    that cannot be put back stays in `DST.pe_jax-kept-PID-RANDOM` (never swept).

    Args:
        src: the finished file or folder.
        dst: what it replaces.
        check: `check(path)` is None when what is at `path` may be replaced, else what it is (named).

    Example:
        >>> replace_checked(tmp, "ckpt", lambda old: None if is_ours(old) else "a user's folder")  # doctest: +SKIP
    """
    if renameat2(src, dst, RENAME_EXCHANGE):  # atomic: dst is the new one, src holds the old one
        if (what := check(src)) is not None:  # changed between the caller's check and the swap: undo
            renameat2(src, dst, RENAME_EXCHANGE)
            raise AlreadyExists(f"{dst} became {what} while being replaced; it is left as it is")
        return remove_temporary(src)
    old = temporary_name(dst)  # swept like any temporary if this process dies
    os.mkdir(old)
    os.rename(dst, os.path.join(old, "previous"))
    try:
        if (what := check(os.path.join(old, "previous"))) is not None:
            raise AlreadyExists(f"{dst} became {what} while being replaced; it is left as it is")
        rename_noreplace(src, dst)
    except BaseException:
        kept = f"{dst}.pe_jax-kept-{os.getpid()}-{os.urandom(4).hex()}"  # not ours to delete: never swept
        os.rename(old, kept)
        with contextlib.suppress(OSError):
            rename_noreplace(os.path.join(kept, "previous"), dst)
            os.rmdir(kept)
        raise
    remove_temporary(old)


@contextlib.contextmanager
def _staged(path: str, folder: bool, commit):
    path = os.path.abspath(path)
    with contextlib.suppress(OSError):
        sweep_temporaries(os.path.dirname(path), of=path)
    tmp = temporary_name(path)
    try:
        os.mkdir(tmp) if folder else os.close(create_new(tmp))
    except OSError as e:
        raise storage_error(e, path) from None
    try:
        yield tmp
        commit(tmp, path)
    finally:  # on success the commit took it (or left what it did not want)
        remove_temporary(tmp)


@contextlib.contextmanager
def atomic_folder(path: str, *, commit=rename_noreplace):
    """A new folder beside `path` (`temporary_name`) to fill, renamed to `path` when the block ends and removed
    if it fails; dead processes' temporaries of `path` are swept first.

    Args:
        path: the folder to make.
        commit: `commit(tmp, path)` puts the finished folder in place (default `rename_noreplace`:
            FileExistsError if `path` appeared meanwhile; `rename_into_place` replaces).

    Example:
        >>> with atomic_folder("work/data") as tmp:  # doctest: +SKIP
        ...     generate(tmp)
    """
    with _staged(path, True, commit) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(path: str, *, commit=rename_into_place):
    """A new empty file beside `path` (`temporary_name`) for a writer that takes a file name, renamed to `path`
    when the block ends and removed if it fails; dead processes' temporaries of `path` are swept first.

    Args:
        path: the file to write.
        commit: `commit(tmp, path)` (default `rename_into_place`: replaces `path`).

    Example:
        >>> with atomic_file("index/index.faiss") as tmp:  # doctest: +SKIP
        ...     faiss.write_index(index, tmp)
    """
    with _staged(path, False, commit) as tmp:
        yield tmp


def remove_temporary(path: str):
    """Removes the file or folder `path` (never following a link), if it is there."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished running
    return True


def sweep_temporaries(folder: str, *, of: str | None = None, guard=None) -> list[str]:
    """Removes pe-jax's own temporaries (`temporary_name`) in `folder`, not below it, of processes that no longer
    run on this host: a writer killed mid-write leaves one, and nothing reads it. Nothing else is touched: no
    other name, no other host's (a peer sharing the folder), no live process's, no link, FIFO or device; an
    object store has none. Returns the paths removed.

    Args:
        folder: a local folder (a URL sweeps nothing).
        of: only the temporaries of this path (or name) in `folder`.
        guard: `guard(target)` is a context manager yielding whether the temporaries of `folder/target` may go,
            held while they are removed (the converter's: nobody holds that output's lock).

    Example:
        >>> sweep_temporaries("emb/embeddings")  # doctest: +SKIP
        ['emb/embeddings/part-00003.npy.pe_jax-tmp-4242-0a1b2c3d@host']
    """
    if is_url(folder):
        return []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no such folder (yet), or not listable: nothing of ours there to remove
        return []
    host, removed = socket.gethostname(), []
    for name in names:
        owner, target = temporary_owner(name), name.rsplit(TMP_MARK, 1)[0]
        if owner is None or owner[1] != host or (of is not None and target != os.path.basename(of)) \
                or _alive(owner[0]):
            continue
        path = os.path.join(folder, name)
        claim = guard(os.path.join(folder, target)) if guard else contextlib.nullcontext(True)
        with claim as free, contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if free and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # never a link: pe-jax makes none
                remove_temporary(path)
                removed.append(path)
    return removed
