"""pe_jax checkpoints on disk: Orbax directories of a model's parameters, with metadata.

A pe_jax checkpoint is a directory holding `pe_jax.json` (preset, full config, source, dtype, parameter
shapes, pe_jax version) and `state/`, an Orbax PyTree checkpoint of the parameters in the model's own
(stacked-layer) layout, keyed by parameter path, and `checksums.json` (every state file's checksum and the
content hash; see pe_jax.checkpoints.verify, which loading runs first).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from pe_jax.checkpoints import verify as checksums
from pe_jax.checkpoints.verify import CHECKSUMS_FILE, METADATA_FILE, STATE_DIR, is_pe_jax_checkpoint  # noqa: F401
from pe_jax.errors import AlreadyExists, InputError
from pe_jax.storage.atomic import write_json

if TYPE_CHECKING:
    pass

# jax, flax and orbax are imported inside the functions that use them: conversion (pe_jax.convert, which writes
# these files itself and shares the constants below) runs without them (importing them took ~1.5 s, half of
# an L/14 conversion).

CHUNK_BYTES = 64 << 20  # zarr chunk size: bounds the memory of writing one parameter


def read_metadata(path: str | os.PathLike) -> dict:
    from pe_jax.storage.files import read_capped

    try:  # capped, a regular file only: a FIFO named pe_jax.json blocked the load forever
        return json.loads(read_capped(os.path.join(os.fspath(path), METADATA_FILE)))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a pe_jax checkpoint ({e})") from None


def checkpointer():
    """An Orbax PyTree checkpointer that streams: no defensive host copy, no compression, no OCDBT.

    Orbax deep-copies host arrays before an async write by default, its zstd encoder and the OCDBT
    writer hold about the written bytes in anonymous memory until the save ends; for a memory-mapped
    9 GB G/14 each is the whole model in RAM. Our writes are synchronous, float weights barely compress,
    and plain zarr chunks (see CHUNK_BYTES) go to disk as they are encoded.
    """
    import jax
    import orbax.checkpoint as ocp

    reg = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
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


def restore_params(model, path: str | os.PathLike, shardings: Mapping | None = None, *,
                   verify: bool | None | concurrent.futures.Future = None, meta: dict | None = None):
    """`model` filled from the pe_jax checkpoint at `path`; each parameter restored straight into its
    sharding (`shardings[path]`, default: the first local device) in the model's dtype.

    `verify` (default: yes, unless PE_JAX_VERIFY=0) checks every file's size and checksum and each `.zarray`
    before Orbax reads anything (see pe_jax.checkpoints.verify): damage is one CheckpointIntegrityError. A
    Future (verify.start_check, started by the caller) is waited on instead. `meta`: pe_jax.json as the
    caller read it (pe_jax.pretrained.resolve_model), else read here."""
    import jax
    import orbax.checkpoint as ocp

    from pe_jax.checkpoints.params import CheckpointMismatchError, param_shapes, replace_params

    path = os.fspath(path)
    meta = read_metadata(path) if meta is None else meta
    shapes = param_shapes(model)
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
    start, recorded = checksums.fingerprint(path), True
    if isinstance(verify, concurrent.futures.Future):  # started by the caller (load_model) while it built `model`
        verify.result()
    elif checksums.verify_by_default() if verify is None else verify:
        checksums.check(path, meta)
    else:  # trusted storage: the weights are named by their recorded hash, nothing is hashed (embed's manifest)
        recorded = checksums.trust(path) is not None
    device = jax.local_devices()[0]
    target, restore_args = {}, {}
    for p, sds in shapes.items():
        sharding = (shardings or {}).get(p) or jax.sharding.SingleDeviceSharding(device)
        key = ".".join(p)
        target[key] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)
        restore_args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=sds.shape, dtype=sds.dtype)
    warn_non_finite(path, meta)
    restored = checkpointer().restore(os.path.abspath(os.path.join(path, STATE_DIR)),
                                      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    # One consistent snapshot: the files verified (or whose recorded hash names them) are the files read.
    checked = checksums.verified_fingerprint(path) if recorded else None
    if checksums.fingerprint(path) != start or checked not in (None, start):
        raise checksums.CheckpointIntegrityError(f"{path} changed while it was being loaded (replaced by another "
                                                 "process, e.g. pe-jax convert --force?); load it again")
    return replace_params(model, {p: restored[".".join(p)] for p in shapes})


def warn_non_finite(path: str, meta: dict) -> list[str]:
    """The parameters pe_jax.json records as holding NaN or Inf (`pe-jax convert --allow-non-finite`), warned
    about in one line; a load does not refuse them (they were converted on purpose) nor scan the weights.

    Args:
        path: the checkpoint, for the message.
        meta: its pe_jax.json.

    Example:
        >>> warn_non_finite("ckpt/", {"non_finite": []})
        []
    """
    bad = meta.get("non_finite") or []
    if bad:
        logging.getLogger("pe_jax").warning(
            "%s holds NaN or Inf in %d parameters (%s%s; converted with --allow-non-finite): its embeddings may be "
            "NaN (such rows are recorded as failures)", path, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5
            else "")
    return list(bad)


def save(model, path: str | os.PathLike, *, preset: str | None = None, extra: dict | None = None):
    """Writes `model` (sharded or not) as a pe_jax checkpoint directory `path`, which must not exist.

    Every process of a multi-host job calls this; Orbax writes each shard from where it lives, then process 0
    writes checksums.json (every file's checksum, the content hash) and pe_jax.json. On other processes the
    returned metadata lacks the content hash.

    Args:
        model: the model to write.
        path: the new checkpoint directory.
        preset: the preset name recorded in pe_jax.json (what `load_model` reports and checks).
        extra: more fields for pe_jax.json (a finetuning run records its config).

    Example:
        >>> import os, tempfile
        >>> from pe_jax import VisionTransformer, load_model
        >>> model = VisionTransformer.from_config("PE-Core-T16-384", layers=1, image_size=32)
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save(model, path, preset="PE-Core-T16-384")["preset"]
        'PE-Core-T16-384'
        >>> sorted(os.listdir(path)), load_model(path).config.layers
        (['checksums.json', 'pe_jax.json', 'state'], 1)
    """
    import jax

    import pe_jax
    from pe_jax.checkpoints.params import flat_params, param_shapes
    from pe_jax.config import config_to_dict
    from pe_jax.distributed import barrier

    path = os.path.abspath(os.fspath(path))
    barrier("pe_jax_save_check")  # every process looks before any process writes
    if os.path.lexists(path):
        raise AlreadyExists(f"{path} exists")
    barrier("pe_jax_save_start")
    params = flat_params(model)
    write_state(os.path.join(path, STATE_DIR), params)
    meta = {"preset": preset, "config": config_to_dict(model.config), "pe_jax_version": pe_jax.__version__,
            "dtype": str(next(iter(params.values())).dtype), "params": params_metadata(param_shapes(model)),
            **(extra or {})}
    barrier("pe_jax_save_written")  # every process's shards are on disk before process 0 hashes them
    if jax.process_index() == 0:
        meta["content_hash"] = checksums.write_checksums(path)
        write_json(os.path.join(path, METADATA_FILE), meta, indent=1)
    barrier("pe_jax_save_done")
    return meta
