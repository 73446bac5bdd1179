"""A finished part's checksums: `failures/part-NNNNN.checksums.json`, written before the part's other files
are renamed into place (and so before its marker), checked whenever a part is trusted as finished.

A part's files are checked for their presence, their `.npy` header against their size and their rows
(`part_problem`); none of that sees bytes flipped inside the rows. The record holds each file's size and
xxh3_64 (`pe_jax.storage.hashing`, ~16 GB/s), computed from the bytes in memory before they are written, so
nothing is read back to write it. A job's summary checks the parts it did not write in this run (a resumed
job's earlier parts, a --join peer's), and `read_embeddings` (`read_tile_features`) the bytes it reads.
`--tile-features`' tiles file is one of the part's files (role "tiles"; a part recorded without it is not
checked for it).

The record also names its job: the job's identity (`job_identity`, the sha256 of the settings its manifest
pins, kept in `manifest.json` as "job"), the part's number and its rows; an empty part's marker
(`failures/part-NNNNN.empty`) names them too, with its failures file's checksum. A part whose record names
another job or another part, or (in a job whose manifest says "part_records": its parts carry records) a
part with no record, is not this job's: another job's files copied in, a stray copy. A job started before
records named it (its manifest has no "part_records") trusts its parts without a record, as then.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from pe_jax import storage
from pe_jax.embed.layout import PartFiles, part_path, tiles_path
from pe_jax.errors import InputError
from pe_jax.storage.files import METADATA_CAP, read_capped
from pe_jax.storage.hashing import ALGORITHM, CHECKSUMS, checksum_of, new_checksum

BLOCK = 1 << 24  # a checked file is read this much at a time
PART_RECORDS = 1  # manifest.json's "part_records": every finished part of its job has a record naming the job


def job_identity(settings: dict) -> str:
    """The identity a job's part records name: the sha256 of the settings its manifest pins, as canonical JSON.

    Args:
        settings: the job's settings (`dataclasses.asdict` of its `pe_jax.embed.output.Settings`).

    Example:
        >>> len(job_identity({"preset": None, "part_size": 2}))
        64
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def job_of(manifest: dict) -> str | None:
    """The identity the records of a job's parts must name (its manifest's "job"), or None for a job started
    before records named it (no "part_records"): its parts are trusted without one.

    Args:
        manifest: the job's `manifest.json`, parsed.

    Example:
        >>> job_of({"settings": {}, "part_records": 1, "job": "ab12"}), job_of({"settings": {}})
        ('ab12', None)
    """
    if not isinstance(manifest, dict) or not manifest.get("part_records"):
        return None
    return str(manifest.get("job"))


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


def record(blobs: dict[str, bytes], rows: int, job: str | None = None, part: int | None = None, **more) -> bytes:
    """The record of a part's files ({role: the bytes about to be written}), its row count, and the job and
    part it belongs to.

    Args:
        blobs: each file's role ("failures", "metadata", "embeddings:image", ...) and bytes.
        rows: the part's rows.
        job: the job's identity (`job_identity`; None: a job from before records named it).
        part: the part's number.
        more: other fields (an empty part's marker keeps its failure count).

    Example:
        >>> json.loads(record({"metadata": b"abc"}, 1))["files"]["metadata"][0]
        3
    """
    files = {role: [len(data), checksum_of(data)] for role, data in blobs.items()}
    named = {"job": job, "part": part} if job is not None else {}
    return json.dumps({"format": 1, "algorithm": ALGORITHM, "rows": rows, "files": files, **named, **more}).encode()


def read_record(out_dir: str, n: int, path: str | None = None) -> dict | None:
    """Part `n`'s record (or the one at `path`: an empty part's marker); None for a part written before records;
    ValueError naming it when unusable."""
    path = path or record_path(out_dir, n)
    if not storage.exists(path):
        return None
    try:
        if storage.is_url(path):
            with storage.open_file(path) as f:
                data = f.read(METADATA_CAP + 1)
        else:
            data = read_capped(path)
        table = json.loads(data)
        if not isinstance(table, dict) or not isinstance(table.get("files"), dict):  # an older empty part's marker
            raise ValueError("not a table of checksums")
        files = table["files"]
        if table.get("algorithm") not in CHECKSUMS or not all(
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


def not_the_jobs(path: str, n: int, table: dict | None, job: str | None, rows: int | None = None) -> str | None:
    """Why the record at `path` (`table`, None where there is none) does not make part `n` a finished part of the
    job `job` (`job_of` its manifest; None, a job from before records named it: nothing to check), or None.

    Args:
        path: the record (or empty part's marker) file, named in the answer.
        n: the part.
        table: the record (`read_record`), or None.
        job: the job's identity, or None.
        rows: the part's rows, when known.

    Example:
        >>> not_the_jobs("emb/failures/part-00001.checksums.json", 1, None, "ab12")  # doctest: +ELLIPSIS
        "emb/failures/part-00001.checksums.json is missing: the part is not known to be this job's ..."
    """
    if job is None:
        return None
    if table is None:  # records are written before the files they name: a part of this job has one
        return f"{path} is missing: the part is not known to be this job's (another job's files, or a stray copy)"
    if table.get("job") != job:
        return (f"{path} names another job ({str(table.get('job'))[:12]}, this one is {job[:12]}): the part is not "
                "this job's")
    if table.get("part") != n:
        return f"{path} is part {table.get('part')}'s record, not part {n}'s: the part was copied from another"
    if rows is not None and table.get("rows") != rows:
        return f"{path} records {table.get('rows')} rows, the part has {rows}: the part is not the one it records"
    return None


def part_problem(out_dir: str, files: PartFiles, n: int, sums: bool = True, tiles: bool = False,
                 job: str | None = None) -> str | None:
    """What is wrong with finished part `n` (a file missing, the metadata's rows not the embeddings' or, with
    `tiles` (--tile-features), the tiles'; with `sums` its record not naming the job `job` (`not_the_jobs`) or a
    file's bytes not those it records), or None: a part counts as finished only when all its files are there and
    agree, and are the job's.

    Args:
        out_dir: the job's folder.
        files: its part files (`pe_jax.embed.output.part_files`).
        n: the part.
        sums: check the record (a part this run wrote needs no check).
        tiles: a --tile-features job's part (its tiles file is one of its files).
        job: the job's identity (`job_of` its manifest), or None.

    Example:
        >>> part_problem("emb/", PartFiles("emb/"), 0)  # doctest: +SKIP
        'emb/metadata/part-00000.parquet is missing'
    """
    import pyarrow.parquet as pq

    npys = [files.embeddings(n, t) for t in files.towers] + ([tiles_path(out_dir, n)] if tiles else [])
    needed = [files.metadata(n), part_path(out_dir, "failures", n, "jsonl"), *npys[len(files.towers):]]
    missing = [p for p in needed if not storage.exists(p)]
    if missing:
        return f"{missing[0]} is missing"
    try:
        rows = {p: rows_of(p) for p in npys}
        with storage.open_file(files.metadata(n)) as f:
            meta_rows = pq.ParquetFile(f).metadata.num_rows
    except (OSError, ValueError, EOFError, SyntaxError) as e:  # a truncated or garbled header or footer
        return f"part {n}'s files are unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    bad = [p for p, r in rows.items() if r != meta_rows]
    if bad:
        return f"{bad[0]} has {rows[bad[0]]} rows, its metadata {meta_rows}"
    return _changed(out_dir, files, n, job, meta_rows) if sums else None


def _changed(out_dir: str, files: PartFiles, n: int, job: str | None, rows: int) -> str | None:
    """Whether part `n`'s record is another's (`not_the_jobs`) or which of its files differs from it (None: none,
    or a part from before records in a job from before them)."""
    try:
        table = read_record(out_dir, n)
        foreign = not_the_jobs(record_path(out_dir, n), n, table, job, rows)
        if foreign or table is None:
            return foreign
        roles = {"failures": part_path(out_dir, "failures", n, "jsonl"), "metadata": files.metadata(n),
                 **{f"embeddings:{t}": files.embeddings(n, t) for t in files.towers}}
        if "tiles" in table["files"]:  # --tile-features (a part written before tiles were recorded has none)
            roles["tiles"] = tiles_path(out_dir, n)
        return next(filter(None, (mismatch(table, r, p) for r, p in roles.items())), None)
    except (OSError, ValueError) as e:
        return str(e)


def empty_problem(out_dir: str, n: int, job: str | None) -> str | None:
    """What makes empty part `n`'s marker (`failures/part-NNNNN.empty`) not this job's (`job`; None, a job from
    before records named it: nothing to check): it names another job or part, or its failures file is not the
    one it records.

    Args:
        out_dir: the job's folder.
        n: the part.
        job: the job's identity (`job_of` its manifest), or None.

    Example:
        >>> empty_problem("emb/", 2, None) is None
        True
    """
    if job is None:
        return None
    marker = part_path(out_dir, "failures", n, "empty")
    try:
        table = read_record(out_dir, n, marker)
        return not_the_jobs(marker, n, table, job, 0) or mismatch(table, "failures",
                                                                   part_path(out_dir, "failures", n, "jsonl"))
    except (OSError, ValueError) as e:
        return f"{e}: the part is not known to be this job's"


def rows_of(npy: str) -> int:
    """The row count of an .npy file, from its header; ValueError when the file's size is not the header's.

    Args:
        npy: the file (a path or URL).

    Example:
        >>> rows_of("emb/embeddings/part-00000.npy")  # doctest: +SKIP
        1000
    """
    with storage.open_file(npy, block_size=1 << 16) as f:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
        f.seek(0, 2)
        if f.tell() != expected:  # truncated or extended since it was written
            raise ValueError(f"{npy} is {f.tell()} bytes, its header says {expected}")
    return int(shape[0])
