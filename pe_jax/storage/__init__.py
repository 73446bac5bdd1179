"""The bytes room: everything pe-jax reads from and writes to storage goes through this package.

- here: paths and URLs alike (local files, `gs://`, `s3://`, `https://`): existence, listing, reads, ranges,
  whole-object writes and the local cache of remote checkpoints;
- `urls`: what a URL is, and the fsspec filesystem behind one;
- `files`: regular-file checks and capped reads of metadata;
- `atomic`: the one "write beside, then rename" (one PUT on an object store), and the one sweeper of
  pe-jax's own temporaries;
- `locks`: one job per folder at a time;
- `hashing`: checksums and content hashes.

Object stores and web servers as inputs, outputs and checkpoint sources: `gs://`, `s3://`, `https://` and any
other fsspec URL, through one small set of calls that take a local path or a URL alike.

Local paths keep their exact local behaviour (the callers use `os` for them); a URL goes through fsspec
(`pip install -e '.[cloud]'` in the checkout, or `pip install fsspec s3fs gcsfs`). An S3-compatible endpoint
(MinIO, Ceph, a test server) is named by `AWS_ENDPOINT_URL`, as for the AWS CLI. Writes to an object store are
single PUTs of whole objects, so an object exists complete or not at all: there is no temporary object to leave
behind.

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
import threading

from pe_jax.errors import NotFound

# storage.write_bytes (re-exported): a path or a URL, atomically
from pe_jax.storage.atomic import atomic_file, atomic_folder, rename_into_place, write_bytes, write_text  # noqa: F401
from pe_jax.storage.files import check_regular_file, read_capped
from pe_jax.storage.urls import GS, NetworkError, filesystem, is_url, network_faults  # noqa: F401

KINDS = {"isdir": "directory", "isfile": "file"}
READ_BLOCK = 16 << 20  # range reads of tar members fetch this much ahead: one request per block, not per image


def join(base: str, *names: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))


def _ask(local, question: str, **http):
    """The storage call `question`: `local(path)` for a local path, the URL's filesystem's `question` for a URL
    (`http`: its options for an http(s) URL); a network fault is one line naming the URL (`network_faults`)."""
    @network_faults
    def ask(path: str) -> bool:
        if not is_url(path):
            return local(path)
        fs, p = filesystem(path)
        if question in KINDS and path.startswith((*GS, "s3://", "s3a://")):
            return _is(fs, p, KINDS[question])
        options = http if path.startswith(("http://", "https://")) else {}
        return getattr(fs, question)(p, **options)

    ask.__name__ = ask.__qualname__ = question
    ask.__doc__ = f"`os.path.{question}` of a local path or a URL."
    return ask


def _is(fs, p: str, kind: str) -> bool:
    # gcsfs's and s3fs's isdir/isfile answer "no" to any fault, after a full round of tries (a dead endpoint then
    # cost the wait twice): only a missing object is "no"
    try:
        return fs.info(p)["type"] == kind
    except FileNotFoundError:
        return False


# strict: an unreachable web server or an error status is a NetworkError naming the URL; only a 404 is False
exists = _ask(os.path.exists, "exists", strict=True)
isdir = _ask(os.path.isdir, "isdir")
isfile = _ask(os.path.isfile, "isfile")


@network_faults
def open_file(path: str, mode: str = "rb", *, newline: str | None = None, **options):
    """A file object for a local path or a URL. Text is UTF-8; read, a leading byte-order mark is dropped
    (a spreadsheet's "UTF-8 CSV" starts with one, which made its first column `\ufeffpath`). A local file read
    must be a regular file (a FIFO as a tar shard or a list blocked the job)."""
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    if not is_url(path):
        if "r" in mode:
            check_regular_file(path)
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
            self._listed[folder] = _names(folder)
        return path.rsplit("/", 1)[1] in self._listed[folder]


@network_faults
def _names(folder: str) -> set[str]:
    """The names in a URL's folder (none when it does not exist); a refused listing is one line naming it."""
    fs, p = filesystem(folder)
    try:
        return {q.rstrip("/").rsplit("/", 1)[-1] for q in fs.ls(p, detail=False)}
    except FileNotFoundError:
        return set()


@network_faults
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


@network_faults
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


@network_faults
def read_bytes(path: str | os.PathLike, offset: int | None = None, size: int | None = None, *,
               check_size=None) -> bytes:
    """The bytes of a local regular file or of an object (a URL), or `size` bytes at `offset` of one. A local
    FIFO, device or folder is refused unread (storage.files.check_regular_file).

    Args:
        path: a local path or a URL.
        offset, size: a byte range (a tar member); None reads the whole file.
        check_size: `check_size(n)` is called with the number of bytes about to be read (a local file's size,
            or the range's), before anything is read: it refuses what is too large by raising.

    Example:
        >>> read_bytes("shards/00000.tar", 1536, 10240)  # doctest: +SKIP
    """
    path = os.fspath(path)
    if check_size is not None and size is not None:
        check_size(size)
    if is_url(path):
        if size is not None:
            return read_range(path, offset or 0, size)
        fs, p = filesystem(path)
        return fs.cat_file(p)
    check_regular_file(path)
    with open(path, "rb", buffering=0) as f:
        if size is None:
            if check_size is not None:
                check_size(os.fstat(f.fileno()).st_size)
            return f.read()
        data = os.pread(f.fileno(), size, offset or 0)
    if len(data) != size:
        raise EOFError(f"{path}: {size} bytes expected at offset {offset or 0}, {len(data)} read")
    return data


@network_faults
def find(url: str) -> list[str]:
    """Every object under the folder `url`, as URLs, sorted."""
    fs, p = filesystem(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{q}" if not q.startswith(f"{protocol}://") else q for q in fs.find(p))


@network_faults
def glob(url: str) -> list[str]:
    fs, p = filesystem(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{q}" for q in fs.glob(p))


# ------------------------------------------------------------------------------------------------ downloads


def cache_root() -> str:
    return os.environ.get("PE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pe_jax", "objects")


@network_faults
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

    def commit(tmp: str, target: str):
        if not _cached(home, target, version):  # another process (a Ray actor beside this one) may have won
            rename_into_place(tmp, target)
            write_text(os.path.join(home, ".stamp"), version)

    # downloaded beside, renamed into place: nothing half-downloaded is ever under the final name
    with (atomic_folder if folder else atomic_file)(target, commit=commit) as tmp:
        fs.get(p.rstrip("/") + ("/" if folder else ""), tmp, recursive=folder)
        if url.endswith(".index.json"):
            _fetch_shards(fs, p, tmp, home)
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
    weight_map = json.loads(read_capped(local_index)).get("weight_map") or {}  # downloaded: capped
    base = index.rsplit("/", 1)[0]
    for name in sorted(set(weight_map.values())):
        if os.path.isabs(name) or ".." in name.split("/"):
            continue  # refused by the index reader, naming it
        os.makedirs(os.path.dirname(os.path.join(home, name)), exist_ok=True)
        fs.get(f"{base}/{name}", os.path.join(home, name))
