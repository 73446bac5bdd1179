"""A finished part's checksums: `failures/part-NNNNN.checksums.json`, written before the part's other files
are renamed into place (and so before its marker), checked whenever a part is trusted as finished.

A part's files are checked for their presence, their `.npy` header against their size and their rows
(`pe_jax.embed.output.part_problem`); none of that sees bytes flipped inside the rows. The record holds each
file's size and xxh3_64 (`pe_jax.storage.hashing`, ~16 GB/s), computed from the bytes in memory before they
are written, so nothing is read back to write it. A job's summary checks the parts it did not write in this run
(a resumed job's earlier parts, a --join peer's), and `read_embeddings` (`read_tile_features`) the bytes it reads.
`--tile-features`' tiles file is one of the part's files (role "tiles"; a part recorded without it is not
checked for it). A part written
before these records has none and is checked as before.
"""

from __future__ import annotations

import json

from pe_jax import storage
from pe_jax.errors import InputError
from pe_jax.storage.files import METADATA_CAP, read_capped
from pe_jax.storage.hashing import ALGORITHM, CHECKSUMS, checksum_of, new_checksum

BLOCK = 1 << 24  # a checked file is read this much at a time


def record_path(out_dir: str, n: int) -> str:
    """Where part `n`'s checksums are.

    Args:
        out_dir: the job's folder.
        n: the part.

    Example:
        >>> record_path("emb", 3)
        'emb/failures/part-00003.checksums.json'
    """
    return storage.join(out_dir, "failures", f"part-{n:05d}.checksums.json")


def record(blobs: dict[str, bytes], rows: int) -> bytes:
    """The record of a part's files ({role: the bytes about to be written}) and its row count.

    Args:
        blobs: each file's role ("failures", "metadata", "embeddings:image", ...) and bytes.
        rows: the part's rows.

    Example:
        >>> json.loads(record({"metadata": b"abc"}, 1))["files"]["metadata"][0]
        3
    """
    files = {role: [len(data), checksum_of(data)] for role, data in blobs.items()}
    return json.dumps({"format": 1, "algorithm": ALGORITHM, "rows": rows, "files": files}).encode()


def read_record(out_dir: str, n: int) -> dict | None:
    """Part `n`'s record; None for a part written before records; ValueError naming it when unusable."""
    path = record_path(out_dir, n)
    if not storage.exists(path):
        return None
    try:
        if storage.is_url(path):
            with storage.open_file(path) as f:
                data = f.read(METADATA_CAP + 1)
        else:
            data = read_capped(path)
        table = json.loads(data)
        files = table["files"]
        if table["algorithm"] not in CHECKSUMS or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
                for v in files.values()):
            raise ValueError("not a table of checksums")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    return table


def mismatch(table: dict, role: str, path: str, data: bytes | None = None) -> str | None:
    """What differs between the file `path` (or its bytes `data`, already read) and the record's `role` entry,
    or None when it is as written.

    Args:
        table: the part's record (`read_record`).
        role: the file's role in it.
        path: the file.
        data: its bytes, when the caller has read them.

    Example:
        >>> mismatch(json.loads(record({"metadata": b"abc"}, 1)), "metadata", "m.parquet", b"abd")  # doctest: +ELLIPSIS
        'm.parquet changed since it was written (xxh3_64 ..., recorded ...)'
    """
    if role not in table["files"]:
        return f"{path} is not in its part's checksums"
    size, want = table["files"][role]
    algorithm = table["algorithm"]
    if data is None:
        checksum, found = new_checksum(algorithm), 0
        with storage.open_file(path, block_size=BLOCK) as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                checksum.update(block)
                found += len(block)
        got = checksum.hexdigest()
    else:
        found, got = len(data), checksum_of(data, algorithm)
    if found != size:
        return f"{path} is {found} bytes, {size} when it was written"
    return None if got == want else f"{path} changed since it was written ({algorithm} {got}, recorded {want})"


def read_checked(table: dict | None, role: str, path: str) -> bytes:
    """The bytes of the file `path`, checked against its part's record `table` (None: a part without one).

    Args:
        table: the part's record (`read_record`), or None.
        role: the file's role in it.
        path: the file.

    Example:
        >>> read_checked(None, "metadata", "emb/metadata/part-00000.parquet")  # doctest: +SKIP
        b'PAR1...'
    """
    with storage.open_file(path) as f:
        data = f.read()
    changed = table and mismatch(table, role, path, data)
    if changed:
        raise InputError(f"{changed}: the part is damaged; delete its files and rerun the job to redo it")
    return data
