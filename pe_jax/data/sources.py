"""Where inputs come from: the one listing of folders, list files, webdataset tar shards, labelled image sets
and text rows, for the embedding job, finetuning and the evaluations alike.

Every input is an `Item` (`pe_jax.data.samples`) with a stable key: a folder's file is keyed by its path relative
to the folder without the extension, a tar sample by its webdataset key (the member name up to the first dot
of its base name; `pe_jax.data.samples` groups members exactly as webdataset does), a list row by its `key` column
or else the path as written; text rows by their `key` column, else a list's path, else their row number.
Tar shards are indexed in one sequential pass over their headers: each sample's image is then read by byte
range (`pe_jax.preprocess.image.ByteRange`), never by scanning the tar again. Hidden files and folders
(`.DS_Store`, `.git`) are not inputs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from pe_jax import storage
from pe_jax.data.samples import MAX_SIDECAR_BYTES, Group, Item, folder_groups, json_int, sample_item, sidecar_text
from pe_jax.data.shards import expand_braces, is_tar_pattern, list_tar, shard_folder, tar_shards  # noqa: F401 (their old home)
from pe_jax.errors import InputError, NotFound
from pe_jax.storage.files import check_regular_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # an image file's extensions

SOURCE_KINDS = ("shards", "folder", "list", "texts")


@dataclass(frozen=True)
class Source:
    """An input, classified once (`classify`): what the embedding job's listing takes instead of probing the
    storage again. `kind`: tar shards, a folder, a list file of paths, or a text file; `shards`: every shard."""

    kind: str
    path: str
    shards: tuple[str, ...] = ()
    note: str | None = None  # what the input was taken as, for the summary (a folder of tar shards)


def classify(src: str, modality: str = "image") -> Source:
    """What `src` is: a folder holding `.tar` files or a brace/glob pattern (tar shards, each checked to exist),
    another folder, or a file (a list of paths; with `modality` "text", texts). NotFound names a missing input.

    Args:
        src: a path or an object-store URL.
        modality: "text" reads a file as texts; anything else as a list of inputs.

    Example:
        >>> classify("shards/{000..009}.tar").kind  # doctest: +SKIP
        'shards'
    """
    folder = storage.isdir(src)
    found = shard_folder(src) if folder else None
    if found is not None:
        shards, others = found
        kinds = sorted({os.path.splitext(n)[1] or n for n in others})
        note = f"{src}: a folder of {len(shards)} tar shards, embedded as webdataset shards" + (
            f"; {len(others)} other files there are not inputs ({', '.join(kinds)})" if others else "")
        return Source("shards", src, tuple(shards), note)
    if folder:
        return Source("folder", src)
    if is_tar_pattern(src):
        return Source("shards", src, tuple(tar_shards(src)))
    if not storage.isfile(src):
        raise NotFound(f"input not found: {src}")
    return Source("texts" if modality == "text" else "list", src)


# ------------------------------------------------------------------------------------------------ listings


def _hidden(name: str) -> bool:
    return name.startswith(".")


def iter_folder(root: str, modality: str = "image", read: bool = True) -> Iterator[Item]:
    """Every file under `root` (recursive, hidden names skipped, symlinked folders not followed), walked lazily
    in the order of their sorted paths: one folder's listing is held at a time, so a folder of 10 M images
    streams. The key is the path relative to `root` without its extension, with it where two files of one
    folder share a stem. An image with sidecars beside it (img2dataset's `files` layout: `KEY.jpg`, `KEY.txt`,
    `KEY.json`; `pe_jax.data.samples.folder_groups`) is one sample keyed `KEY`, its sidecars read as a tar
    sample's (`read=False`: not read, for a listing's count). A lone file in a sub-folder is labelled by its
    top-level folder (class folders: `cat/001.jpg` has label `cat`). A file that does not decode is a recorded failure
    later. An object-store folder is listed whole (`storage.find`), with the same order and keys."""
    if storage.is_url(root):
        yield from _objects(root, modality, read)
    else:
        yield from _walk(root, root, modality, read)


def _objects(root: str, modality: str, read: bool) -> Iterator[Item]:
    prefix = root.rstrip("/") + "/"
    rels = [u[len(prefix):] for u in storage.find(root) if u.startswith(prefix)]
    rels = [r for r in rels if r and not any(_hidden(part) for part in r.split("/"))]
    groups = folder_groups(rels, {r.rsplit("/", 1)[0] for r in rels if "/" in r})
    for rel in rels:  # sorted full paths: the local walk's order
        if groups[rel] is not None:
            yield _folder_item(groups[rel], lambda r: prefix + r, modality, read)


def _walk(root: str, folder: str, modality: str, read: bool) -> Iterator[Item]:
    try:
        with os.scandir(folder) as listing:
            entries = [(e.name, e.is_dir() and not e.is_symlink(), e.is_dir()) for e in listing if not _hidden(e.name)]
    except OSError as e:  # an unreadable subfolder would silently drop its inputs
        raise InputError(f"{folder}: cannot list the input folder ({e.strerror or e})") from None
    # A folder sorts as its name + "/": this order is exactly that of the full paths, sorted.
    entries.sort(key=lambda e: e[0] + "/" if e[1] else e[0])
    here = os.path.relpath(folder, root)
    rel = (lambda name: name) if here == "." else (lambda name: os.path.join(here, name))
    groups = folder_groups([rel(n) for n, _, is_dir in entries if not is_dir], [rel(n) for n, d, _ in entries if d])
    for name, walk_into, is_dir in entries:
        if walk_into:
            yield from _walk(root, os.path.join(folder, name), modality, read)
        elif not is_dir and groups[rel(name)] is not None:  # a symlink to a folder is neither walked nor an input
            yield _folder_item(groups[rel(name)], lambda r: os.path.join(root, r), modality, read)


def _folder_item(group, path, modality: str, read: bool) -> Item:
    """A folder's sample: a lone file as it is, an image with sidecars as a tar sample (sidecars unread unless
    `read`)."""
    def text(field: str) -> str:
        if not read:
            return ""
        where = path(group.fields.get(field, group.first))
        if not storage.is_url(where):  # a FIFO named like a sidecar would block the open forever
            check_regular_file(where)
        with storage.open_file(where, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
        return sidecar_text(where, len(data), lambda: data)

    if not group.fields:  # a lone file; for text, a lone .txt is a text input
        if modality == "text" and group.first.endswith(".txt"):
            return sample_item(Group(group.key, group.first, {"txt": group.first}), lambda e: path(group.first),
                               text, modality)
        # an image in a sub-folder (a class folder: cat/001.jpg) is labelled by its top folder, as pe-jax eval takes it
        return Item(group.key, path(group.first), label=group.key.split("/")[0] if "/" in group.key else None)
    return sample_item(group, lambda e: path(group.fields[e]), text, modality)


def list_folder(root: str) -> list[Item]:
    """`iter_folder(root)` as a list; an empty folder is an error."""
    items = list(iter_folder(root))
    if not items:
        raise InputError(f"{root}: the input folder is empty")
    return items


def _parquet(src: str):
    """A list's parquet file; one that is not readable is an error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(storage.open_file(src))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{src}: not a readable parquet file ({e})") from None


@contextlib.contextmanager
def _named(src: str):
    """A list or text file that is not UTF-8: an error naming it (Python's own names no file)."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise InputError(f"{src}: not UTF-8 text ({e.reason} at byte {e.start})") from None


CSV_FIELD_LIMIT = 64 << 20  # characters: csv's own default (128 KiB) stopped a list with a long caption


@contextlib.contextmanager
def _csv_file(src: str):
    """A CSV file opened for `csv` (fields up to CSV_FIELD_LIMIT); a CSV error names the file."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:  # csv's limit is process-wide: only ever raised, never lowered
        csv.field_size_limit(CSV_FIELD_LIMIT)
    with storage.open_file(src, "r", newline="") as f:
        try:
            yield f
        except csv.Error as e:
            raise InputError(f"{src}: not a readable CSV file ({e})") from None


_BLANK = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: a line the count (in bytes) skips, the read skips too


def _text_lines(src: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its `\n` or `\r\n`) of a text file, split at `\n` only, exactly as
    `count_rows` counts its bytes: a lone `\r` stays in its line (universal newlines split there, so a file
    holding one "changed while the job ran" on every run)."""
    with storage.open_file(src, "r", newline="\n") as f:
        for n, line in enumerate(f, 1):
            yield n, line.removesuffix("\n").removesuffix("\r")


def read_rows(src: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL or CSV file; a bad line is an error naming the file and line. A JSON
    integer no 64-bit column holds is kept as its text (`pe_jax.data.samples.json_int`)."""
    if src.endswith(".csv"):
        with _csv_file(src) as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
        return
    for n, line in _text_lines(src):
        if not line.strip(_BLANK):
            continue
        try:
            row = json.loads(line, parse_int=json_int)
        except ValueError as e:
            raise InputError(f"{src}, line {n}: not JSON ({e})") from None
        except RecursionError:
            raise InputError(f"{src}, line {n}: not JSON (nested too deeply: Python's parser stops at about "
                             f"{sys.getrecursionlimit()} levels)") from None
        if not isinstance(row, dict):
            raise InputError(f"{src}, line {n}: a row must be a JSON object")
        yield n, row


def _table_rows(src: str) -> Iterator[tuple[int, dict]]:
    if src.endswith(".parquet"):  # read a row group's batch at a time: a 100 M-row list never sits in memory
        rows = (r for b in _parquet(src).iter_batches(batch_size=65536) for r in b.to_pylist())
        yield from enumerate(rows, 1)
    elif src.endswith((".csv", ".jsonl")):
        yield from read_rows(src)
    else:  # txt: one path per line
        yield from ((n, {"path": line.strip(_BLANK)}) for n, line in _text_lines(src) if line.strip(_BLANK))


def iter_paths(src: str) -> Iterator[Item]:
    """The rows of a list file, streamed (txt of paths; csv, jsonl or parquet with a `path` column, optional
    `key`, other columns carried); relative paths are relative to the list's folder."""
    base = storage.dirname(src)
    with _named(src):
        for n, row in _table_rows(src):
            path = row.pop("path", None)
            if not isinstance(path, str) or not path:
                raise InputError(f"{src}, row {n}: a list needs a 'path' column")
            key = str(row.pop("key", path))
            yield Item(key, _beside(base, path), extra=row)


def _beside(base: str, path: str) -> str:
    """A list's path: absolute paths and URLs as written, others relative to the list's folder `base`."""
    return path if os.path.isabs(path) or storage.is_url(path) else storage.join(base, path)


def list_paths(src: str) -> list[Item]:
    return list(iter_paths(src))


def iter_texts(src: str) -> Iterator[Item]:
    """Text inputs, streamed: a txt file (one per line), or JSONL/CSV/parquet rows with a `text` column, else a
    `caption` column (others carried). An image list's rows (with `path`, `caption`) give its texts with the
    image job's keys: the `key` column, else the path, else the row number. A row whose text is null is a
    failure of its own; a row without the column is an error naming the file and row."""
    if not storage.isfile(src):
        raise NotFound(f"input not found: {src}")
    rows = _table_rows(src) if src.endswith((".jsonl", ".csv", ".parquet")) else _lines(src)
    with _named(src):
        for n, row in rows:
            column = "text" if "text" in row else "caption" if "caption" in row else None
            if column is None:
                raise InputError(f"{src}, row {n}: the row has no 'text' (nor 'caption'); it has {sorted(row)[:8]}")
            text = row.pop(column)
            key = str(row.pop("key", row.get("path", n)))
            error = None if isinstance(text, str) else \
                f"{src}, row {n}: the {column} is {json.dumps(text, default=str)}, not a text"
            yield Item(key, f"{src}:{n}", text=text if error is None else None, extra=row, error=error)


def _lines(src: str) -> Iterator[tuple[int, dict]]:
    yield from ((n, {"text": line}) for n, line in _text_lines(src))


def count_rows(src: str, modality: str = "image") -> int:
    """How many items `iter_paths` (or `iter_texts` for text) yields from the list file `src`, without
    building them: a parquet file's row count, else a pass over the lines (~0.1 s per million)."""
    if src.endswith(".parquet"):
        return _parquet(src).metadata.num_rows
    if src.endswith(".csv"):
        with _csv_file(src) as f, _named(src):
            return sum(1 for _ in csv.DictReader(f))
    with storage.open_file(src, "rb") as f:
        if modality == "text" and not src.endswith(".jsonl"):
            return sum(1 for _ in f)
        return sum(1 for line in f if line.strip())


def list_pairs(src: str, failures: list[dict] | None = None) -> list[Item]:
    """Image-text pairs: a JSONL/CSV of (`image` or `path`, `caption` or `text`), or webdataset tar shards
    (`KEY.jpg` + `KEY.txt`). A tar sample that cannot be a pair (a failure row of `list_tar`, or no caption) is
    left out, and recorded in `failures` when given, as the embedding job records failures:
    {"key", "source", "error"}.

    Args:
        src: a JSONL or CSV file, or tar shards (a `.tar` path, a brace or glob pattern).
        failures: a list the left-out samples are appended to.

    Example:
        >>> failed = []; len(list_pairs("shards/{000..009}.tar", failed)), len(failed)  # doctest: +SKIP
        (99998, 2)
    """
    if is_tar_pattern(src):
        items = [it for shard in tar_shards(src) for it in list_tar(shard)]
        if failures is not None:
            failures += [{"key": it.key, "source": it.source,
                          "error": it.error or f"{it.source}: no caption (no .txt member in sample {it.key!r})"}
                         for it in items if it.error is not None or it.text is None]
        return [it for it in items if it.error is None and it.text is not None]
    if not storage.isfile(src):
        raise NotFound(f"no image-text list at {src} (expected .jsonl, .csv or tar shards)")
    if not src.endswith((".jsonl", ".csv")):
        raise InputError(f"{src}: image-text pairs come as .jsonl, .csv or tar shards")
    base = storage.dirname(src)
    items = []
    for n, row in read_rows(src):
        path, caption = row.get("image", row.get("path")), row.get("caption", row.get("text"))
        if path is None or caption is None:
            raise InputError(f"{src}, line {n}: a row needs an image path ('image' or 'path') and a caption "
                             f"('caption' or 'text'); it has {sorted(row)}")
        items.append(Item(str(row.get("key", path)), _beside(base, path), text=str(caption)))
    return items


def list_labelled(src: str) -> tuple[list[Item], list[str]]:
    """(items with labels, class names) of an image folder with one sub-folder per class, or a CSV of
    path,label. Class names (and each item's label) are the sorted folder names (or labels) with underscores
    as spaces; CSV paths are relative to the CSV's folder."""
    if storage.is_url(src) and storage.isdir(src):  # class folders are the first level of the objects' paths
        items = [Item(it.key, it.source, label=_class_name(it.key.split("/")[0]))
                 for it in iter_folder(src) if "/" in it.key]
        classes = sorted({it.key.split("/")[0] for it in items})
    elif os.path.isdir(src):
        classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and not _hidden(d))
        items = [Item(f"{c}/{it.key}", it.source, label=_class_name(c)) for c in classes
                 for it in _folder_or_empty(os.path.join(src, c))]
    elif storage.isfile(src):
        with _csv_file(src) as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][:2] == ["path", "label"]:
            rows = rows[1:]
        if any(len(r) < 2 for r in rows):
            raise InputError(f"{src}: every CSV row needs path,label")
        base = storage.dirname(src)
        items = [Item(r[0], _beside(base, r[0]), label=_class_name(r[1])) for r in rows]
        classes = sorted({r[1] for r in rows})
    else:
        raise NotFound(f"no image folder or CSV at {src}")
    if not classes:
        raise InputError(f"{src}: no classes found (expected one sub-folder per class, or a CSV of path,label)")
    if not items:
        raise InputError(f"{src}: no images found")
    return items, [_class_name(c) for c in classes]


def _class_name(label: str) -> str:
    return label.replace("_", " ")


def label_indices(items: list[Item], classnames: list[str]) -> list[int]:
    """Each item's label as an index into `classnames`; a label outside them is an error."""
    index = {c: i for i, c in enumerate(classnames)}
    unknown = sorted({it.label for it in items} - set(index))
    if unknown:
        raise InputError(f"labels {unknown[:5]} are not among the {len(classnames)} classes")
    return [index[it.label] for it in items]


def _folder_or_empty(path: str) -> list[Item]:
    try:
        return list_folder(path)
    except ValueError:  # an empty class folder
        return []
