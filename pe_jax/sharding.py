"""Meshes and the rules that map the model's logical axes onto them.

The model names its parameter axes (`embed`, `mlp`, `heads`, `head_dim`, `vocab`, `proj`, `layers`); a
strategy's rules table says which mesh axis each logical axis may be sharded over. For each mesh axis the
largest divisible dimension among the eligible ones is sharded (big_vision's FSDP tactic), so one table
covers every parameter shape, and the optimizer state that mirrors them. Mesh axes are Auto: GSPMD
propagates shardings through the unchanged model code.

Strategies:
  * ``dp``: weights replicated, batch split over every device.
  * ``fsdp``: weights split over the `fsdp` axis on their largest divisible dimension.
  * ``fsdp_tp``: FSDP over `fsdp` plus Megatron-style tensor parallelism over `model` (attention heads,
    MLP hidden units, vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pe_jax.config import MESH_AXES, check_mesh, parse_mesh  # noqa: F401 (public here too)
from pe_jax.errors import UsageError

# The batch is split over every axis that does not split the weights' math: data and fsdp.
BATCH_AXES = ("data", "fsdp")

# strategy -> {logical axis: mesh axes it may be sharded over, in order of preference}
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "dp": {},
    "fsdp": {"embed": ("fsdp",), "mlp": ("fsdp",), "vocab": ("fsdp",), "heads": ("fsdp",), "proj": ("fsdp",)},
    "fsdp_tp": {"heads": ("model",), "mlp": ("model",), "vocab": ("model",),
                "embed": ("fsdp",), "proj": ("fsdp",)},
}
STRATEGIES = tuple(RULES)


def make_mesh(axes: Mapping[str, int] | str | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes data, fsdp, model (Auto axis types).

    `axes` gives sizes, as a dict or a string "fsdp=4,model=2"; one size may be -1 (the rest of the
    devices); unnamed axes have size 1, except that with no sizes at all every device goes to `data`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(axes) if isinstance(axes, str) else check_mesh(dict(axes or {"data": -1}))
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise UsageError(f"mesh {sizes} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices) or min(shape) < 1:
        raise UsageError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


MAX_FAKE_DEVICES = 2048  # XLA:CPU refused 3000 fake devices ("Multiprocess computations"); 100000 never ended


def fake_device_count(text: str, sizes: dict[str, int]) -> int:
    """The fake CPU devices the mesh `text` (parsed: `sizes`) needs: UsageError beyond MAX_FAKE_DEVICES.

    Args:
        text: the mesh as given (named in the message).
        sizes: its axis sizes (`parse_mesh`), all >= 1.

    Example:
        >>> fake_device_count("fsdp=4,model=2", {"fsdp": 4, "model": 2})
        8
    """
    devices = math.prod(sizes.values())
    if devices > MAX_FAKE_DEVICES:
        raise UsageError(f"mesh {text} needs {devices} devices; plan makes at most {MAX_FAKE_DEVICES} fake CPU "
                         "devices: name a --target (its compile-only chips) to plan a larger mesh")
    return devices


def check_strategy(strategy: str):
    if strategy not in RULES:
        raise UsageError(f"unknown sharding strategy {strategy!r}; use one of {STRATEGIES}")


def partition_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, strategy: str) -> PartitionSpec:
    """The mesh PartitionSpec of one array, from its logical axis names and shape."""
    check_strategy(strategy)
    rules = RULES[strategy]
    spec: list[str | None] = [None] * len(shape)
    for mesh_axis in MESH_AXES:
        size = mesh.shape[mesh_axis]
        if size == 1:
            continue
        eligible = [i for i, name in enumerate(logical)
                    if spec[i] is None and mesh_axis in rules.get(name, ()) and shape[i] % size == 0]
        if eligible:
            spec[max(eligible, key=lambda i: shape[i])] = mesh_axis
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, strategy: str) -> NamedSharding:
    names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, partition_spec(names, variable.shape, mesh, strategy))


def state_shardings(state: nnx.State, mesh: Mesh, strategy: str):
    """NamedShardings for every leaf of an (abstract or concrete) nnx State, from its logical axes."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, strategy), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(model, mesh: Mesh, strategy: str) -> dict[tuple[str, ...], NamedSharding]:
    """{parameter path: NamedSharding} for a model (abstract or concrete)."""
    return {path: variable_sharding(v, mesh, strategy) for path, v in nnx.to_flat_state(nnx.state(model))}


def abstract_sharded(node, mesh: Mesh, strategy: str):
    """(graphdef, state of ShapeDtypeStructs carrying their shardings) of an abstract nnx graph node, for
    compiling without allocating."""
    graphdef, state = nnx.split(node)
    return graphdef, jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=variable_sharding(
        v, mesh, strategy)), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Activations: the batch over the data axes, attention heads over `model` (where a strategy splits weights'
# heads there, activations follow; under `fsdp` the model axis has size 1).
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {"batch": BATCH_AXES, "heads": ("model",)}


def activation_spec(mesh, logical: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """The PartitionSpec of an activation from its logical axes: each axis gets the mesh axes of its rule
    (those of size > 1, kept in order while their product divides the dimension), the rest replicated.

    Used where a computation is mapped per shard by hand (a Pallas kernel in `shard_map`).

    Args:
        mesh: a Mesh or AbstractMesh with (some of) the axes data, fsdp, model.
        logical: one logical name (or None) per dimension, e.g. ("batch", None, "heads", None).
        shape: the activation's shape.

    Example:
        >>> activation_spec(make_mesh("data=2,model=4", devices=jax.devices()[:8]), ("batch", "heads"), (8, 12))
        PartitionSpec('data', 'model')
    """
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axes, product = [], 1
        for axis in ACTIVATION_RULES.get(name, ()):
            n = dict(mesh.shape).get(axis, 1)
            if n > 1 and size % (product * n) == 0:
                axes.append(axis)
                product *= n
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of an input batch: leading axis over the data axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
