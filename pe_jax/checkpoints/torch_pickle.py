"""Reading `torch.save` (zip format) checkpoints without torch, as memory-mapped numpy arrays.

`data.pkl` is unpickled by a restricted unpickler: only the globals torch writes to rebuild plain
tensors are admitted, and they resolve to inert tokens or to this module's own rebuild functions, so
a malicious pickle cannot call anything else. Tensor data is never copied: each storage is a view of
one read-only mmap of the file (torch stores zip members uncompressed and 64-byte aligned). The members
read whole (data.pkl, byteorder) are bounded before they are read: a deflated one could inflate to GBs.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, NamedTuple

import numpy as np

from pe_jax.errors import InputError, PeJaxError
from pe_jax.storage.files import check_regular_file

# The pickled int torch's legacy (pre-1.6, or _use_new_zipfile_serialization=False) format starts with.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LEGACY_STORAGES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16",
                    "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8",
                    "Bool": "bool", "ComplexFloat": "complex64", "ComplexDouble": "complex128"}
# Dtypes torch >= 2.1 writes as globals (with UntypedStorage and _rebuild_tensor_v3) for its newer types.
_TORCH_DTYPES = [*_LEGACY_STORAGES.values(), "uint16", "uint32", "uint64",
                 "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
# Most bytes read from data.pkl (~200 bytes a tensor: a few MB for the largest state dicts) and byteorder.
MAX_PICKLE_BYTES, MAX_METADATA_BYTES = 64 << 20, 4 << 10


class UnsafePickleError(PeJaxError, ValueError):
    """data.pkl names a global outside the tensor-rebuilding allowlist."""


class _DType(NamedTuple):  # what storage-type and dtype globals resolve to: immutable and not callable
    dtype: np.dtype


class _Storage(NamedTuple):  # a storage: a flat view of its zip record
    data: np.ndarray


class _Tensor(NamedTuple):  # wraps rebuilt arrays so pickle opcodes (BUILD) cannot reach them
    array: np.ndarray


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and the float8s: ml_dtypes, imported only then (~1 s, a third of an L/14 conversion)
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


# The dtype (by name, resolved when met) of each storage-type and dtype global torch pickles.
_TOKENS: dict[tuple[str, str], str] = {
    **{("torch", f"{k}Storage"): v for k, v in _LEGACY_STORAGES.items()},
    **{("torch", name): name for name in _TORCH_DTYPES},
    ("torch.storage", "UntypedStorage"): "uint8",
}


def _strided(data: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """The tensor (offset, size, stride) over `data`, checked to stay inside it (as_strided does not check)."""
    dims = [offset, *size, *stride]
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(v) is int and v >= 0 for v in dims)):
        raise InputError(f"bad tensor geometry: offset={offset!r} size={size!r} stride={stride!r}")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= data.size:
        raise InputError(f"tensor (offset={offset}, size={size}, stride={stride}) overruns its storage of "
                         f"{data.size} elements")
    strides = tuple(s * data.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(data[offset:], size, strides, writeable=False)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str, records: dict[str, np.ndarray], big_endian: bool):
        super().__init__(file)
        self.path, self.records, self.big_endian = path, records, big_endian
        self.storages: dict[str, _Storage] = {}
        # Bound methods: pickle's BUILD cannot setattr on them, so a pickle cannot alter them.
        self.functions = {
            ("torch._utils", "_rebuild_tensor"): self._tensor_v2,
            ("torch._utils", "_rebuild_tensor_v2"): self._tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,  # state_dict() and backward hooks
        }

    def find_class(self, module: str, name: str) -> Any:
        found = _TOKENS.get((module, name))
        found = _DType(_np_dtype(found)) if found else self.functions.get((module, name))
        if found is None:
            raise UnsafePickleError(f"{self.path}: refusing to load global {module}.{name}: only the globals "
                                    "torch uses to rebuild tensors are allowed")
        return found

    def _dtype(self, token: Any) -> np.dtype:
        if not isinstance(token, _DType):
            raise InputError(f"expected a storage type or dtype, got {token!r}")
        if not self.big_endian or token.dtype.itemsize == 1:
            return token.dtype
        swapped = token.dtype.newbyteorder(">")
        if swapped.kind != token.dtype.kind:  # ml_dtypes types have no byte-swapped form
            raise InputError(f"big-endian {token.dtype} checkpoints are unsupported")
        return swapped

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise InputError(f"unexpected persistent id {pid!r}")
        _, token, key, _location, numel = pid
        if key not in self.storages:
            dtype = self._dtype(token)
            record = self.records.get(key)
            if record is None:
                raise InputError(f"storage record data/{key} is missing")
            if type(numel) is not int or not 0 <= numel * dtype.itemsize <= record.size:
                raise InputError(f"storage data/{key}: {numel} x {dtype} does not fit its {record.size} bytes")
            self.storages[key] = _Storage(record[: numel * dtype.itemsize].view(dtype))
        return self.storages[key]

    def _tensor_v2(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                   requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise InputError(f"expected a storage, got {type(storage).__name__}")
        if metadata:  # conj/neg bits: a lazy view numpy cannot express
            raise InputError(f"tensors with metadata {metadata!r} are unsupported")
        return _Tensor(_strided(storage.data, offset, size, stride))

    def _tensor_v3(self, storage: _Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool,
                   hooks: Any, dtype: Any, metadata: Any = None) -> _Tensor:
        dt = self._dtype(dtype)
        if not isinstance(storage, _Storage) or storage.data.dtype != np.uint8:
            raise InputError("_rebuild_tensor_v3 expects an untyped storage")
        data = storage.data[: storage.data.size // dt.itemsize * dt.itemsize].view(dt)
        return self._tensor_v2(_Storage(data), offset, size, stride, metadata=metadata)

    def _parameter(self, data: _Tensor, requires_grad: bool, hooks: Any, state: Any = None) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise InputError(f"expected a tensor, got {type(data).__name__}")
        return data


def _records(path: str, zf: zipfile.ZipFile, prefix: str, mm: mmap.mmap) -> dict[str, np.ndarray]:
    """Storage key -> uint8 view of its zip member's bytes inside the mmap (never read into memory)."""
    out = {}
    for info in zf.infolist():
        if not info.filename.startswith(prefix + "data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise InputError(f"{path}: {info.filename} is compressed or encrypted; torch writes stored members")
        # The local header's name/extra lengths can differ from the central directory's (torch pads the extra
        # field to align data), so read them from the local header itself.
        head = mm[info.header_offset: info.header_offset + 30]
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > len(mm):
            raise InputError(f"{path}: {info.filename} runs past the end of the file")
        out[info.filename[len(prefix + "data/"):]] = np.frombuffer(mm, np.uint8, info.file_size, start)
    return out


def _read_member(path: str, zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Zip member `name`, refused unread if it is encrypted, compressed other than by deflate, or more than
    `limit` bytes uncompressed; read by its stated size, so a stream that inflates past it costs nothing."""
    info = zf.getinfo(name)
    if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(f"{path}: {name} is encrypted or compressed with zip method {info.compress_type}; "
                         "torch writes stored members: re-save the checkpoint with torch.save")
    if info.file_size > limit:
        raise InputError(f"{path}: {name} is {info.file_size} bytes uncompressed, more than the "
                         f"{_mib(limit)} a torch checkpoint's {name.rsplit('/', 1)[-1]} needs; refusing to read it")
    try:
        with zf.open(info) as f:
            return f.read(info.file_size)  # inflates at most this much at a time (read() would 2 GB)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise InputError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from None


def _is_big_endian(path: str, zf: zipfile.ZipFile, prefix: str) -> bool:
    if prefix + "byteorder" not in zf.namelist():  # torch < 1.10 writes none, and only little-endian
        return False
    return _read_member(path, zf, prefix + "byteorder", MAX_METADATA_BYTES).strip() == b"big"


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a `torch.save` zip checkpoint as read-only numpy views of a mmap of the file.

    Unwraps a top-level `state_dict` or `weights` entry, strips a leading `module.` from keys and drops
    entries that are not tensors (step counters, nested dicts, strings)."""
    path = os.fspath(path)
    check_regular_file(path)  # a FIFO would block open() below
    with open(path, "rb") as f:
        if f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC:
            raise InputError(f"{path}: the legacy torch format is unsupported; re-save it with torch.save() "
                             "(zip format, the default since torch 1.6)")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InputError(f"{path}: not a torch checkpoint (not a readable zip file: {e})") from None
        with zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise InputError(f"{path}: not a torch checkpoint (expected one <archive>/data.pkl, found {pkls})")
            prefix = pkls[0][: -len("data.pkl")]
            big_endian = _is_big_endian(path, zf, prefix)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            records = _records(path, zf, prefix, mm)
            pickled = io.BytesIO(_read_member(path, zf, pkls[0], MAX_PICKLE_BYTES))
            unpickler = _Unpickler(pickled, path, records, big_endian)
            try:
                obj = unpickler.load()
            except UnsafePickleError:
                raise
            except Exception as e:  # a malformed pickle can raise nearly anything; report it against the file
                raise InputError(f"{path}: cannot read {pkls[0]}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj.get("weights", obj))
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k.removeprefix("module."): v.array for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Tensor)}
