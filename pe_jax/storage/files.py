"""Only regular files are opened as inputs or checkpoint sources: reading a FIFO blocks until something writes
to it, and a device may never end. `check_regular_file` looks with os.stat (following links) before any open;
`read_capped` opens without blocking, checks the open file, and reads at most a size cap (metadata files)."""

from __future__ import annotations

import os
import stat

from pe_jax.errors import InputError, NotFound

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_outside(folder: str, src: str, *, what: str) -> None:
    """Refuses a `folder` (an output, a workdir) inside the input folder `src`: the next listing of the input
    would take its files as inputs."""
    if os.path.isdir(src):
        inside, outside = os.path.realpath(src), os.path.realpath(folder)
        if os.path.commonpath([inside, outside]) == inside:
            raise InputError(f"the {what} {folder} is inside the input folder {src}: its files would become "
                             f"inputs; use a {what} outside the input")


def check_regular_file(path: str | os.PathLike, *, where: str | None = None, hint: str = "",
                       missing: str | None = None) -> None:
    """Raises FileNotFoundError (`missing`, default "WHERE: not found") or ValueError ("WHERE: is a FIFO ...,
    not a regular file; HINT") unless `path` is a regular file. `where` names it in messages (default: path)."""
    where = where or os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotFound(missing or f"{where}: not found") from None
    except ValueError:  # os.stat refuses NUL bytes
        raise InputError(f"{where!r}: not a valid file name (it holds a NUL byte)") from None
    if not stat.S_ISREG(mode):
        kind = next((k for is_, k in _NOT_REGULAR if is_(mode)), "not a file")
        raise InputError(f"{where}: is {kind}, not a regular file" + (f"; {hint}" if hint else ""))


METADATA_CAP = 64 << 20  # bytes: a metadata file (a manifest, checksums, a config) larger than this is refused


def read_capped(path: str | os.PathLike, *, limit: int = METADATA_CAP, where: str | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them: ValueError naming it when it is larger or
    not a regular file (a FIFO is opened without blocking and refused; /dev/zero is refused, not read forever).

    Args:
        path: the file.
        limit: the most bytes read.
        where: names the file in messages (default: path).

    Example:
        >>> meta = json.loads(read_capped("ckpt/pe_jax.json"))  # doctest: +SKIP
    """
    where = where or os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{where}: not found") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for is_, k in _NOT_REGULAR if is_(mode)), "not a file")
            raise InputError(f"{where}: is {kind}, not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{where}: larger than {limit} bytes; not a metadata file pe-jax wrote")
    return data
