"""Only regular files are opened as inputs or checkpoint sources: reading a FIFO blocks until something writes
to it, and a device may never end. `check_regular_file` looks with os.stat (following links) before any open."""

from __future__ import annotations

import os
import stat

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_outside(folder: str, src: str, *, what: str) -> None:
    """Refuses a `folder` (an output, a workdir) inside the input folder `src`: the next listing of the input
    would take its files as inputs."""
    if os.path.isdir(src):
        inside, outside = os.path.realpath(src), os.path.realpath(folder)
        if os.path.commonpath([inside, outside]) == inside:
            raise ValueError(f"the {what} {folder} is inside the input folder {src}: its files would become "
                             f"inputs; use a {what} outside the input")


def check_regular_file(path: str | os.PathLike, *, where: str | None = None, hint: str = "",
                       missing: str | None = None) -> None:
    """Raises FileNotFoundError (`missing`, default "WHERE: not found") or ValueError ("WHERE: is a FIFO ...,
    not a regular file; HINT") unless `path` is a regular file. `where` names it in messages (default: path)."""
    where = where or os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(missing or f"{where}: not found") from None
    except ValueError:  # os.stat refuses NUL bytes
        raise ValueError(f"{where!r}: not a valid file name (it holds a NUL byte)") from None
    if not stat.S_ISREG(mode):
        kind = next((k for is_, k in _NOT_REGULAR if is_(mode)), "not a file")
        raise ValueError(f"{where}: is {kind}, not a regular file" + (f"; {hint}" if hint else ""))
