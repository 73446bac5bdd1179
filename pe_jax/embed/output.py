"""An embedding job's output folder: the settings it pins (`manifest.json`), its parts (embeddings, row-aligned
metadata, failures; each file written under a temporary name and renamed, embeddings last, so a part exists
exactly when its embeddings file does), the locks that let several processes share it, and reading it back.

Keys and sources are file names, which on POSIX are bytes: a name that is not valid UTF-8 (held by Python
with surrogate escapes) is stored in the parquet metadata with its undecodable bytes written as `\\xNN`.
"""

from __future__ import annotations

import glob
import io
import json
from dataclasses import dataclass

import numpy as np

import pe_jax
from pe_jax import storage
from pe_jax.data.sources import Item
from pe_jax.embed import part_checksums
from pe_jax.embed.layout import PartFiles, clip_retrieval_table, part_path, tiles_path
from pe_jax.embed.part_checksums import part_problem as part_problem  # where it lived: still importable here
from pe_jax.embed.part_checksums import rows_of
from pe_jax.errors import InputError, NotFound
from pe_jax.storage import atomic
from pe_jax.storage.atomic import atomic_write
from pe_jax.storage.files import METADATA_CAP, read_capped


@dataclass(frozen=True)
class Settings:
    """What determines the output; a rerun must match it exactly."""

    preset: str | None
    weights: str  # the content hash of the weights (pe_jax.checkpoints.verify.content_hash) or "random-init"
    modality: str
    input: str
    inputs: int | None  # how many items the listing held (None for tar shards: known once each is indexed)
    listing_sha256: str  # pe_jax.embed.parts.Listing.sha256
    part_size: int | None  # None: one part per tar shard
    dtype: str
    normalize: bool
    layer_idx: int | None
    pooling: str | None  # image features: attn, mean or cls (pe_jax.features)
    image_size: int
    preprocessing: str
    pe_jax_version: str = pe_jax.__version__
    layout: str = "pe-jax"  # pe_jax.embed.layout: the folder layout (pe-jax or clip-retrieval)
    model_config: str = ""  # pe_jax.config.config_digest of the model (what its metadata says it computes)
    tiles: int = 0  # --tiles N: rows are the thumbnails' of pe_jax.preprocess.tiling (0: the plain transform)
    tile_features: bool = False  # --tile-features: tiles/part-N.npy holds the tiles' rows
    input_versions: str = ""  # pe_jax.embed.parts.Listing.versions: the input files' sizes, mtimes, inodes


def part_done(out_dir: str, n: int, files: PartFiles | None = None) -> bool:
    """Whether part `n` is on disk: every tower's embeddings file exists, or its empty-part marker does
    (`files`: the job's layout; default the pe-jax layout of one tower)."""
    return (files or PartFiles(out_dir)).done(n) or storage.exists(empty_marker(out_dir, n))


def empty_marker(out_dir: str, n: int) -> str:
    """What marks part `n` done when it has no rows (an empty shard, or one whose every item failed): no 0-row
    `.npy` or `.parquet` is written (embedding-reader's `parquet_npy` reader would pair every later file with
    the wrong metadata), and the manifest lists the part under `empty_parts`. It names its job and part and
    records its failures file's checksum (`pe_jax.embed.part_checksums.record`)."""
    return part_path(out_dir, "failures", n, "empty")


def write_file(path: str, data):
    """A whole file, atomically: renamed into place locally, one PUT to an object store (storage.atomic). `data`:
    bytes, or a function that writes them into a file object (called first, into memory: see `_bytes`)."""
    atomic_write(path, lambda f: f.write(_bytes(data, path) if callable(data) else data))


EXTRA = "extra"  # the column of carried values the first part's schema cannot hold


def metadata_schema(first: list[Item], modality: str, sidecars: bool = False, labels: bool = False):
    """One parquet schema for every part, fixed by the first part's items (later parts are not read yet): key,
    source, the input's sidecars, carried columns, and `extra`: a JSON object of the carried values that did
    not fit (a column the first part lacks, a value of another type), so nothing is lost. A carried column
    whose values in the first part do not share one type is stored as strings (JSON for non-strings).
    `sidecars` (tar shards, img2dataset's files layout): `caption` (`text`) and `label` are columns whatever the
    first part holds, as a later shard's may have them; `labels` (a folder with class sub-folders): `label`."""
    import pyarrow as pa

    fields = [pa.field("key", pa.string()), pa.field("source", pa.string())]
    if modality == "text" or sidecars or any(it.text is not None for it in first):
        fields.append(pa.field("caption" if modality != "text" else "text", pa.string()))
    if sidecars or labels or any(it.label is not None for it in first):
        fields.append(pa.field("label", pa.string()))
    columns = sorted({k for it in first for k in it.extra} - {f.name for f in fields} - {EXTRA})
    for name in columns:
        values = [it.extra.get(name) for it in first]
        try:
            kind = pa.array(values).type
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeError):
            fields.append(pa.field(name, pa.string(), metadata={"pe_jax": "mixed types, stored as strings"}))
    return pa.schema([*fields, pa.field(EXTRA, pa.string())])


def printable(text: str | None) -> str | None:
    """`text` as valid UTF-8: a file name's undecodable bytes (surrogate escapes) become `\\xNN`."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _row(it: Item, schema) -> dict:
    import pyarrow as pa

    own = {"key": it.key, "source": it.source, "caption": it.text, "text": it.text, "label": it.label}
    out, extra = {}, {k: v for k, v in it.extra.items() if k not in schema.names or k == EXTRA}
    for f in schema:
        if f.name == EXTRA:
            continue
        carried = f.name in it.extra
        v = it.extra[f.name] if carried else own.get(f.name)
        if f.metadata and v is not None and not isinstance(v, str):
            v = json.dumps(v)
        elif carried and v is not None and not (isinstance(v, str) and pa.types.is_string(f.type)):
            try:
                pa.scalar(v, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
                extra[f.name], v = v, None  # another type than the first part's: kept in `extra`
        out[f.name] = printable(v) if isinstance(v, str) else v
    out[EXTRA] = printable(json.dumps(extra, default=str)) if extra else None
    return out


def write_part(out_dir: str, n: int, items: list[Item], embeddings, failures: list[dict], schema,
               files: PartFiles | None = None, job: str | None = None):
    """Part `n`'s files: failures, metadata, then each tower's embeddings (`embeddings`: an array, or a dict
    {tower: array} of row-aligned arrays), the first tower's last as the part's marker. `files`: the job's
    layout (default: the pe-jax layout of one tower); `job`: the job's identity, which the part's record names
    (`pe_jax.embed.manifest.check_manifest` returns it; None: a job from before records named it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = files or PartFiles(out_dir)
    arrays = embeddings if isinstance(embeddings, dict) else {files.towers[0]: embeddings}
    table = pa.Table.from_pylist([_row(it, schema) for it in items], schema=schema)
    if files.layout == "clip-retrieval":
        table = clip_retrieval_table(table, None if "image" not in files.towers and "video" not in files.towers
                                     else [it.location is not None for it in items])
    failed = "".join(json.dumps(f) + "\n" for f in failures).encode()
    write_file(part_path(out_dir, "failures", n, "jsonl"), failed)
    if not items:  # no 0-row files: the marker says the part is done
        write_file(empty_marker(out_dir, n), part_checksums.record({"failures": failed}, 0, job, n,
                                                                   failures=len(failures)))
        return
    paths, rows = {"metadata": files.metadata(n)}, {}
    if "tiles" in arrays:  # --tile-features: each row's grid in its metadata, the tiles' rows before the marker
        grid = arrays["tile_grid"]
        table = table.append_column("tile_cols", pa.array(grid[:, 0])).append_column("tile_rows", pa.array(grid[:, 1]))
        paths["tiles"], rows["tiles"] = tiles_path(out_dir, n), arrays["tiles"]
    # the first tower last: it marks the part done
    for tower in files.write_order():
        paths[f"embeddings:{tower}"], rows[f"embeddings:{tower}"] = files.embeddings(n, tower), arrays[tower]
    blobs = {"metadata": _bytes(lambda f: pq.write_table(table, f), paths["metadata"])}
    blobs.update({role: _bytes(lambda f, a=a: np.save(f, a), paths[role]) for role, a in rows.items()})
    # the checksums before the files they name: a part is never finished without them
    write_file(part_checksums.record_path(out_dir, n),
               part_checksums.record({"failures": failed, **blobs}, len(items), job, n))
    for role, data in blobs.items():
        write_file(paths[role], data)


def _bytes(write, path: str) -> bytes:
    """What `write(file object)` writes, in memory, for `path` (named by its errors): one plain write of them
    raises ENOSPC on a full disk where numpy's own writes only said "N requested and M written"."""
    buffer = io.BytesIO()
    try:
        write(buffer)
    except OSError as e:
        raise atomic.storage_error(e, path) from None
    return buffer.getvalue()


def sweep_job(out_dir: str) -> list[str]:
    """Removes pe-jax's own temporaries of dead processes on this host (storage.atomic.sweep_temporaries) in the
    job's folders: a job killed mid-write leaves one, and nothing reads it. No other folder is looked in, and
    an object store has none. Returns the paths removed.

    Args:
        out_dir: the job's folder.

    Example:
        >>> sweep_job("emb/")  # doctest: +SKIP
        []
    """
    if storage.is_url(out_dir):
        return []
    folders = [out_dir, *part_files(out_dir).folders(), storage.join(out_dir, "tiles")]  # the job's folders
    return [p for folder in folders for p in atomic.sweep_temporaries(folder)]


sweep_temporaries = sweep_job  # the former name


def read_metadata_file(path: str, limit: int = METADATA_CAP) -> bytes:
    """A manifest's bytes, at most `limit`: a local one only if it is a regular file (a FIFO would block, and
    /dev/zero never end); ValueError naming it otherwise."""
    if not storage.is_url(path):
        return read_capped(path, limit=limit)
    with storage.open_file(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes; not a metadata file pe-jax wrote")
    return data


def part_files(out_dir: str, settings: Settings | dict | None = None, n_parts: int = 1) -> PartFiles:
    """The part files of a job with `settings` (a Settings or the manifest's dict; None: read the folder's
    manifest, or the pe-jax layout of one tower where it has none).

    Args:
        out_dir: the job's folder.
        settings: its settings, or None to read them from its manifest.
        n_parts: its part count (clip-retrieval's names pad part numbers to its digits).

    Example:
        >>> part_files("emb/").embeddings(0)  # doctest: +SKIP
        'emb/img_emb/img_emb_0.npy'
    """
    if settings is None:
        path = storage.join(out_dir, "manifest.json")
        try:
            settings = json.loads(read_metadata_file(path)).get("settings", {})
        except FileNotFoundError:
            settings = {}
        except (ValueError, AttributeError) as e:
            raise InputError(f"{path}: not a manifest ({e})") from None
    get = settings.get if isinstance(settings, dict) else lambda k, d: getattr(settings, k, d)
    return PartFiles(out_dir, get("layout", "pe-jax"), get("modality", "image"), n_parts)


def read_embeddings(out_dir: str, tower: str | None = None) -> tuple[np.ndarray, list[dict]]:
    """All finished parts of an embedding job, in order: (embeddings [N, D], metadata rows). `tower`: image or
    text for an image,text job (default: its first, image); the layout is the manifest's. Empty parts have no
    files (`empty_marker`); a job of empty parts only gives a (0, 0) array and no rows.

    Args:
        out_dir: the job's folder (or URL); tower: "image" or "text".

    Example:
        >>> vectors, rows = read_embeddings("emb/")  # doctest: +SKIP
        >>> vectors.shape[0] == len(rows)  # doctest: +SKIP
        True
    """
    import pyarrow.parquet as pq

    summary, job, files, paths = _finished_parts(out_dir, tower)
    if not paths and _empty_parts(out_dir):  # a job whose parts are all empty has no rows, which is no error
        return np.zeros((0, 0), np.float32), []
    if not paths:
        where = files.embeddings(0, tower).replace(files.out_dir, out_dir.rstrip("/"), 1)
        raise NotFound(f"{out_dir}: no embeddings like {where} (not an embedding job's output)")
    arrays, rows = [], []
    for p, meta in paths:
        table = _record(out_dir, _part_number(p)[0], job)  # bytes checked as they are read
        role = f"embeddings:{tower or files.towers[0]}"
        arrays.append(np.load(io.BytesIO(part_checksums.read_checked(table, role, p))))
        rows += pq.read_table(io.BytesIO(part_checksums.read_checked(table, "metadata", meta))).to_pylist()
        if len(rows) != sum(len(a) for a in arrays):
            raise InputError(f"{p} has {len(arrays[-1])} rows but {meta} has {len(rows) - sum(map(len, arrays[:-1]))}"
                             ": the part is damaged; delete both and rerun the job to redo it")
    if summary and summary.get("embedded") != len(rows):
        raise InputError(f"{out_dir}: its parts hold {len(rows)} rows, its manifest.json says {summary.get('embedded')}"
                         " were embedded: parts were replaced or rewritten since the job finished; rerun it")
    return np.concatenate(arrays), rows


def read_tile_features(out_dir: str) -> np.ndarray:
    """The tiles' rows of a `--tile-features` job's finished parts, row-aligned with `read_embeddings`:
    [N, max tiles, width], each image's grid of `tile_cols` x `tile_rows` tiles (its metadata) row by row, zeros
    after them. Each file's bytes are checked against its part's checksums as they are read.

    Args:
        out_dir: the job's folder (or URL).

    Example:
        >>> tiles = read_tile_features("emb/")  # doctest: +SKIP
        >>> tiles.shape[0] == len(read_embeddings("emb/")[1])  # doctest: +SKIP
        True
    """
    arrays, (_, job, _, paths) = [], _finished_parts(out_dir)
    for embeddings, _ in paths:
        n = _part_number(embeddings)[0]
        path = tiles_path(out_dir, n)
        if not storage.exists(path):
            raise NotFound(f"{path} is missing: not a --tile-features job's part, or a damaged one")
        table = _record(out_dir, n, job)
        table = table if table and "tiles" in table["files"] else None  # a part from before tiles were recorded
        arrays.append(np.load(io.BytesIO(part_checksums.read_checked(table, "tiles", path))))
        if len(arrays[-1]) != rows_of(embeddings):
            raise InputError(f"{path} has {len(arrays[-1])} rows but {embeddings} has {rows_of(embeddings)}: the part "
                             "is damaged; delete its files and rerun the job to redo it")
    if not arrays and _empty_parts(out_dir):
        return np.zeros((0, 0, 0), np.float32)
    if not arrays:
        raise NotFound(f"{out_dir}: no finished part with tiles (not a --tile-features job's output)")
    return np.concatenate(arrays)


def _empty_parts(out_dir: str) -> bool:
    """Whether the job has empty parts (`empty_marker`)."""
    pattern = storage.join(out_dir, "failures", "part-*.empty")
    return bool(storage.glob(pattern) if storage.is_url(out_dir) else glob.glob(glob.escape(out_dir) +
                                                                                 "/failures/part-*.empty"))


def _finished_parts(out_dir: str, tower: str | None = None) -> tuple[dict, str | None, PartFiles, list]:
    """What both readers read: (the finished job's manifest or {}, its job identity, its part files, the
    (embeddings, metadata) files of its finished parts in part order, checked against the manifest's parts)."""
    manifest = _manifest(out_dir)
    summary, job = _finished_summary(manifest), part_checksums.job_of(manifest)
    files = part_files(out_dir, summary.get("settings"), summary.get("parts", 1))
    paths = files.on_disk(tower)  # in part order: part-100000 after part-99999
    _check_parts(summary, files, [_part_number(p)[0] for p, _ in paths], tower)
    return summary, job, files, paths


def _manifest(out_dir: str) -> dict:
    """The folder's manifest.json ({} where there is none, or it is no object)."""
    path = storage.join(out_dir, "manifest.json")
    try:
        manifest = json.loads(read_metadata_file(path))
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InputError(f"{path}: not a manifest ({e})") from None
    return manifest if isinstance(manifest, dict) else {}


def _finished_summary(manifest: dict) -> dict:
    """The manifest of a finished job (its settings and final counts); {} for a folder without one or whose job
    has not finished (its parts are then whatever is on disk)."""
    if not (manifest.get("complete") is True and isinstance(manifest.get("parts"), int)
            and isinstance(manifest.get("settings"), dict)):
        return {}
    return manifest


def _record(out_dir: str, n: int, job: str | None) -> dict | None:
    """Part `n`'s record, refused in one line when it is not the job `job`'s (`part_checksums.not_the_jobs`)."""
    table = part_checksums.read_record(out_dir, n)
    foreign = part_checksums.not_the_jobs(part_checksums.record_path(out_dir, n), n, table, job)
    if foreign:
        raise InputError(f"{foreign}; move the part's files away and rerun the job to redo it")
    return table


def _check_parts(summary: dict, files: PartFiles, numbers: list[int], tower: str | None):
    """Refuses a finished job's folder whose part files are not the parts its manifest counts: one missing (a
    read would silently lack its rows) or one no part of the job (another job's, or a stray copy)."""
    if not summary:
        return
    empty = set(summary.get("empty_parts") or ())
    wanted = [n for n in range(summary["parts"]) if n not in empty]
    missing = sorted(set(wanted) - set(numbers))
    if missing:
        raise InputError(f"{files.embeddings(missing[0], tower)} is missing ({len(missing)} of the {len(wanted)} parts "
                         "with rows the job's manifest.json counts as finished): rerun the job to redo it")
    stray = sorted(set(numbers) - set(wanted))
    if stray:
        raise InputError(f"{files.embeddings(stray[0], tower)} is no part of the job: its manifest.json counts "
                         f"{summary['parts']} parts{f', {sorted(empty)} empty' if empty else ''}; move it away")


def _part_number(path: str) -> tuple[int, str]:
    digits = "".join(c if c.isdigit() else " " for c in path.rsplit("/", 1)[-1]).split()
    return (int(digits[-1]) if digits else -1, path)
