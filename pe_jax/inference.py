"""Batched, sharded inference: fixed-size batches (one compiled program per batch shape), the last one
padded, inputs split over the mesh's data axes, outputs returned in order and count."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from pe_jax.sharding import batch_sharding, data_parallel_size


def run_batched(fn: Callable, model, inputs: np.ndarray, *, batch_size: int, mesh=None,
                progress: Callable[[int], object] | None = None) -> np.ndarray:
    """`fn(model, batch)` over `inputs` in batches of `batch_size` rows, concatenated.

    `batch_size` is rounded up to a multiple of the data-parallel size; a short last batch is padded with
    zeros and its padding rows dropped, so every call has the same shape. Every process passes the same
    `inputs` and gets the full result.
    """
    inputs = np.asarray(inputs)
    dp = data_parallel_size(mesh) if mesh is not None else 1
    batch_size = -(-batch_size // dp) * dp
    jitted = jax.jit(fn)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
        if mesh is not None:
            sharding = batch_sharding(mesh, chunk.ndim)
            chunk = jax.make_array_from_callback(chunk.shape, sharding, lambda index, c=chunk: c[index])
        out = jitted(model, chunk)
        if not out.is_fully_addressable:  # a mesh spanning processes: every process gets the whole result
            out = multihost_utils.process_allgather(out, tiled=True)
        outputs.append(np.asarray(out)[:valid])
        if progress:
            progress(valid)
    if not outputs:
        raise ValueError("no inputs to run")
    return np.concatenate(outputs)
