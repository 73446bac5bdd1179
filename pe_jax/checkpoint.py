"""Checkpoints by path: pe_jax Orbax directories, and PyTorch files in any of the three namings.

A pe_jax checkpoint is a directory holding `pe_jax.json` (preset, full config, source, dtype, parameter
shapes, pe_jax version) and `state/`, an Orbax PyTree checkpoint of the parameters in the model's own
(stacked-layer) layout, keyed by parameter path.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from pe_jax.config import config_from_dict

if TYPE_CHECKING:
    import jax

# jax, flax and the model are imported inside the functions that use them: conversion (write_state_chunks)
# runs without them (importing them took ~1.5 s, half of an L/14 conversion).

METADATA_FILE = "pe_jax.json"
STATE_DIR = "state"
CHUNK_BYTES = 64 << 20  # zarr chunk size: bounds the memory of writing one parameter
SLAB_BYTES = 1 << 20  # write_state_chunks fills a chunk this much at a time
WRITE_BYTES = 1 << 17  # ...in write() calls this large: larger made the kernel copy slower, erratically (to 2x)


def is_pe_jax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


def read_metadata(path: str | os.PathLike) -> dict:
    try:
        with open(os.path.join(os.fspath(path), METADATA_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a pe_jax checkpoint ({e})") from None


def model_from_metadata(meta: dict, **overrides):
    """An abstract (`nnx.eval_shape`) model of the checkpoint's class and config."""
    import dataclasses

    from flax import nnx

    from pe_jax.modeling import CLIP, TextTransformer, VisionTransformer

    cfg = config_from_dict(meta["config"])
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cls = {"CLIPConfig": CLIP, "VisionConfig": VisionTransformer, "TextConfig": TextTransformer}[meta["config"]["type"]]
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def checkpointer():
    """An Orbax PyTree checkpointer that streams: no defensive host copy, no compression, no OCDBT.

    Orbax deep-copies host arrays before an async write by default, its zstd encoder and the OCDBT
    writer hold about the written bytes in anonymous memory until the save ends; for a memory-mapped
    9 GB G/14 each is the whole model in RAM. Our writes are synchronous, float weights barely compress,
    and plain zarr chunks (see CHUNK_BYTES) go to disk as they are encoded.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as registry
    from orbax.checkpoint._src.serialization import type_handlers

    handlers = [(t, h) for t, h in registry._DEFAULT_TYPE_HANDLERS if t is not np.ndarray]
    handlers.append((np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    reg = registry.create_type_handler_registry(*handlers)
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=reg, use_compression=False,
                                                        use_ocdbt=False))


def params_metadata(params: Mapping[tuple[str, ...], object]) -> dict:
    """{dotted path: [shape, dtype]} of arrays or ShapeDtypeStructs."""
    return {".".join(p): [list(a.shape), str(a.dtype)] for p, a in params.items()}


def write_state(path: str | os.PathLike, params: Mapping[tuple[str, ...], object]):
    """Writes {parameter path: array} as an Orbax checkpoint at `path` (which must not exist)."""
    import orbax.checkpoint as ocp

    tree = {".".join(p): a for p, a in params.items()}
    save_args = {k: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in tree}
    checkpointer().save(os.path.abspath(os.fspath(path)), args=ocp.args.PyTreeSave(tree, save_args=save_args))


def chunk_shape(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The zarr chunks Orbax writes for an unsharded array in `write_state` (its choose_chunk_shape with
    CHUNK_BYTES): the largest axis is cut to its next smaller divisor until a chunk fits."""
    full = [max(1, n) for n in shape]
    chunk = list(full)
    while math.prod(chunk) > CHUNK_BYTES // np.dtype(dtype).itemsize:
        i = chunk.index(max(chunk))
        chunk[i] = max(d for d in range(1, chunk[i]) if full[i] % d == 0)
    return tuple(chunk)


def write_state_chunks(path: str | os.PathLike, shapes: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
                       fill: Callable[[tuple[str, ...], tuple[slice, ...], np.ndarray], object], *, workers: int = 2):
    """Writes the checkpoint `write_state` would write for arrays of `shapes`, without any array existing:
    `fill(param path, index, out)` puts the values of param[index] (a slab of one zarr chunk) into `out`.

    The files are the bytes Orbax writes (zarr v2 chunks of `chunk_shape`, no compression, no OCDBT, its
    _METADATA; tests compare them), but each chunk is assembled in a small reused per-thread buffer and
    written as it fills, on `workers` threads. Nothing is fsynced (like cp; Orbax's tensorstore fsyncs each
    chunk); the caller renames the finished directory into place.
    """
    path = os.path.abspath(os.fspath(path))
    init_ns = time.time_ns()
    os.mkdir(path)
    tasks = []
    for p, sds in shapes.items():
        folder, dtype, chunks = os.path.join(path, ".".join(p)), np.dtype(sds.dtype), chunk_shape(sds.shape, sds.dtype)
        os.mkdir(folder)
        zarray = {"chunks": list(chunks), "compressor": None, "dimension_separator": ".",
                  "dtype": "bfloat16" if dtype.name == "bfloat16" else dtype.str, "fill_value": None,
                  "filters": None, "order": "C", "shape": list(sds.shape), "zarr_format": 2}
        _write_json(os.path.join(folder, ".zarray"), zarray, separators=(",", ":"))
        for grid in itertools.product(*(range(n // c) for n, c in zip(sds.shape, chunks, strict=True))):
            index = tuple(slice(g * c, (g + 1) * c) for g, c in zip(grid, chunks, strict=True))
            tasks.append((p, index, chunks, dtype, os.path.join(folder, ".".join(map(str, grid)) or "0")))
    local = threading.local()

    def write(task):
        p, index, chunks, dtype, file = task
        with open(file, "wb", buffering=0) as f:
            for slab in _slabs(index, dtype.itemsize):
                shape = tuple(s.stop - s.start for s in slab)
                nbytes = math.prod(shape) * dtype.itemsize
                if len(getattr(local, "buffer", b"")) < nbytes:
                    local.buffer = np.empty(nbytes, np.uint8)
                raw = local.buffer[:nbytes]
                fill(p, slab, raw.view(dtype).reshape(shape))
                for lo in range(0, nbytes, WRITE_BYTES):
                    f.write(raw[lo: lo + WRITE_BYTES])

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(write, tasks):  # an error (or Ctrl-C) here cancels the chunks not started
            pass
    _write_json(os.path.join(path, "_METADATA"), {
        "tree_metadata": {str((k,)): {"key_metadata": [{"key": k, "key_type": 2}],
                                      "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                          for k in sorted(".".join(p) for p in shapes)},
        "use_ocdbt": False, "use_zarr3": False, "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
    _write_json(os.path.join(path, "_CHECKPOINT_METADATA"), {
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": init_ns,
        "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}})
    with open(os.path.join(path, "commit_success.txt"), "w") as f:
        f.write(f"Checkpoint commit was successful to {path}")


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


def _write_json(file: str, obj, **kwargs):
    with open(file, "w") as f:
        json.dump(obj, f, **kwargs)


def restore_params(model, path: str | os.PathLike, shardings: Mapping | None = None):
    """`model` filled from the pe_jax checkpoint at `path`; each parameter restored straight into its
    sharding (`shardings[path]`, default: the first local device) in the model's dtype."""
    import jax
    import orbax.checkpoint as ocp

    from pe_jax.weights import CheckpointMismatchError, _param_shapes, replace_params

    path = os.fspath(path)
    meta = read_metadata(path)
    shapes = _param_shapes(model)
    stored = meta.get("params", {})
    problems = []
    for p, sds in shapes.items():
        key = ".".join(p)
        if key not in stored:
            problems.append(f"  missing: {key} {tuple(sds.shape)}")
        elif tuple(stored[key][0]) != tuple(sds.shape):
            problems.append(f"  {key}: model expects {tuple(sds.shape)}, checkpoint holds {tuple(stored[key][0])}")
    extra = sorted(set(stored) - {".".join(p) for p in shapes})
    problems += [f"  unexpected: {k}" for k in extra]
    if problems:
        raise CheckpointMismatchError(
            f"{path} ({meta.get('preset')}) does not match {type(model).__name__}:\n" + "\n".join(problems))
    device = jax.local_devices()[0]
    target, restore_args = {}, {}
    for p, sds in shapes.items():
        sharding = (shardings or {}).get(p) or jax.sharding.SingleDeviceSharding(device)
        key = ".".join(p)
        target[key] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)
        restore_args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=sds.shape, dtype=sds.dtype)
    restored = checkpointer().restore(os.path.abspath(os.path.join(path, STATE_DIR)),
                                      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    return replace_params(model, {p: restored[".".join(p)] for p in shapes})


def load(model, checkpoint, shardings: Mapping | None = None):
    """Returns `model` (typically an `nnx.eval_shape` skeleton) filled from `checkpoint`: a pe_jax
    checkpoint directory, a PyTorch file (.safetensors, sharded index, .pt, hf://...) or an in-memory
    state dict (a mapping of key -> array). With `shardings` ({path: Sharding}) each parameter goes
    straight to its devices: Orbax restores each shard where it lives; a PyTorch file passes through the
    host one parameter at a time."""
    import jax

    from pe_jax.weights import load_torch_state_dict

    if not isinstance(checkpoint, Mapping) and is_pe_jax_checkpoint(checkpoint):
        return restore_params(model, checkpoint, shardings)
    if not isinstance(checkpoint, Mapping):
        from pe_jax.convert.readers import open_state_dict

        checkpoint = open_state_dict(checkpoint)
    place = (lambda path, a: jax.device_put(a, shardings[path])) if shardings else None
    return load_torch_state_dict(model, checkpoint, on_param=place)


def save(model, path: str | os.PathLike, *, preset: str | None = None, extra: dict | None = None):
    """Writes `model` (sharded or not) as a pe_jax checkpoint directory `path`, which must not exist.

    Every process of a multi-host job calls this; Orbax writes each shard from where it lives.
    """
    import jax

    import pe_jax
    from pe_jax.config import config_to_dict
    from pe_jax.weights import _param_shapes

    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists")
    params = nnx_flat_params(model)
    write_state(os.path.join(path, STATE_DIR), params)
    meta = {"preset": preset, "config": config_to_dict(model.config), "pe_jax_version": pe_jax.__version__,
            "dtype": str(next(iter(params.values())).dtype), "params": params_metadata(_param_shapes(model)),
            **(extra or {})}
    if jax.process_index() == 0:
        with open(os.path.join(path, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def nnx_flat_params(model) -> dict[tuple[str, ...], jax.Array]:
    from flax import nnx

    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_model(checkpoint: str | os.PathLike, *, model: str | None = None, mesh=None, strategy: str = "fsdp"):
    """The model a checkpoint holds: a pe_jax checkpoint directory builds its own class and config; a
    PyTorch file needs `model`, a preset name (a CLIP preset builds a CLIP, others a vision tower)."""
    from pe_jax import sharding as sh
    from pe_jax.config import TEXT_PRESETS
    from pe_jax.modeling import CLIP, VisionTransformer

    if is_pe_jax_checkpoint(checkpoint):
        skeleton = model_from_metadata(read_metadata(checkpoint))
        shardings = sh.param_shardings(skeleton, mesh, strategy) if mesh is not None else None
        return restore_params(skeleton, checkpoint, shardings)
    if model is None:
        raise ValueError(f"{checkpoint} is not a pe_jax checkpoint: name its preset (model=...)")
    cls = CLIP if model in TEXT_PRESETS else VisionTransformer
    return cls.from_config(model, checkpoint=checkpoint, mesh=mesh, strategy=strategy)
