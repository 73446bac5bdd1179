"""Checksums of a pe_jax checkpoint's files and their verification; the content hash that names its weights.

`checksums.json`, beside `state/`, records every file under `state/` (each zarr chunk, `.zarray`,
`_METADATA`, ...) as [size, checksum] and the checkpoint's content hash: the sha256 of the sorted
(path, size, checksum) list of those files, leaving out Orbax's `_CHECKPOINT_METADATA` (timestamps) and
`commit_success.txt` (the path written), so the same weights written the same way hash the same.
`pe_jax.json` repeats the content hash. The checksum algorithms are in `pe_jax.storage.hashing`.

This module imports neither jax nor Orbax: `pe-jax verify` and the converter use it as it is. Verifying
only reads: a verification killed at any point leaves the checkpoint as it was.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import stat

from pe_jax.checkpoints.structure import (  # noqa: F401 (CheckpointIntegrityError, Problem: public here too)
    METADATA_FILE,
    STATE_DIR,
    CheckpointIntegrityError,
    Problem,
    read_json,
    size_change,
    structure_problems,
)
from pe_jax.errors import NotFound
from pe_jax.storage.atomic import write_text
from pe_jax.storage.files import check_regular_file
from pe_jax.storage.hashing import ALGORITHM, CHECKSUMS, file_checksum, sha256_of_files

CHECKSUMS_FILE = "checksums.json"
VOLATILE = ("_CHECKPOINT_METADATA", "commit_success.txt")  # checked, but outside the content hash
THREADS = 2  # files hashed at once: the hashes release the GIL, so two cores hash two files
VERIFY_ENV = "PE_JAX_VERIFY"

log = logging.getLogger("pe_jax")
_verified: dict[str, tuple] = {}  # checkpoint -> (fingerprint when it verified, content hash): see content_hash


def is_pe_jax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


def verify_by_default() -> bool:
    """Whether loading verifies when the caller does not say: yes unless PE_JAX_VERIFY=0."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def content_hash_of(files: dict[str, list]) -> str:
    """The content hash of a {path under the checkpoint: [size, checksum]} table."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        if os.path.basename(rel) not in VOLATILE:
            size, checksum = files[rel]
            digest.update(f"{rel}\t{size}\t{checksum}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def state_files(ckpt: str) -> dict[str, int]:
    """{path relative to the checkpoint ("state/..."): size} of every file under `state/`."""
    root = os.path.join(ckpt, STATE_DIR)
    out = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            file = os.path.join(folder, name)
            out[os.path.relpath(file, ckpt).replace(os.sep, "/")] = _regular(file, ckpt).st_size
    return out


def _regular(file: str, ckpt: str) -> os.stat_result:
    """os.stat of a checkpoint's file: CheckpointIntegrityError unless a regular file (a FIFO would block the
    hashing, or Orbax's read of a `.zarray` with verification off)."""
    st = os.stat(file)
    if not stat.S_ISREG(st.st_mode):
        rel = os.path.relpath(file, ckpt).replace(os.sep, "/")
        try:
            check_regular_file(file, where=rel)  # names what it is
        except (OSError, ValueError) as e:
            raise CheckpointIntegrityError(Problem(rel, f"unreadable ({e})")) from None
    return st


def fingerprint(ckpt: str) -> tuple:
    """(path, size, mtime, inode) of every file in the checkpoint: any write, rename or replacement changes it."""
    out = []
    for folder, dirs, names in os.walk(ckpt):
        dirs.sort()
        for name in sorted(names):
            st = _regular(os.path.join(folder, name), ckpt)
            out.append((os.path.relpath(os.path.join(folder, name), ckpt), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def checksum_files(ckpt: str, rels, threads: int = THREADS, algorithm: str = ALGORITHM) -> dict[str, str]:
    """{rel: checksum} of the files `rels` under `ckpt`, `threads` at a time (largest first)."""
    rels = sorted(rels, key=lambda r: -os.path.getsize(os.path.join(ckpt, r)))
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        sums = pool.map(lambda r: file_checksum(os.path.join(ckpt, r), algorithm), rels)
        return dict(zip(rels, sums, strict=True))


def write_checksums(ckpt: str, files: dict[str, list] | None = None, threads: int = THREADS) -> str:
    """Writes `checksums.json` into the checkpoint directory `ckpt` from `files` ({rel: [size, checksum]};
    default: hashing every file under state/). Returns the content hash."""
    if files is None:
        sizes = state_files(ckpt)
        sums = checksum_files(ckpt, sizes, threads)
        files = {rel: [sizes[rel], sums[rel]] for rel in sizes}
    digest = content_hash_of(files)
    head = {"format": 1, "algorithm": ALGORITHM, "content_hash": digest}
    rows = ",\n".join(f"  {json.dumps(rel)}: {json.dumps(list(files[rel]))}" for rel in sorted(files))
    write_text(os.path.join(ckpt, CHECKSUMS_FILE), json.dumps(head)[:-1] + ',\n "files": {\n' + rows + "\n }\n}\n")
    return digest


@dataclasses.dataclass
class Report:
    """What `verify` found. `verified`: the checkpoint has checksums (older ones are only checked for
    structure: every chunk present, of its size, and each `.zarray` agreeing with pe_jax.json)."""

    path: str
    verified: bool
    content_hash: str | None
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    non_finite: list = dataclasses.field(default_factory=list)  # pe_jax.json's: converted with --allow-non-finite

    @property
    def ok(self) -> bool:
        return not self.problems

    def error(self) -> CheckpointIntegrityError:
        more = f" (and {len(self.problems) - 1} more problems: run pe-jax verify {self.path})" \
            if len(self.problems) > 1 else ""
        from pe_jax.storage import cache_root

        cache = os.path.realpath(cache_root())
        cached = os.path.commonpath([cache, os.path.realpath(self.path)]) == cache
        hint = (f"; it is pe-jax's downloaded copy of a remote checkpoint: delete {self.path} (under $PE_JAX_CACHE)"
                " and it is fetched again") if cached else ""
        return CheckpointIntegrityError(f"checkpoint {self.path} is damaged: {self.problems[0]}{more}{hint}")

    def raise_if_bad(self) -> Report:
        if self.problems:
            raise self.error()
        return self

    def summary(self) -> str:
        if self.problems:
            return "\n".join([f"{self.path}: FAILED, {len(self.problems)} problems:",
                              *(f"  {p}" for p in self.problems)])
        done = f"OK {self.content_hash}" if self.verified else \
            f"OK (structure only: no {CHECKSUMS_FILE}, written before checksums; content hash {self.content_hash})"
        nan = f"; holds NaN or Inf in {', '.join(self.non_finite)} (--allow-non-finite)" if self.non_finite else ""
        return f"{self.path}: {done} ({self.files} files, {self.bytes / 1e9:.2f} GB){nan}"


def read_checksums(ckpt: str) -> dict:
    """checksums.json, checked to be a table this pe_jax reads and consistent with its own content hash
    (CheckpointIntegrityError otherwise)."""
    table = read_json(ckpt, CHECKSUMS_FILE)
    files = table.get("files") if isinstance(table, dict) else None
    if not isinstance(files, dict) or table.get("algorithm") not in CHECKSUMS or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in files.values()):
        kinds = " or ".join(CHECKSUMS)
        raise CheckpointIntegrityError(Problem(CHECKSUMS_FILE, f"corrupt: not a table of {kinds} checksums"))
    if content_hash_of(files) != table.get("content_hash"):
        raise CheckpointIntegrityError(Problem(CHECKSUMS_FILE, "corrupt: its content hash does not match its table"))
    return table


def _checksum_problems(ckpt: str, table: dict, meta: dict, disk: dict[str, int], threads: int) -> list[Problem]:
    files = table["files"]
    recorded_hash = meta.get("content_hash")
    problems = []
    if recorded_hash is not None and recorded_hash != table["content_hash"]:
        problems.append(Problem(CHECKSUMS_FILE, f"content hash {table['content_hash']} differs from "
                                f"{METADATA_FILE}'s {recorded_hash}"))
    problems += [Problem(rel, "missing") for rel in sorted(set(files) - set(disk))]
    problems += [Problem(rel, f"not in {CHECKSUMS_FILE} (added after writing)")
                 for rel in sorted(set(disk) - set(files))]
    same_size = []
    for rel in sorted(set(files) & set(disk)):
        if disk[rel] != files[rel][0]:
            problems.append(Problem(rel, size_change(disk[rel], files[rel][0])))
        else:
            same_size.append(rel)
    algorithm = table["algorithm"]
    for rel, found in sorted(checksum_files(ckpt, same_size, threads, algorithm).items()):
        if found != files[rel][1]:
            problems.append(Problem(rel, f"checksum mismatch: {algorithm} {found}, recorded {files[rel][1]}"))
    return problems


def verify(path: str | os.PathLike, *, threads: int = THREADS, meta: dict | None = None,
           hash_unverified: bool = True) -> Report:
    """Checks the pe_jax checkpoint at `path` without loading a model: every file's size and checksum
    against checksums.json, the files present, and each `.zarray` against pe_jax.json's params. Never raises
    for what it finds (see `Report.problems`); reads only. A checkpoint without checksums.json gets its
    structure checked and (`hash_unverified`) its content hash computed from the files."""
    ckpt = os.fspath(path)
    report = Report(ckpt, verified=os.path.exists(os.path.join(ckpt, CHECKSUMS_FILE)), content_hash=None)
    problems = []
    try:
        before = fingerprint(ckpt)
        meta = meta if meta is not None else read_json(ckpt, METADATA_FILE)
        if not isinstance(meta, dict):
            raise CheckpointIntegrityError(Problem(METADATA_FILE, "not a JSON object"))
        nan = meta.get("non_finite")
        report.non_finite = [str(k) for k in nan] if isinstance(nan, list) else []
        disk = state_files(ckpt)
        if not disk:
            raise CheckpointIntegrityError(Problem(STATE_DIR, "missing or empty"))
        report.files, report.bytes = len(disk), sum(disk.values())
        problems += structure_problems(ckpt, meta, disk)
        if report.verified:
            table = read_checksums(ckpt)
            report.content_hash = table["content_hash"]
            problems += _checksum_problems(ckpt, table, meta, disk, threads)
        elif hash_unverified and not problems:
            sums = checksum_files(ckpt, disk, threads)
            report.content_hash = content_hash_of({rel: [disk[rel], sums[rel]] for rel in disk})
    except CheckpointIntegrityError as e:
        problems.append(e.args[0])
    except OSError as e:  # a file vanished or turned unreadable while being checked
        problems.append(Problem(os.path.relpath(e.filename or ckpt, ckpt), f"unreadable ({e.strerror})"))
    first = {}
    for p in problems:  # one problem per file: the first found
        first.setdefault(p.file, p)
    report.problems = list(first.values())
    if report.ok and report.content_hash:
        _verified[os.path.abspath(ckpt)] = (before, report.content_hash)
    return report


def check(path: str | os.PathLike, meta: dict | None = None, *, threads: int = THREADS) -> Report:
    """`verify`, raising one CheckpointIntegrityError for what it finds; a checkpoint written before
    checksums passes its structure check with a one-line warning that its weights are unverified."""
    report = verify(path, threads=threads, meta=meta, hash_unverified=False).raise_if_bad()
    if not report.verified:
        log.warning("%s has no %s (written before pe_jax checksummed checkpoints): its weights are not "
                    "verified; rewrite it with pe-jax convert or pe_jax.save to verify them", path, CHECKSUMS_FILE)
    return report


def describe(path: str | os.PathLike) -> str:
    """What `pe-jax verify` prints: the summary of `verify` (a PyTorch file: its content hash). A damaged
    checkpoint raises CheckpointIntegrityError listing every problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NotFound(f"checkpoint not found: {path}")
    if not is_pe_jax_checkpoint(path):  # no checksums to check: name its bytes
        return f"{path}: a PyTorch file, no checksums to verify; content hash {content_hash(path)}"
    report = verify(path)
    if not report.ok:
        raise CheckpointIntegrityError(report.summary())
    return report.summary()


def start_check(path: str | os.PathLike, meta: dict | None = None) -> concurrent.futures.Future:
    """`check` on a background thread (hashing releases the GIL): a loader builds its model skeleton meanwhile
    and waits on the result before reading anything."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pe_jax-verify")
    try:
        return pool.submit(check, path, meta)
    finally:
        pool.shutdown(wait=False)


def verified_fingerprint(ckpt: str | os.PathLike) -> tuple | None:
    """The `fingerprint` of `ckpt` when it last verified (or was trusted) in this process, or None."""
    seen = _verified.get(os.path.abspath(os.fspath(ckpt)))
    return seen[0] if seen else None


def trust(ckpt: str | os.PathLike) -> str | None:
    """For a load with verification off (`verify=False`, `--no-verify`, PE_JAX_VERIFY=0): the content hash its
    checksums.json records (the table checked against its own hash; no file is hashed), remembered as
    `content_hash`'s answer while no file changes; None for a checkpoint without checksums."""
    ckpt = os.fspath(ckpt)
    if not os.path.exists(os.path.join(ckpt, CHECKSUMS_FILE)):
        return None
    before = fingerprint(ckpt)
    digest = read_checksums(ckpt)["content_hash"]
    _verified[os.path.abspath(ckpt)] = (before, digest)
    return digest


def content_hash(path: str | os.PathLike, *, meta: dict | None = None) -> str:
    """The content hash naming the weights at `path`: for a pe_jax checkpoint the one in checksums.json,
    after verifying it (computed the same way from the files for a checkpoint written before checksums);
    for a PyTorch file "sha256:" and the sha256 of its bytes (a sharded index: of the index, then its shards:
    the converter's `source_sha256`). Raises CheckpointIntegrityError for a damaged checkpoint.

    A checkpoint verified earlier in this process (say by loading it) is not hashed again while none of its
    files changed (same sizes, modification times and inodes). `meta`: a pe_jax checkpoint's pe_jax.json as
    the caller read it (pe_jax.pretrained.resolve_model), not read again."""
    from pe_jax.checkpoints.readers import ShardedSafetensorsDict, check_checkpoint_file, resolve

    path = resolve(path)  # a URL: its local copy
    if is_pe_jax_checkpoint(path):  # verified once per process while no file changes (a load verifies it too)
        seen = _verified.get(os.path.abspath(path))
        if seen is not None and seen[0] == fingerprint(path):
            return seen[1]
        return verify(path, meta=meta).raise_if_bad().content_hash
    check_checkpoint_file(path)
    files = ShardedSafetensorsDict(path).files() if path.endswith(".index.json") else [path]
    return f"sha256:{sha256_of_files(files)}"
