"""A model's parameters as {path: array}: their shapes, the arrays, and a model rebuilt around new ones.

Nothing here imports the model classes; jax and flax are imported inside the functions, so that planning
a conversion from configs and shapes (pe_jax.checkpoints.naming) runs without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from pe_jax.errors import PeJaxError


class CheckpointMismatchError(PeJaxError, ValueError):
    """A state dict does not fit the model: lists every missing, unexpected and mis-shaped key at once.

    Args:
        message: the keys that do not fit, one line each.

    Example:
        >>> issubclass(CheckpointMismatchError, ValueError)  # loading a wrong file raises it, naming the keys
        True
    """


class ParamSpec(NamedTuple):
    """A parameter's shape and dtype (what jax.ShapeDtypeStruct says, without jax)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def param_shapes(model) -> dict[tuple[str, ...], ParamSpec]:
    from flax import nnx, traverse_util

    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: ParamSpec(tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


def flat_params(model) -> dict:
    """{path: array} of the model's parameters (sharded arrays stay sharded)."""
    from flax import nnx

    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def replace_params(model, params: Mapping[tuple[str, ...], object]):
    """A model with the same structure as `model` holding `params` ({path: array})."""
    from flax import nnx, traverse_util

    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(dict(params)))
    return nnx.merge(graphdef, state)
