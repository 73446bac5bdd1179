"""Where inputs come from: the one listing of folders, list files, webdataset tar shards, labelled image sets
and text rows, for the embedding job, finetuning and the evaluations alike.

Every input is an `Item` with a stable key: a folder's file is keyed by its path relative to the folder
without the extension, a tar member by its webdataset key (the member name without the extension), a list
row by its `key` column or else the path as written; text rows by their `key` column or else their row
number. Tar shards are indexed in one sequential pass over their headers: each sample's image is then read
by byte range (`pe_jax.preprocess.image.ByteRange`), never by scanning the tar again. Hidden files and
folders (`.DS_Store`, `.git`) are not inputs.
"""

from __future__ import annotations

import collections
import csv
import glob
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from pe_jax import storage
from pe_jax.preprocess.image import ByteRange

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # image members of tar shards


@dataclass(frozen=True)
class Item:
    key: str
    source: str  # a path, "shard.tar::member" or "list.jsonl:ROW"
    location: ByteRange | None = None  # where a tar member's bytes are
    text: str | None = None  # a text input, or an image's caption
    label: str | None = None  # a class name
    extra: dict = field(default_factory=dict)  # carried columns

    @property
    def data(self):
        """What `pe_jax.preprocess.image.decode_image` reads: a path or a byte range."""
        return self.location or self.source


# ------------------------------------------------------------------------------------------------ patterns


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
                raise FileNotFoundError(f"{pattern}: the pattern matches no tar shard ({shard} not found)")
            raise FileNotFoundError(f"{pattern}: shard not found: {shard} (the first missing one)")
        shards.append(shard)
    if not shards:
        raise FileNotFoundError(f"{pattern}: the pattern matches no tar shard")
    return shards


# ------------------------------------------------------------------------------------------------ listings


def _hidden(name: str) -> bool:
    return name.startswith(".")


def iter_folder(root: str) -> Iterator[Item]:
    """Every file under `root` (recursive, hidden names skipped, symlinked folders not followed), walked lazily
    in the order of their sorted paths: one folder's listing is held at a time, so a folder of 10 M images
    streams. The key is the path relative to `root` without its extension, with it where two files of one
    folder share a stem. A file that does not decode is a recorded failure later. An object-store folder is listed
    whole (`storage.find`), with the same order and keys."""
    if storage.is_url(root):
        yield from _objects(root)
    else:
        yield from _walk(root, root)


def _objects(root: str) -> Iterator[Item]:
    prefix = root.rstrip("/") + "/"
    rels = [u[len(prefix):] for u in storage.find(root) if u.startswith(prefix)]
    rels = [r for r in rels if r and not any(_hidden(part) for part in r.split("/"))]
    stems = collections.Counter(os.path.splitext(r)[0] for r in rels)
    for rel in rels:  # sorted full paths: the local walk's order
        yield Item(rel if stems[os.path.splitext(rel)[0]] > 1 else os.path.splitext(rel)[0], prefix + rel)


def _walk(root: str, folder: str) -> Iterator[Item]:
    try:
        with os.scandir(folder) as listing:
            entries = [(e.name, e.is_dir() and not e.is_symlink(), e.is_dir()) for e in listing if not _hidden(e.name)]
    except OSError as e:  # an unreadable subfolder would silently drop its inputs
        raise ValueError(f"{folder}: cannot list the input folder ({e.strerror or e})") from None
    # A folder sorts as its name + "/": this order is exactly that of the full paths, sorted.
    entries.sort(key=lambda e: e[0] + "/" if e[1] else e[0])
    stems = collections.Counter(os.path.splitext(name)[0] for name, _, is_dir in entries if not is_dir)
    for name, walk_into, is_dir in entries:
        path = os.path.join(folder, name)
        if walk_into:
            yield from _walk(root, path)
        elif not is_dir:  # a symlink to a folder is neither walked nor an input (as os.walk lists it)
            rel = os.path.relpath(path, root)
            yield Item(rel if stems[os.path.splitext(name)[0]] > 1 else os.path.splitext(rel)[0], path)


def list_folder(root: str) -> list[Item]:
    """`iter_folder(root)` as a list; an empty folder is an error."""
    items = list(iter_folder(root))
    if not items:
        raise ValueError(f"{root}: the input folder is empty")
    return items


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = everything before the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, f"{dot}{ext}".lower()


def list_tar(shard: str) -> list[Item]:
    """The samples of a webdataset shard, in member order, indexed in one pass over the headers: each image
    member's byte range, and its sidecars: `.txt` -> text (caption), `.cls` -> label, `.json` -> its
    top-level fields as carried columns (img2dataset's url, width, status...; nested values as JSON text)."""
    try:
        with storage.open_file(shard, block_size=storage.READ_BLOCK, cache_type="readahead") as f, \
                tarfile.open(fileobj=f) as tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar:
                if m.isfile():
                    key, ext = _sample_key(m.name)
                    samples.setdefault(key, {})[ext] = m
            items = []
            for key, members in samples.items():
                image = next((m for e, m in members.items() if e in IMAGE_EXTS), None)
                if image is None:
                    continue
                side = {e: _read_member(tar, members[e]) for e in (".txt", ".cls", ".json") if e in members}
                items.append(Item(key, f"{shard}::{image.name}", ByteRange(shard, image.offset_data, image.size),
                                  text=side.get(".txt"), label=side.get(".cls"),
                                  extra=_json_fields(side[".json"]) if ".json" in side else {}))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{shard}: not a readable tar shard ({type(e).__name__}: {e})") from None
    return items


MAX_SIDECAR_BYTES = 1 << 20  # a caption or label larger than this is not one


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    if member.size > MAX_SIDECAR_BYTES:
        raise ValueError(f"{member.name}: {member.size} bytes is too large for a sidecar")
    return tar.extractfile(member).read().decode("utf-8", errors="replace").strip()


def _json_fields(text: str) -> dict:
    """A `.json` sidecar's top-level fields; nested values as JSON text. One that is not a JSON object is kept
    whole, as the `json` column, rather than lost."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"json": text}
    if not isinstance(value, dict):
        return {"json": text}
    return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in value.items()}


def read_rows(src: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL or CSV file; a bad line is an error naming the file and line."""
    with storage.open_file(src, "r", newline="") as f:
        if src.endswith(".csv"):
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{src}, line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{src}, line {n}: a row must be a JSON object")
            yield n, row


def _table_rows(src: str) -> Iterator[tuple[int, dict]]:
    if src.endswith(".parquet"):  # read a row group's batch at a time: a 100 M-row list never sits in memory
        import pyarrow.parquet as pq

        rows = (r for b in pq.ParquetFile(storage.open_file(src)).iter_batches(batch_size=65536) for r in b.to_pylist())
        yield from enumerate(rows, 1)
    elif src.endswith((".csv", ".jsonl")):
        yield from read_rows(src)
    else:  # txt: one path per line
        with storage.open_file(src, "r") as f:
            yield from ((n, {"path": line.strip()}) for n, line in enumerate(f, 1) if line.strip())


def iter_paths(src: str) -> Iterator[Item]:
    """The rows of a list file, streamed (txt of paths; csv, jsonl or parquet with a `path` column, optional
    `key`, other columns carried); relative paths are relative to the list's folder."""
    base = storage.dirname(src)
    for n, row in _table_rows(src):
        path = row.pop("path", None)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{src}, row {n}: a list needs a 'path' column")
        key = str(row.pop("key", path))
        yield Item(key, _beside(base, path), extra=row)


def _beside(base: str, path: str) -> str:
    """A list's path: absolute paths and URLs as written, others relative to the list's folder `base`."""
    return path if os.path.isabs(path) or storage.is_url(path) else storage.join(base, path)


def list_paths(src: str) -> list[Item]:
    return list(iter_paths(src))


def iter_texts(src: str) -> Iterator[Item]:
    """Text inputs, streamed: a txt file (one per line), or JSONL/CSV rows with a `text` column (others
    carried)."""
    if not storage.isfile(src):
        raise FileNotFoundError(f"input not found: {src}")
    if src.endswith((".jsonl", ".csv")):
        rows = read_rows(src)
    else:
        rows = _lines(src)
    for n, row in rows:
        if "text" not in row:
            raise ValueError(f"{src}, line {n}: the row has no 'text'")
        text = row.pop("text")
        yield Item(str(row.pop("key", n)), f"{src}:{n}", text=text, extra=row)


def _lines(src: str) -> Iterator[tuple[int, dict]]:
    with storage.open_file(src, "r") as f:
        yield from ((n, {"text": line.rstrip("\n")}) for n, line in enumerate(f, 1))


def count_rows(src: str, modality: str = "image") -> int:
    """How many items `iter_paths` (or `iter_texts` for text) yields from the list file `src`, without
    building them: a parquet file's row count, else a pass over the lines (~0.1 s per million)."""
    if src.endswith(".parquet") and modality != "text":
        import pyarrow.parquet as pq

        return pq.ParquetFile(storage.open_file(src)).metadata.num_rows
    if src.endswith(".csv"):
        with storage.open_file(src, "r", newline="") as f:
            return sum(1 for _ in csv.DictReader(f))
    with storage.open_file(src, "rb") as f:
        if modality == "text" and not src.endswith(".jsonl"):
            return sum(1 for _ in f)
        return sum(1 for line in f if line.strip())


def list_pairs(src: str) -> list[Item]:
    """Image-text pairs: a JSONL/CSV of (`image` or `path`, `caption` or `text`), or webdataset tar shards
    (`KEY.jpg` + `KEY.txt`; samples without a caption are left out)."""
    if is_tar_pattern(src):
        return [it for shard in tar_shards(src) for it in list_tar(shard) if it.text is not None]
    if not storage.isfile(src):
        raise FileNotFoundError(f"no image-text list at {src} (expected .jsonl, .csv or tar shards)")
    if not src.endswith((".jsonl", ".csv")):
        raise ValueError(f"{src}: image-text pairs come as .jsonl, .csv or tar shards")
    base = storage.dirname(src)
    items = []
    for n, row in read_rows(src):
        path, caption = row.get("image", row.get("path")), row.get("caption", row.get("text"))
        if path is None or caption is None:
            raise ValueError(f"{src}, line {n}: a row needs an image path ('image' or 'path') and a caption "
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
        with storage.open_file(src, "r", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][:2] == ["path", "label"]:
            rows = rows[1:]
        if any(len(r) < 2 for r in rows):
            raise ValueError(f"{src}: every CSV row needs path,label")
        base = storage.dirname(src)
        items = [Item(r[0], _beside(base, r[0]), label=_class_name(r[1])) for r in rows]
        classes = sorted({r[1] for r in rows})
    else:
        raise FileNotFoundError(f"no image folder or CSV at {src}")
    if not classes:
        raise ValueError(f"{src}: no classes found (expected one sub-folder per class, or a CSV of path,label)")
    if not items:
        raise ValueError(f"{src}: no images found")
    return items, [_class_name(c) for c in classes]


def _class_name(label: str) -> str:
    return label.replace("_", " ")


def label_indices(items: list[Item], classnames: list[str]) -> list[int]:
    """Each item's label as an index into `classnames`; a label outside them is an error."""
    index = {c: i for i, c in enumerate(classnames)}
    unknown = sorted({it.label for it in items} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the {len(classnames)} classes")
    return [index[it.label] for it in items]


def _folder_or_empty(path: str) -> list[Item]:
    try:
        return list_folder(path)
    except ValueError:  # an empty class folder
        return []
