"""Loading weights into a model skeleton: the one entry point for every source.

`load_into(skeleton, source, shardings)` fills an abstract (`nnx.eval_shape`) model from a pe_jax
checkpoint directory, a PyTorch file (.safetensors, sharded index, .pt, hf://...) or an in-memory state
dict. It never imports the model classes: `build` (pe_jax.modeling) calls it, and `resolve_model`
(pe_jax.pretrained), which picks the class and config from a checkpoint's metadata once, sits above both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pe_jax.checkpoints.naming import NAMINGS, fill_params, plan_for, slots, tensor_shape
from pe_jax.checkpoints.orbax import is_pe_jax_checkpoint, restore_params
from pe_jax.checkpoints.params import param_shapes, replace_params
from pe_jax.errors import UsageError

PE_JAX = "pe_jax"  # the naming of a pe_jax (Orbax) checkpoint, beside the PyTorch namings (NAMINGS)


def load_into(skeleton, source, shardings: Mapping | None = None, *, verify=None, naming: str | None = None,
              metadata: dict | None = None):
    """`skeleton` filled from `source`: a pe_jax checkpoint directory, a PyTorch file or a state dict
    (a mapping of key -> array). With `shardings` ({path: Sharding}) each parameter goes straight to its
    devices: Orbax restores each shard where it lives; a PyTorch file passes through the host one
    parameter at a time. A pe_jax checkpoint's files are verified against its checksums first unless
    `verify=False` (default: PE_JAX_VERIFY, on; a Future: a check the caller started). `naming` and
    `metadata` (pe_jax.json), when the caller resolved them (`pe_jax.pretrained.resolve_model`), are not
    looked up again.

    Args:
        skeleton: an abstract (`nnx.eval_shape`) model.
        source: a path, a URL or a state dict.
        shardings: {parameter path: Sharding}, or None for the first local device.
        verify: see above.
        naming: "pe_jax" or a PyTorch naming (pe_jax.checkpoints.naming.NAMINGS); None: detected.
        metadata: a pe_jax checkpoint's pe_jax.json, as read.

    Example:
        >>> model = load_into(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))),
        ...                   "tower.safetensors")  # doctest: +SKIP
    """
    import jax

    from pe_jax.checkpoints.readers import open_state_dict, resolve

    if not isinstance(source, Mapping):
        source = resolve(source)  # a URL: its local copy
        if naming == PE_JAX or naming is None and is_pe_jax_checkpoint(source):
            return restore_params(skeleton, source, shardings, verify=verify, meta=metadata)
        source = open_state_dict(source)
    place = (lambda path, a: jax.device_put(a, shardings[path])) if shardings else None
    return load_torch_state_dict(skeleton, source, naming=naming, on_param=place)


def load_torch_state_dict(model, state_dict: Mapping, *, naming: str | None = None,
                          on_param: Callable[[tuple, np.ndarray], object] | None = None):
    """Returns `model` (concrete or an `nnx.eval_shape` skeleton) filled from a PyTorch state dict.

    `state_dict` maps keys to arrays (numpy, or anything `np.asarray` takes) in any of the three namings
    (detected unless given). It may be lazy: shapes are checked first, then each tensor is read once.
    `on_param(path, array)` places each finished parameter (default: `jnp.asarray`, the default device).

    Args:
        model: the model to fill (its class and config say which keys it needs).
        state_dict: {key: array}, e.g. `safetensors.numpy.load_file(path)` or `torch_state_dict(...)`.
        naming: "original", "open_clip", "timm", ... (`pe_jax.checkpoints.naming.NAMINGS`); None: detected.
        on_param: places each parameter (a sharded load passes `jax.device_put` with its sharding).

    Example:
        >>> from flax import nnx
        >>> from pe_jax import VisionTransformer, vision_config
        >>> model = VisionTransformer.from_config("PE-Core-T16-384", layers=1, image_size=32)
        >>> skeleton = nnx.eval_shape(lambda: VisionTransformer(model.config, rngs=nnx.Rngs(1)))
        >>> again = load_torch_state_dict(skeleton, torch_state_dict(model, "timm"))
        >>> bool((again.proj[...] == model.proj[...]).all())
        True
    """
    import jax.numpy as jnp

    key_shapes = {k: tensor_shape(state_dict, k) for k in state_dict.keys()}
    plan = plan_for(model.config, param_shapes(model), key_shapes, naming=naming)
    params = fill_params(plan, state_dict, on_param=on_param or (lambda path, a: jnp.asarray(a)))
    return replace_params(model, params)


def torch_state_dict(model, naming: str = "original", *, dtype=None) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch state dict (numpy arrays) in `naming`.

    Args:
        model: a CLIP, VisionTransformer or TextTransformer.
        naming: "original" (the reference's keys), "open_clip", "timm" (the vision tower), ... (NAMINGS).
        dtype: the arrays' dtype (default: the parameters').

    Example:
        >>> from pe_jax import VisionTransformer
        >>> model = VisionTransformer.from_config("PE-Core-T16-384", layers=1, image_size=32)
        >>> torch_state_dict(model, "timm")["patch_embed.proj.weight"].shape
        (192, 3, 16, 16)
    """
    from flax import nnx, traverse_util

    if naming not in NAMINGS:
        raise UsageError(f"unknown naming {naming!r}; use one of {NAMINGS}")
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = {}
    for slot in slots(model.config, naming, param_shapes(model)):
        array = np.asarray(params[slot.path])[slot.index]
        tensor = np.array(slot.transform.to_torch(array), order="C")  # ascontiguousarray would make 0-d 1-d
        out[slot.torch_key] = tensor.astype(dtype) if dtype is not None else tensor
    return out
