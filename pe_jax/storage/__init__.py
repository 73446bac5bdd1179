"""The bytes room: everything pe-jax reads from and writes to storage goes through this package.

- here: paths and URLs alike (local files, `gs://`, `s3://`, `https://`): existence, listing, reads, ranges,
  whole-object writes and the local cache of remote checkpoints;
- `files`: regular-file checks and capped reads of metadata;
- `atomic`: the one "write beside, then rename" (one PUT on an object store), and the one sweeper of
  pe-jax's own temporaries;
- `locks`: one job per folder at a time;
- `hashing`: checksums and content hashes.

Object stores and web servers as inputs, outputs and checkpoint sources: `gs://`, `s3://`, `https://` and any
other fsspec URL, through one small set of calls that take a local path or a URL alike.

Local paths keep their exact local behaviour (the callers use `os` for them); a URL goes through fsspec
(`pip install 'pe-jax[cloud]'`: fsspec, s3fs, gcsfs). An S3-compatible endpoint (MinIO, Ceph, a test server) is
named by `AWS_ENDPOINT_URL`, as for the AWS CLI. Writes to an object store are single PUTs of whole objects, so
an object exists complete or not at all: there is no temporary object to leave behind.

Checkpoints are read from local files (memory-mapped, restored by Orbax): `local_copy(url)` downloads one, a
file or a checkpoint folder, into the cache (`$PE_JAX_CACHE`, default `~/.cache/pe_jax/objects`) under a
temporary name renamed into place, and reuses it while the object's size and ETag (or modification time) stay
the same.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading

from pe_jax.errors import MissingDependency, NotFound

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")
READ_BLOCK = 16 << 20  # range reads of tar members fetch this much ahead: one request per block, not per image


def is_url(path) -> bool:
    """An fsspec URL (s3://, gs://, https://, memory://...); `file://` and `hf://` (pe_jax.checkpoints) are not."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith(("file://", "hf://"))


def filesystem(url: str):
    """(fsspec filesystem, path within it) for `url`."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependency(f"{url}: object-store URLs need fsspec and its backends: pip install 'pe-jax[cloud]'") \
            from None
    options = {}
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    try:
        fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **options)
    except ImportError as e:  # the backend (s3fs, gcsfs, aiohttp) is missing
        raise MissingDependency(f"{url}: {e}; pip install 'pe-jax[cloud]'") from None
    return fs, path


def join(base: str, *names: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    return fs.isfile(p)


def open_file(path: str, mode: str = "rb", *, newline: str | None = None, **options):
    """A file object for a local path or a URL. Text is UTF-8; read, a leading byte-order mark is dropped
    (a spreadsheet's "UTF-8 CSV" starts with one, which made its first column `\ufeffpath`)."""
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    if not is_url(path):
        return open(path, mode, newline=newline, encoding=encoding) if "b" not in mode else open(path, mode)
    fs, p = filesystem(path)
    if "b" in mode:
        return fs.open(p, mode, **options)
    return fs.open(p, mode, encoding=encoding, newline=newline)


class Exists:
    """`exists(path)` for many paths: a URL's folder is listed once (one request sequence, not one per path)."""

    def __init__(self):
        self._listed: dict[str, set[str]] = {}

    def __call__(self, path: str) -> bool:
        if not is_url(path):
            return os.path.exists(path)
        folder = path.rsplit("/", 1)[0]
        if folder not in self._listed:
            fs, p = filesystem(folder)
            try:
                self._listed[folder] = {q.rstrip("/").rsplit("/", 1)[-1] for q in fs.ls(p, detail=False)}
            except FileNotFoundError:
                self._listed[folder] = set()
        return path.rsplit("/", 1)[1] in self._listed[folder]


def stamp(url: str) -> str:
    """What identifies an object's version: its size and ETag, else its modification time."""
    fs, p = filesystem(url)
    info = fs.info(p)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}\t{version}"


# Open URL files, one per object, shared by the decoding threads (a lock each): sequential member reads of a
# shard then cost one request per READ_BLOCK instead of one per member.
_open: collections.OrderedDict = collections.OrderedDict()
_open_lock = threading.Lock()


def read_range(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the object `path` (a URL)."""
    with _open_lock:
        entry = _open.pop(path, None)
        if entry is None:
            fs, p = filesystem(path)
            entry = (fs.open(p, "rb", block_size=READ_BLOCK, cache_type="readahead"), threading.Lock())
        _open[path] = entry
        while len(_open) > 8:
            _open.popitem(last=False)[1][0].close()
    f, lock = entry
    with lock:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{path}: {size} bytes expected at offset {offset}, {len(data)} read")
    return data


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)


def write_bytes(url: str, data: bytes):
    """One PUT of the whole object: it appears complete or not at all."""
    fs, p = filesystem(url)
    fs.pipe_file(p, bytes(data))


def remove(url: str):
    fs, p = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(p)


def find(url: str) -> list[str]:
    """Every object under the folder `url`, as URLs, sorted."""
    fs, p = filesystem(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{q}" if not q.startswith(f"{protocol}://") else q for q in fs.find(p))


def glob(url: str) -> list[str]:
    fs, p = filesystem(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{q}" for q in fs.glob(p))


# ------------------------------------------------------------------------------------------------ downloads


def cache_root() -> str:
    return os.environ.get("PE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pe_jax", "objects")


def local_copy(url: str) -> str:
    """A local copy of the file or folder `url` (a checkpoint), downloaded once into the cache and reused while
    the object is unchanged; an index.json brings the safetensors shards its weight_map names."""
    fs, p = filesystem(url)
    if not fs.exists(p):
        raise NotFound(f"checkpoint not found: {url}")
    folder = fs.isdir(p)
    version = _folder_stamp(fs, p) if folder else stamp(url)
    name = os.path.basename(p.rstrip("/")) or "object"
    home = os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:24])
    target = os.path.join(home, name)
    if _cached(home, target, version):
        return target
    os.makedirs(home, exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    try:
        fs.get(p.rstrip("/") + ("/" if folder else ""), partial, recursive=folder)
        if url.endswith(".index.json"):
            _fetch_shards(fs, p, partial, home)
        if not _cached(home, target, version):  # another process (a Ray actor beside this one) may have won
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(partial, target)
            with open(os.path.join(home, ".stamp"), "w") as f:
                f.write(version)
    finally:  # nothing half-downloaded stays under the final name
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    return target


def _cached(home: str, target: str, version: str) -> bool:
    with contextlib.suppress(OSError), open(os.path.join(home, ".stamp")) as f:
        return f.read() == version and os.path.exists(target)
    return False


def _folder_stamp(fs, path: str) -> str:
    found = fs.find(path, detail=True)
    rows = sorted((k, v.get("size"), v.get("ETag") or v.get("mtime") or "") for k, v in found.items())
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()


def _fetch_shards(fs, index: str, local_index: str, home: str):
    with open(local_index) as f:
        weight_map = json.load(f).get("weight_map") or {}
    base = index.rsplit("/", 1)[0]
    for name in sorted(set(weight_map.values())):
        if os.path.isabs(name) or ".." in name.split("/"):
            continue  # refused by the index reader, naming it
        os.makedirs(os.path.dirname(os.path.join(home, name)), exist_ok=True)
        fs.get(f"{base}/{name}", os.path.join(home, name))
