"""An embedding job's inputs cut into parts, listed lazily: a part's items exist only while it is embedded.

One part per tar shard (`part-00042` holds shard 00042's samples, in member order; a shard is indexed when its
part is reached, by the process that embeds it), `part_size` items otherwise. List files and text files are
streamed: counted in one pass over their lines, pinned by the sha256 of their bytes, and read a part at a time,
so a 100 M-row list never sits in memory. A folder is walked the same way: once to count and pin it, then
lazily a part at a time (`sources.iter_folder` holds one subfolder's listing at a time).

The pin (`Listing.sha256`) is what a rerun must match: a list or text file's bytes; each shard's path, size and
modification time (an object's ETag); a folder's keys and paths in order. `Listing.versions` pins each local
shard's and folder file's size, modification time and inode besides (a separate field, so a job started
before it resumes): a file replaced (by a rename: a new inode) or rewritten (a new modification time or size)
is seen; one rewritten in place with its size and modification time restored (`touch -r`) is not, nor an
image replaced at a path a list file names (the list's bytes are the pin): only hashing every input again at
every start would see them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pe_jax import storage
from pe_jax.data.sources import Item, Source, classify, count_rows, iter_folder, iter_paths, iter_texts, list_tar
from pe_jax.errors import InputError
from pe_jax.storage.hashing import sha256_of_files


@dataclass(frozen=True)
class Listing:
    count: int  # parts
    inputs: int | None  # items; None for tar shards (known once every shard is indexed)
    sha256: str
    part_size: int | None  # None: one part per tar shard
    first: list[Item]  # the first part's items: they fix the metadata schema
    parts: Callable[[], Iterator[tuple[int, Callable[[], list[Item]]]]]  # (n, items of part n), in order
    shards: list[str] | None = None  # the tar shards, part n being shards[n]
    sidecars: bool = False  # samples may carry captions and labels: the metadata always has those columns
    note: str | None = None  # what the input was taken as, for the summary (a folder of tar shards)
    labels: bool = False  # some item has a label (a class folder's): the metadata always has the column
    largest: int | None = None  # tar shards: at most this many items in any shard (see largest_part)
    versions: str = ""  # the sha256 of each local file's size, mtime and inode (see the module's docstring)

    def size(self, n: int) -> int | None:
        """Items in part n, when known without reading it."""
        if self.part_size is None:
            return None
        return min(self.part_size, self.inputs - n * self.part_size)

    def largest_part(self) -> int | None:
        """At most this many items in any part: a batch larger than that would only pad (--batch-size 100000 on 8
        images padded every batch to 100,000 rows). Tar shards: the first one's count, and for the others one
        item per 512 bytes (a tar member's header alone takes that much)."""
        return self.largest if self.part_size is None else min(self.part_size, self.inputs)


def list_parts(src: str | Source, modality: str, part_size: int) -> Listing:
    """The parts of `src`, a `Source` (`pe_jax.data.sources.classify`; a path is classified here): tar shards, a
    folder (img2dataset's `files` layout grouped into samples; class folders labelled), or a list or text file.
    `modality` "text" reads the `.txt` of shards and folders, and the `text` (or `caption`) column of lists.

    Args:
        src: the classified input (or its path).
        modality: what the items are read as (an image,text job lists images).
        part_size: items per part (tar shards: one part a shard).

    Example:
        >>> list_parts(classify("images/"), "image", 1000).count  # doctest: +SKIP
        3
    """
    source = src if isinstance(src, Source) else classify(src, modality)
    if source.kind == "shards":
        return _shards(list(source.shards), modality, source.note)
    path = source.path
    if source.kind == "folder":
        digest, versions, count, sidecars, labels = hashlib.sha256(), hashlib.sha256(), 0, False, False
        for it in iter_folder(path, modality, read=False):
            digest.update(f"{it.key}\0{it.source}\n".encode("utf-8", "surrogateescape"))
            versions.update(_version(it.source).encode())
            count, sidecars, labels = count + 1, sidecars or bool(it.sidecars), labels or it.label is not None
        if not count:
            raise InputError(f"{path}: the input folder is empty")
        listing = _chunked(path, lambda: iter_folder(path, modality), count, digest.hexdigest(), part_size,
                           sidecars, labels)
        return dataclasses.replace(listing, versions=versions.hexdigest())
    rows = iter_texts if modality == "text" else iter_paths
    return _chunked(path, lambda: rows(path), count_rows(path, modality), sha256_of_files([path]), part_size)


def _chunked(src: str, items: Callable[[], Iterator[Item]], inputs: int, sha256: str, part_size: int,
             sidecars: bool = False, labels: bool = False) -> Listing:
    if not inputs:
        raise InputError(f"{src}: no inputs found")

    def parts():
        stream, seen = items(), 0
        for n in itertools.count():
            chunk = list(itertools.islice(stream, part_size))
            if not chunk:
                break
            seen += len(chunk)
            if seen > inputs:
                break
            yield n, (lambda chunk=chunk: chunk)
        if seen != inputs:
            raise InputError(f"{src}: the input changed while the job ran ({inputs} items at the start)")

    first = list(itertools.islice(items(), part_size))
    return Listing(-(-inputs // part_size), inputs, sha256, part_size, first, parts, sidecars=sidecars,
                   labels=labels)


def _shards(shards: list[str], modality: str, note: str | None = None) -> Listing:
    digest, versions, sizes = hashlib.sha256(), hashlib.sha256(), []
    for shard in shards:
        versions.update(_version(shard).encode())
        if storage.is_url(shard):
            version = storage.stamp(shard)  # size and ETag
        else:
            st = os.stat(shard)
            version = f"{st.st_size}\t{st.st_mtime_ns}"
        digest.update(f"{shard}\t{version}\n".encode("utf-8", "surrogateescape"))
        sizes.append(int(version.split("\t")[0]) if version.split("\t")[0].isdigit() else None)
    first = list_tar(shards[0], modality)
    bounds = [len(first), *(size // 512 if size is not None else None for size in sizes[1:])]
    largest = None if None in bounds else max(1, *bounds)

    def parts():
        for n, shard in enumerate(shards):
            yield n, (lambda: first) if n == 0 else (lambda shard=shard: list_tar(shard, modality))

    return Listing(len(shards), None, digest.hexdigest(), None, first, parts, shards, sidecars=True, note=note,
                   largest=largest, versions=versions.hexdigest())


def _version(path: str) -> str:
    """A local file's size, modification time and inode, a line (an object's: nothing, its listing has its ETag)."""
    if storage.is_url(path):
        return "\n"
    try:
        st = os.stat(path)
    except OSError as e:  # gone or unreadable since it was listed: its row will say so
        return f"unreadable: {e.strerror}\n"
    return f"{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\n"
