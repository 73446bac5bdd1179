"""Fixed-size batches over a mesh: the one batching of pe_jax (inference, embedding jobs, evaluations).

Every call of the jitted function sees the same batch shape (one compiled program): a short batch is padded
with zeros and its padding rows dropped from the result. With a mesh, batches are split over its data axes
and, when the mesh spans processes, every process gets the whole result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from pe_jax.errors import UsageError
from pe_jax.sharding import batch_sharding, data_parallel_size


def round_batch_size(batch_size: int, mesh=None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's data-parallel size."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    dp = data_parallel_size(mesh) if mesh is not None else 1
    return -(-batch_size // dp) * dp


def pad_rows(rows, size: int):
    """`rows` (a numpy array or a pytree of them, same leading size) padded with zeros to `size` rows."""
    def pad(a):
        a = np.asarray(a)
        if len(a) > size:
            raise ValueError(f"{len(a)} rows do not fit a batch of {size}")
        return a if len(a) == size else np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])

    return jax.tree.map(pad, rows)


def place(batch, mesh=None):
    """A host batch as a global array split over the mesh's data axes (every process passes the whole batch)."""
    if mesh is None:
        return batch
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        a.shape, batch_sharding(mesh, a.ndim), lambda index, a=a: a[index]), batch)


def apply_batches(fn: Callable, model, batches: Iterable, *, batch_size: int, mesh=None,
                  progress: Callable[[int], object] | None = None) -> Iterator[np.ndarray]:
    """Yields `fn(model, batch)[:valid]` for each host batch of at most `batch_size` rows (padded to it); an
    output that is a pytree of arrays (several features at once) is cut leaf by leaf.

    `batch_size` must already be a multiple of the data-parallel size (`round_batch_size`).
    """
    jitted = jax.jit(fn)
    for batch in batches:
        valid = len(jax.tree.leaves(batch)[0])
        # Traced under the mesh: a Pallas kernel (splash attention on TPU) maps itself over its shards.
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            out = jitted(model, place(pad_rows(batch, batch_size), mesh))
        if progress:
            progress(valid)
        yield jax.tree.map(lambda a, n=valid: _gathered(a)[:n], out)


def _gathered(out) -> np.ndarray:
    if not out.is_fully_addressable:  # a mesh spanning processes: every process gets the whole result
        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)


def run_batched(fn: Callable, model, inputs: np.ndarray, *, batch_size: int, mesh=None,
                progress: Callable[[int], object] | None = None) -> np.ndarray:
    """`fn(model, batch)` over the rows of `inputs` in fixed batches, concatenated in order.

    Every process passes the same `inputs` and gets the full result.
    """
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise UsageError("no inputs to run")
    size = round_batch_size(batch_size, mesh)
    chunks = (inputs[i:i + size] for i in range(0, len(inputs), size))
    return np.concatenate(list(apply_batches(fn, model, chunks, batch_size=size, mesh=mesh, progress=progress)))
