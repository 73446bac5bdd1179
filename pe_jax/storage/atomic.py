"""Writing a file so that nothing half-written is ever seen: a new temporary beside the target (never through a
link), renamed into place; storage faults as one line naming the file."""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from pe_jax.errors import PeJaxError


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
