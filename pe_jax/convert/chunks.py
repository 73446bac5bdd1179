"""The converter's writer: an Orbax checkpoint written one zarr chunk at a time, without any array existing.

Each chunk is assembled from the memory-mapped source in slabs of about SLAB_BYTES and written as it
fills, in WRITE_BYTES calls, on a few threads. The files are the bytes Orbax writes (tests compare them);
the chunk layout and JSON conventions come from `pe_jax.checkpoints.orbax`, which never imports this tool.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from pe_jax.checkpoints.orbax import chunk_shape
from pe_jax.errors import InputError
from pe_jax.storage.atomic import write_json
from pe_jax.storage.hashing import checksum_of, new_checksum

SLAB_BYTES = 1 << 20  # a chunk is filled this much at a time
WRITE_BYTES = 1 << 17  # ...in write() calls this large: larger made the kernel copy slower, erratically (to 2x)


def write_state_chunks(path: str | os.PathLike, shapes: Mapping[tuple[str, ...], object],
                       fill: Callable[[tuple[str, ...], tuple[slice, ...], np.ndarray], object], *, workers: int = 2,
                       non_finite: set | None = None):
    """Writes the checkpoint `write_state` would write for arrays of `shapes`, without any array existing:
    `fill(param path, index, out)` puts the values of param[index] (a slab of one zarr chunk) into `out`.

    The files are the bytes Orbax writes (zarr v2 chunks of `chunk_shape`, no compression, no OCDBT, its
    _METADATA; tests compare them), but each chunk is assembled in a small reused per-thread buffer and
    written as it fills, on `workers` threads. Nothing is fsynced (like cp; Orbax's tensorstore fsyncs each
    chunk); the caller renames the finished directory into place.

    Returns {file relative to `path`'s parent ("state/..."): [size, checksum]}, each chunk's checksum computed
    from its slabs as they are written (nothing is read back): the table `verify.write_checksums` records.
    `non_finite`: a set that gets each parameter holding NaN or Inf (checked slab by slab in cache: ~30 GB/s).
    """
    path = os.path.abspath(os.fspath(path))
    init_ns = time.time_ns()
    os.mkdir(path)
    tasks, sums, top = [], {}, os.path.dirname(path)

    def record(file: str, data: bytes):
        sums[os.path.relpath(file, top)] = [len(data), checksum_of(data)]

    for p, sds in shapes.items():
        folder, dtype, chunks = os.path.join(path, ".".join(p)), np.dtype(sds.dtype), chunk_shape(sds.shape, sds.dtype)
        os.mkdir(folder)
        zarray = {"chunks": list(chunks), "compressor": None, "dimension_separator": ".",
                  "dtype": "bfloat16" if dtype.name == "bfloat16" else dtype.str, "fill_value": None,
                  "filters": None, "order": "C", "shape": list(sds.shape), "zarr_format": 2}
        zfile = os.path.join(folder, ".zarray")
        record(zfile, write_json(zfile, zarray, separators=(",", ":")))
        for grid in itertools.product(*(range(n // c) for n, c in zip(sds.shape, chunks, strict=True))):
            index = tuple(slice(g * c, (g + 1) * c) for g, c in zip(grid, chunks, strict=True))
            tasks.append((p, index, chunks, dtype, os.path.join(folder, ".".join(map(str, grid)) or "0")))
    local = threading.local()

    def write(task):
        p, index, chunks, dtype, file = task
        checksum, size = new_checksum(), 0
        with open(file, "wb", buffering=0) as f:
            for slab in _slabs(index, dtype.itemsize):
                shape = tuple(s.stop - s.start for s in slab)
                nbytes = math.prod(shape) * dtype.itemsize
                if len(getattr(local, "buffer", b"")) < nbytes:
                    local.buffer = np.empty(nbytes, np.uint8)
                raw = local.buffer[:nbytes]
                fill(p, slab, raw.view(dtype).reshape(shape))
                checksum.update(raw)  # while the slab is in the CPU cache
                if non_finite is not None and p not in non_finite and not all_finite(raw, dtype):
                    non_finite.add(p)
                size += nbytes
                for lo in range(0, nbytes, WRITE_BYTES):
                    f.write(raw[lo: lo + WRITE_BYTES])
        return os.path.relpath(file, top), [size, checksum.hexdigest()]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for rel, entry in pool.map(write, tasks):  # an error (or Ctrl-C) here cancels the chunks not started
            sums[rel] = entry
    _write_orbax_metadata(path, shapes, init_ns, record)
    return sums


def check_finite(src: str, plan, state_dict, non_finite: set, allow: bool):
    """Refuses (InputError, one line) weights that hold NaN or Inf unless `allow`, which warns: naming the
    source tensors that do (only the flagged parameters' tensors are read again).

    Args:
        src: the source, for the message.
        plan: the conversion's plan (pe_jax.checkpoints.naming.plan_for).
        state_dict: the source's tensors.
        non_finite: the parameters `write_state_chunks` found holding NaN or Inf.
        allow: convert them anyway (--allow-non-finite), with a warning.

    Example:
        >>> check_finite("model.safetensors", plan, state_dict, set(), False)  # doctest: +SKIP
    """
    if not non_finite:
        return
    keys = sorted({slot.torch_key for slot in plan.slots if slot.path in non_finite
                   and not np.isfinite(np.asarray(state_dict[plan.stored_keys[slot.torch_key]], np.float32)).all()})
    keys = keys or sorted(".".join(p) for p in non_finite)  # finite in the source, not once cast
    shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    if not allow:
        raise InputError(f"{src}: {len(keys)} tensors hold NaN or Inf ({shown}); nothing was written. A model "
                         "with them embeds NaN rows: pass --allow-non-finite to convert it anyway")
    logging.getLogger(__name__).warning("%s: %d tensors hold NaN or Inf (%s); converted as asked "
                                        "(--allow-non-finite), recorded in pe_jax.json", src, len(keys), shown)


def all_finite(raw: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the bytes `raw`, read as `dtype`, hold no NaN or Inf (integers always do). bfloat16 (no numpy
    kind 'f', and a slow isfinite) is read as its bits: NaN and Inf are the values with every exponent bit set.

    Args:
        raw: a uint8 buffer of whole `dtype` values.
        dtype: their dtype (float16/32/64, bfloat16, or an integer type).

    Example:
        >>> all_finite(np.array([1.0, np.inf], np.float32).view(np.uint8), np.dtype(np.float32))
        False
    """
    if dtype.kind == "f":
        return bool(np.isfinite(raw.view(dtype)).all())
    if dtype.name == "bfloat16":
        return not (raw.view(np.uint16) & 0x7F80 == 0x7F80).any()
    return True


def _write_orbax_metadata(path: str, shapes: Mapping[tuple[str, ...], object], init_ns: int, record):
    """The files beside the chunks that make the folder an Orbax checkpoint, the commit marker last."""
    record(os.path.join(path, "_METADATA"), write_json(os.path.join(path, "_METADATA"), {
        "tree_metadata": {str((k,)): {"key_metadata": [{"key": k, "key_type": 2}],
                                      "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                          for k in sorted(".".join(p) for p in shapes)},
        "use_ocdbt": False, "use_zarr3": False, "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
    record(os.path.join(path, "_CHECKPOINT_METADATA"), write_json(os.path.join(path, "_CHECKPOINT_METADATA"), {
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": init_ns,
        "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
    commit = f"Checkpoint commit was successful to {path}".encode()
    with open(os.path.join(path, "commit_success.txt"), "wb") as f:
        f.write(commit)
    record(os.path.join(path, "commit_success.txt"), commit)


def _slabs(index: tuple[slice, ...], itemsize: int) -> list[tuple[slice, ...]]:
    """`index` cut into slabs of about SLAB_BYTES, each a contiguous run of the chunk file (leading axes
    taken one at a time while a step along them is larger than a slab). Filled and written one at a time,
    the kernel copies bytes still in the CPU cache: 2-4x faster than out of a buffer of megabytes."""
    if not index:  # a scalar
        return [index]
    first, rest = index[0], index[1:]
    row_bytes = math.prod(s.stop - s.start for s in rest) * itemsize
    if row_bytes > SLAB_BYTES and rest:
        return [(slice(i, i + 1), *slab) for i in range(first.start, first.stop) for slab in _slabs(rest, itemsize)]
    step = max(1, SLAB_BYTES // row_bytes)
    return [(slice(lo, min(lo + step, first.stop)), *rest) for lo in range(first.start, first.stop, step)]
