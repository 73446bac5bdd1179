"""The model a checkpoint holds: `load_model` picks the class and config from a pe_jax checkpoint's metadata
(or from a preset name for a PyTorch file) and fills it through `pe_jax.checkpoints.load`.

It sits above both the model classes and the checkpoint readers, which never import each other's callers.
"""

from __future__ import annotations

import dataclasses
import os

from pe_jax.checkpoints.orbax import is_pe_jax_checkpoint, read_metadata, restore_params
from pe_jax.checkpoints.readers import resolve
from pe_jax.checkpoints.verify import start_check, verify_by_default
from pe_jax.config import (
    TEXT_PRESETS,
    architecture_differences,
    available_configs,
    clip_config,
    config_from_dict,
    vision_config,
)
from pe_jax.errors import NotFound, UsageError

_CLASSES = {"CLIPConfig": "CLIP", "VisionConfig": "VisionTransformer", "TextConfig": "TextTransformer"}


def checkpoint_config(meta: dict):
    """The model config stored in a checkpoint's metadata; a clear error when it is absent or unknown."""
    cfg = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict) or cfg.get("type") not in _CLASSES:
        kind = cfg.get("type") if isinstance(cfg, dict) else None
        raise UsageError(f"pe_jax.json has no usable model config (type {kind!r}; expected one of "
                         f"{', '.join(_CLASSES)}): rewrite the checkpoint with pe-jax convert")
    try:
        return config_from_dict(cfg)
    except TypeError as e:
        raise UsageError(f"pe_jax.json holds a config this pe_jax cannot build ({e})") from None


def model_class(config):
    from pe_jax import modeling

    return getattr(modeling, _CLASSES[type(config).__name__])


def model_from_metadata(meta: dict, **overrides):
    """An abstract (`nnx.eval_shape`) model of the checkpoint's class and config."""
    from flax import nnx

    cfg = checkpoint_config(meta)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cls = model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def check_preset(preset: str, config) -> None:
    """Refuses a preset name that is unknown or that disagrees with a checkpoint's config (naming the fields).
    Execution fields (dtype, remat, attention) may differ: they are how the model runs, not what it is."""
    if preset not in available_configs():
        raise UsageError(f"unknown preset {preset!r}; available: {', '.join(available_configs())}")
    kind = type(config).__name__
    if kind == "CLIPConfig" and preset not in TEXT_PRESETS:
        raise UsageError(f"{preset} is a vision tower preset, but the checkpoint holds a CLIP")
    expected = clip_config(preset) if kind == "CLIPConfig" else vision_config(preset)
    differ = architecture_differences(config, expected)
    if differ:
        raise UsageError(f"the checkpoint is not {preset}: " + "; ".join(
            f"{k} is {got!r} in the checkpoint, {want!r} in the preset" for k, got, want in differ))


def load_model(checkpoint: str | os.PathLike, *, model: str | None = None, mesh=None, strategy: str = "fsdp",
               verify: bool | None = None):
    """The model a checkpoint holds: a pe_jax checkpoint directory builds its own class and config (`model`,
    if given, must agree with it); a PyTorch file needs `model`, a preset name (a CLIP preset builds a CLIP,
    others a vision tower). A pe_jax checkpoint is verified (checksums, .zarray) before anything is read
    unless `verify=False` (or PE_JAX_VERIFY=0)."""
    from pe_jax import sharding as sh

    checkpoint = resolve(checkpoint)  # an object-store URL: its local copy (hf:// is fetched below)
    meta = _checked_metadata(checkpoint, model)
    if meta is not None:
        # The files are hashed while the skeleton is built; restore_params waits for the result before reading.
        pending = start_check(checkpoint, meta) if (verify_by_default() if verify is None else verify) else False
        skeleton = model_from_metadata(meta)
        shardings = sh.param_shardings(skeleton, mesh, strategy) if mesh is not None else None
        return restore_params(skeleton, checkpoint, shardings, verify=pending)
    return _preset_class(model).from_config(model, checkpoint=checkpoint, mesh=mesh, strategy=strategy, verify=verify)


def abstract_model(checkpoint: str | os.PathLike, *, model: str | None = None):
    """The model `load_model` builds, abstract (`nnx.eval_shape`): its class, config and shapes, no weights
    read (an object-store checkpoint is fetched, as `load_model` would)."""
    from flax import nnx

    checkpoint = resolve(checkpoint)
    meta = _checked_metadata(checkpoint, model)
    if meta is not None:
        return model_from_metadata(meta)
    return nnx.eval_shape(lambda: _preset_class(model).from_config(model))


def _checked_metadata(checkpoint: str, model: str | None) -> dict | None:
    """A pe_jax checkpoint's metadata, checked against `model`; None for a PyTorch file (which needs `model`)."""
    if not checkpoint.startswith("hf://") and not os.path.exists(checkpoint):
        raise NotFound(f"checkpoint not found: {checkpoint}")
    if is_pe_jax_checkpoint(checkpoint):
        meta = read_metadata(checkpoint)
        try:
            config = checkpoint_config(meta)
        except ValueError as e:
            raise UsageError(f"{checkpoint}: {e}") from None
        if model is not None:
            check_preset(model, config)
        return meta
    if os.path.isdir(checkpoint):
        raise UsageError(f"{checkpoint} is a directory without pe_jax.json: not a pe_jax checkpoint")
    if model is None:
        raise UsageError(f"{checkpoint} is a PyTorch file: name its preset (--model NAME on the command line, "
                         f"model= in Python); presets: {', '.join(available_configs())}")
    return None


def _preset_class(preset: str):
    """A CLIP preset builds a CLIP, the others a vision tower."""
    from pe_jax import modeling

    return modeling.CLIP if preset in TEXT_PRESETS else modeling.VisionTransformer


def preset_of(checkpoint: str | os.PathLike, model: str | None = None) -> str | None:
    """The preset a job records: the one named, else the one in a pe_jax checkpoint's metadata."""
    if model is not None:
        return model
    checkpoint = resolve(checkpoint)
    if is_pe_jax_checkpoint(checkpoint):
        return read_metadata(checkpoint).get("preset")
    return None
