"""Webdataset tar shards: brace and glob patterns expanded lazily, every named shard checked to exist, and the
shards of a folder (img2dataset's webdataset output)."""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Iterator

from pe_jax import storage
from pe_jax.errors import NotFound


def expand_braces(pattern: str) -> Iterator[str]:
    """'data/{000..009}.tar' -> the ten paths, lazily (zero padding kept; `{0..99999999}` costs nothing until
    iterated); plain globs work too."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        if not any(c in pattern for c in "*?["):
            yield pattern
        else:
            yield from storage.glob(pattern) if storage.is_url(pattern) else sorted(glob.glob(pattern))
        return
    lo, hi = m.group(1), m.group(2)
    for i in range(int(lo), int(hi) + 1):
        yield from expand_braces(pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end():])


def is_tar_pattern(src: str) -> bool:
    return ".tar" in os.path.basename(src) or src.endswith(".tar")


def tar_shards(pattern: str) -> list[str]:
    """The shards of a brace/glob pattern; every named shard must exist: the first missing one is an error at
    once, naming it (a huge pattern is never expanded past it)."""
    shards = []
    names, exists = expand_braces(pattern), storage.Exists()
    for shard in names:
        if not exists(shard):
            if not shards and not any(exists(s) for s in itertools.islice(names, 100)):
                raise NotFound(f"{pattern}: the pattern matches no tar shard ({shard} not found)")
            raise NotFound(f"{pattern}: shard not found: {shard} (the first missing one)")
        shards.append(shard)
    if not shards:
        raise NotFound(f"{pattern}: the pattern matches no tar shard")
    return shards


def shard_folder(src: str) -> tuple[list[str], list[str]] | None:
    """(tar shards, other files) of a folder whose top level holds `.tar` files (img2dataset's webdataset
    output: `00000.tar` beside `00000.parquet` and `00000_stats.json`), sorted; None for any other folder.

    Args:
        src: a folder (a path or an object-store URL).

    Example:
        >>> shard_folder("shards/")  # doctest: +SKIP
        (['shards/00000.tar', 'shards/00001.tar'], ['00000.parquet', '00000_stats.json'])
    """
    if storage.is_url(src):  # one listing call, types included (no request per object)
        names = _listed_files(src)
    else:
        with os.scandir(src) as listing:
            names = [e.name for e in listing if e.is_file()]
    names = sorted(n for n in names if not n.startswith("."))  # hidden files are not inputs
    shards = [storage.join(src, n) for n in names if n.endswith(".tar")]
    return (shards, [n for n in names if not n.endswith(".tar")]) if shards else None


@storage.network_faults
def _listed_files(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True) if e["type"] == "file"]
