"""Opening PyTorch checkpoint files as lazy, memory-mapped state dicts (no torch needed).

Every reader is a read-only Mapping of key -> numpy array whose tensors are read (paged in from the
file) only when asked for, with `shape_of(key)` answering from the header alone.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterator, Mapping

import numpy as np

from pe_jax import storage
from pe_jax.errors import InputError, NotFound, install_hint
from pe_jax.storage import files

HF_PREFIX = "hf://"
# numpy dtypes of safetensors dtypes, read as views of the mapped file; others go through safetensors (a copy).
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                      "U8": "u1", "BOOL": "?"}
# ...and those numpy knows only through ml_dtypes (imported on first use: ~1 s). PerceptionLM ships bfloat16.
ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Files tried, in order, when an hf:// reference names no file: open_clip, timm, then the original .pt.
HF_DEFAULT_FILES = ("open_clip_model.safetensors", "model.safetensors", "{repo}.pt")
CHECKPOINT_FILES = "a .safetensors file, a *.safetensors.index.json or a torch .pt file"


def check_checkpoint_file(path: str, index: str | None = None) -> None:
    """Refuses, before anything opens it, a `path` that is missing or not a regular file (the one check,
    storage.files.check_regular_file, with a checkpoint's messages). `index` is the safetensors index that names
    `path` as a shard, for the messages."""
    where = f"{index}: shard {path}" if index else path
    files.check_regular_file(path, where=where, missing=None if index else f"checkpoint not found: {path}",
                             hint="an index's shards are safetensors files" if index else f"pass {CHECKPOINT_FILES}")


check_regular_file = check_checkpoint_file  # the former name


class SafetensorsDict(Mapping):
    """A memory-mapped safetensors file."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = os.fspath(path)
        check_checkpoint_file(self.path)
        try:
            self._file = safe_open(self.path, framework="numpy")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise InputError(f"{self.path}: not a readable safetensors file ({e})") from None
        # safe_open checked the header against the file; map the file so tensors are views, not copies.
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self._header = json.loads(f.read(size))
            self._start = 8 + size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def shape_of(self, key: str) -> tuple:
        return tuple(self._file.get_slice(key).get_shape())

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._header.get(key) if key != "__metadata__" else None
        dtype = _numpy_dtype(info["dtype"]) if info else None
        if dtype and math.prod(info["shape"]):
            count, offset = math.prod(info["shape"]), self._start + info["data_offsets"][0]
            return np.frombuffer(self._map, dtype, count, offset).reshape(info["shape"])
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise InputError(f"{self.path}: cannot read tensor {key!r} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _numpy_dtype(name: str):
    """The numpy dtype of safetensors dtype `name`, or None (then safetensors itself reads the tensor)."""
    if name in ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, ML_DTYPES[name]))
    return SAFETENSORS_DTYPES.get(name)


class ShardedSafetensorsDict(Mapping):
    """Safetensors shards listed by a `*.safetensors.index.json` weight map."""

    format = "safetensors (sharded)"

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        check_checkpoint_file(self.path)
        folder = os.path.dirname(self.path)
        weight_map = _weight_map(self.path)
        self._where = {key: os.path.join(folder, self._shard_name(name)) for key, name in weight_map.items()}
        paths = sorted(set(self._where.values()))
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise NotFound(f"{self.path}: shard(s) not found: {', '.join(missing)}")
        for path in paths:  # all of them before opening any
            check_checkpoint_file(path, index=self.path)
        self._shards = {p: SafetensorsDict(p) for p in paths}
        for key, shard in self._where.items():
            if key not in self._shards[shard]:
                raise InputError(f"{self.path}: {key!r} is mapped to {shard}, which does not hold it")

    def _shard_name(self, name: str) -> str:
        """`name` if it names a file inside the index's folder (no absolute path, no way up through ..). Names are
        checked as written, not resolved: the Hugging Face cache links each shard to a blob outside the folder."""
        parts = os.path.normpath(name).split(os.sep)
        if os.path.isabs(name) or parts[0] == os.pardir or "\0" in name:
            raise InputError(f"{self.path}: shard {name!r} lies outside the index's folder; an index may only name "
                             "files beside it (or below it)")
        return name

    def shape_of(self, key: str) -> tuple:
        return self._shards[self._where[key]].shape_of(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._shards[self._where[key]][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def files(self) -> list[str]:
        return [self.path, *self._shards]


def _weight_map(index_path: str) -> dict[str, str]:
    """The `weight_map` of a safetensors index: tensor name -> shard file name, checked to be just that."""
    try:  # capped, a regular file only (a FIFO blocked)
        index = json.loads(files.read_capped(index_path).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{index_path}: not a safetensors index (not readable JSON: {e})") from None
    if not isinstance(index, dict):
        raise InputError(f"{index_path}: not a safetensors index (a {type(index).__name__}, not a JSON object)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        found = "none" if weight_map is None else (
            "shard names that are not strings" if isinstance(weight_map, dict) else f"a {type(weight_map).__name__}")
        raise InputError(f"{index_path}: not a safetensors index: expected a weight_map object of tensor name -> "
                         f"shard file name, found {found}")
    if not weight_map:
        raise InputError(f"{index_path}: its weight_map names no tensors")
    return weight_map


class TorchFileDict(dict):
    """A torch.save file read without torch: a dict of memory-mapped numpy views."""

    format = "torch"

    def __init__(self, path: str | os.PathLike):
        from pe_jax.checkpoints.torch_pickle import load_torch_file

        self.path = os.fspath(path)
        super().__init__(load_torch_file(self.path))


def resolve(src: str | os.PathLike) -> str:
    """A local path for `src`: an object-store URL (s3://, gs://, https://) is copied into the cache
    (`pe_jax.storage.local_copy`), `hf://ORG/REPO[:FILE]` downloaded with huggingface_hub."""
    src = os.fspath(src)
    if storage.is_url(src):
        return storage.local_copy(src)
    if not src.startswith(HF_PREFIX):
        return src
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        hint = install_hint("hf", "huggingface_hub")
        raise InputError(f"{src}: hf:// references need huggingface_hub: {hint}") from None
    repo, _, filename = src[len(HF_PREFIX):].partition(":")
    if repo.count("/") != 1:
        raise InputError(f"{src}: expected hf://ORG/REPO[:FILE]")
    candidates = [filename] if filename else [f.format(repo=repo.split("/")[1]) for f in HF_DEFAULT_FILES]
    errors = []
    for name in candidates:
        try:
            return hf_hub_download(repo_id=repo, filename=name)
        except Exception as e:  # not found, offline, gated: try the next, report all
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise InputError(f"{src}: could not fetch a checkpoint:\n  " + "\n  ".join(errors))


def open_state_dict(src: str | os.PathLike) -> Mapping:
    """A lazy state dict for a checkpoint file (safetensors, sharded safetensors index, torch .pt)."""
    path = resolve(src)
    check_checkpoint_file(path)
    if path.endswith(".index.json"):
        return ShardedSafetensorsDict(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".safetensors"):
        return SafetensorsDict(path)
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return TorchFileDict(path)
    raise InputError(f"{path}: not a checkpoint (expected .safetensors, a safetensors index or a torch .pt file)")
