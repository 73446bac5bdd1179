"""Webdataset tar shards: brace and glob patterns expanded lazily, every named shard checked to exist, the
shards of a folder (img2dataset's webdataset output), and a shard's samples (`list_tar`).

What cannot be read is said, never skipped: a member that is no regular file (a link, a device: webdataset
skips those) or a sparse one is a failure row naming it; a shard that is empty (0 bytes), compressed, no tar,
damaged part-way or no regular file (a FIFO would block the open forever) is a failure row of its own, and the
job goes on. Compressed shards are refused by name at once: pe-jax reads each image by byte range of the
shard, which a compressed stream has none of.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from collections.abc import Iterator

from pe_jax import storage
from pe_jax.data.samples import Item, group_members, sample_item, sidecar_text
from pe_jax.errors import InputError, NotFound, PeJaxError
from pe_jax.preprocess.image import ByteRange
from pe_jax.storage.files import check_regular_file

COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


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
    return ".tar" in os.path.basename(src) or src.endswith(".tar") or src.lower().endswith(COMPRESSED)


def tar_shards(pattern: str) -> list[str]:
    """The shards of a brace/glob pattern; every named shard must exist: the first missing one is an error at
    once, naming it (a huge pattern is never expanded past it); so is a compressed one (`.tar.gz`, `.tgz`...)."""
    shards = []
    names, exists = expand_braces(pattern), storage.Exists()
    for shard in names:
        if shard.lower().endswith(COMPRESSED):
            raise InputError(f"{shard}: compressed tar shards are not supported; pe-jax reads each member by byte "
                             "range: decompress them (gunzip, unzstd, ...) into .tar shards first")
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


def list_tar(shard: str, modality: str = "image") -> list[Item]:
    """The samples of a webdataset shard, in member order, indexed in one pass over the headers and grouped by
    webdataset's rules (`pe_jax.data.samples`): each image member's byte range, and its sidecars: `.txt` -> text
    (caption), `.cls` -> label, `.json` -> its top-level fields as carried columns (img2dataset's url, width,
    status...; nested values as JSON text). A sample webdataset would not yield whole (members not adjacent, a
    field twice), or without an image (without a `.txt` for `modality` "text"), a member that is no regular
    file or is sparse, is an item with an `error`: a failure row, never a silent loss. A shard that cannot be
    read is one such item keyed by its path (after the samples before the damage, for a damaged one).

    Args:
        shard: a path or an object-store URL.
        modality: "text" takes each sample's `.txt` as the input; otherwise its image.

    Example:
        >>> [it.key for it in list_tar("shards/00000.tar")]  # doctest: +SKIP
        ['000000000', '000000001']
    """
    try:
        if not storage.is_url(shard):  # opening a FIFO would wait for a writer forever
            check_regular_file(shard, hint="only regular files are read as tar shards")
        with storage.open_file(shard, block_size=storage.READ_BLOCK, cache_type="readahead") as f:
            head = f.read(6)
            if not head:
                raise InputError(f"{shard}: 0 bytes: an empty file, not a tar shard")
            kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
            if kind:
                raise InputError(f"{shard}: a {kind}-compressed file, not an uncompressed tar shard (decompress it)")
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                return _samples(shard, f, tar, modality)
    except PeJaxError as e:
        error = str(e)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{shard}: not a readable tar shard ({type(e).__name__}: {e})"
    return [Item(shard, shard, error=error)]


def _samples(shard: str, f, tar: tarfile.TarFile, modality: str) -> list[Item]:
    damage, count = [], itertools.count()

    def members():
        try:
            for member in tar:
                next(count)
                if not member.isdir():  # a folder holds no bytes: nothing to embed or lose
                    yield member.name, member
        except (tarfile.TarError, OSError, EOFError) as e:
            damage.append(f"({type(e).__name__}: {e})")
            return
        f.seek(tar.offset)  # tarfile ends quietly at a truncated or garbled header: only zeros or nothing is an end
        if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
            damage.append(f"(a damaged header at byte {tar.offset})")

    def read(member: tarfile.TarInfo) -> str:
        return sidecar_text(f"{shard}::{member.name}", member.size, tar.extractfile(member).read)

    def location(member: tarfile.TarInfo) -> ByteRange:
        if member.sparse is not None:  # its bytes are pieces with holes between: no one byte range holds them
            raise InputError(f"{shard}::{member.name}: a sparse member (GNU tar --sparse), its bytes not stored in "
                             "one piece: not read (unpack and re-tar it without --sparse)")
        return ByteRange(shard, member.offset_data, member.size)

    items = [sample_item(g, lambda e, g=g: f"{shard}::{g.fields[e].name}", lambda e, g=g: read(g.fields[e]),
                         modality, lambda e, g=g: location(g.fields[e]))
             for g in group_members(members(), _refused)]
    if damage:
        items.append(Item(shard, shard, error=f"{shard}: not a readable tar shard after {next(count)} members "
                                              f"{damage[0]}; the rest of it is not read"))
    return items


def _refused(member: tarfile.TarInfo) -> str | None:
    """Why a member is no sample's (webdataset skips what is no regular file), or None."""
    if member.isreg():
        return None
    if member.islnk() or member.issym():
        kind = "a hard link" if member.islnk() else "a symbolic link"
        return f"{kind} to {member.linkname}; links are not followed (webdataset skips them)"
    kinds = {tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device"}
    return f"{kinds.get(member.type, f'a type {member.type!r}')} member, not a regular file"


@storage.network_faults
def _listed_files(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True) if e["type"] == "file"]
