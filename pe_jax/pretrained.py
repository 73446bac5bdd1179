"""Which model, from which weights: `resolve_model(checkpoint | preset, **overrides)` decides it once.

It reads a checkpoint's metadata once (a pe_jax checkpoint's pe_jax.json; a PyTorch file's keys, never its
tensors; an object store's listing once, for the local copy) and returns a `ResolvedModel`: the class, the
config (overrides applied), the naming, the recorded content hash and where the weights are. Every caller
builds from it (`load_model`, the embedding job and its Ray actors, finetuning, the planner, eval and export),
so nothing opens the checkpoint's metadata a second time.

It sits above both the model classes and the checkpoint readers, which never import each other's callers.
"""

from __future__ import annotations

import dataclasses
import os

from pe_jax.checkpoints.load import PE_JAX
from pe_jax.checkpoints.naming import detect_naming, strip_wrappers
from pe_jax.checkpoints.orbax import METADATA_FILE, is_pe_jax_checkpoint, read_metadata
from pe_jax.checkpoints.readers import open_state_dict, resolve
from pe_jax.checkpoints.verify import content_hash, start_check, verify_by_default
from pe_jax.config import (
    EXECUTION_FIELDS,
    TEXT_PRESETS,
    architecture_differences,
    available_configs,
    clip_config,
    config_from_dict,
    override,
    vision_config,
)
from pe_jax.errors import NotFound, UsageError

_CLASSES = {"CLIPConfig": "CLIP", "VisionConfig": "VisionTransformer", "TextConfig": "TextTransformer"}
RANDOM_INIT = "random-init"  # what a job records as its weights when there is no checkpoint


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model resolved from a checkpoint or a preset (`resolve_model`): everything a caller needs, read once.
    Picklable: a Ray driver ships it to its actors, which load the weights without reading metadata again.

    Args:
        model_class: `CLIP`, `VisionTransformer` or `TextTransformer` (pe_jax.modeling).
        config: the config the model is built with, overrides applied.
        naming: "pe_jax" (an Orbax checkpoint), a PyTorch file's naming as its keys say ("original",
            "open_clip", "timm", ...), or None (no checkpoint: random init).
        content_hash: the content hash the checkpoint records (pe_jax.json), else None.
        path: where the weights are on this host (an object store's or hf://'s local copy), None without.
        preset: the preset name (given, or recorded in the checkpoint), if any.
        source: the checkpoint as given (a path or a URL): a host without `path` fetches it from there.
        metadata: pe_jax.json as read, for the load (its parameter shapes, its checks).

    Example:
        >>> resolved = resolve_model(model="PE-Core-T16-384", vision_layers=1, text_layers=1)
        >>> resolved.model_class.__name__, resolved.config.vision.layers, resolved.naming
        ('CLIP', 1, None)
    """

    model_class: type
    config: object
    naming: str | None = None
    content_hash: str | None = None
    path: str | None = None
    preset: str | None = None
    source: str | None = None
    metadata: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    def abstract(self):
        """The model, abstract (`nnx.eval_shape`): its class, config and shapes, no weights read.

        Example:
            >>> resolve_model(model="PE-Core-T16-384", vision_layers=1).abstract().visual.config.layers
            1
        """
        from flax import nnx

        return nnx.eval_shape(lambda: self.model_class(self.config, rngs=nnx.Rngs(0)))

    def load(self, *, mesh=None, strategy: str = "fsdp", verify: bool | None = None, seed: int = 0):
        """The model with its weights (random init, `seed`, without a checkpoint), directly sharded over `mesh`
        by `strategy` (pe_jax.sharding). A pe_jax checkpoint is verified (checksums, .zarray) while the skeleton
        is built, before anything is read, unless `verify=False` (or PE_JAX_VERIFY=0).

        Args:
            mesh: a jax Mesh, or None for one device.
            strategy: a sharding strategy of pe_jax.sharding.
            verify: check a pe_jax checkpoint's files first (None: unless PE_JAX_VERIFY=0).
            seed: the random init's seed.

        Example:
            >>> model = resolve_model("ckpt/").load(verify=False)  # doctest: +SKIP
        """
        from pe_jax.modeling import build

        path = self.local_path()
        if self.naming == PE_JAX and (verify_by_default() if verify is None else verify):
            verify = start_check(path, self.metadata)  # the files are hashed while the skeleton is built
        return build(self.model_class, self.config, path, seed, mesh, strategy, verify, naming=self.naming,
                     metadata=self.metadata)

    def local_path(self) -> str | None:
        """`path` where this host has it, else a local copy of `source` (a Ray actor on another host)."""
        if self.path is None or self.source in (None, self.path) or os.path.exists(self.path):
            return self.path
        return resolve(self.source)

    def override(self, **overrides) -> ResolvedModel:
        """The same weights with config fields replaced (`pe_jax.config.override`); a pe_jax checkpoint's config
        is the model, so only its execution fields may change.

        Example:
            >>> resolve_model(model="PE-Core-T16-384").override(dtype="bfloat16").config.vision.dtype
            'bfloat16'
        """
        if not overrides:
            return self
        config = override(self.config, **overrides)
        differ = architecture_differences(self.config, config) if self.naming == PE_JAX else None
        if differ:
            raise UsageError(f"overrides would change the architecture of the checkpoint {self.source} ("
                             + "; ".join(f"{k}: {a!r} there, {b!r} asked" for k, a, b in differ)
                             + f"); a pe_jax checkpoint's config is the model: only {', '.join(EXECUTION_FIELDS)} "
                             "may be overridden")
        return dataclasses.replace(self, config=config)

    def weights_id(self) -> str:
        """The content hash naming the weights, as a job records them (`pe_jax.checkpoints.verify.content_hash`:
        verified, or reused from this process's load), or "random-init" without a checkpoint.

        Example:
            >>> resolve_model(model="PE-Core-T16-384").weights_id()
            'random-init'
        """
        if self.path is None:
            return RANDOM_INIT
        return content_hash(self.local_path(), meta=self.metadata)


def resolve_model(checkpoint: str | os.PathLike | None = None, *, model: str | None = None,
                  default_model: str | None = None, **overrides) -> ResolvedModel:
    """What `checkpoint` (or, without one, preset `model`) is: the one place that decides a model's class,
    config and naming. Reads a pe_jax checkpoint's pe_jax.json once, a PyTorch file's keys (not its
    tensors), and copies an object-store checkpoint into the local cache once.

    Args:
        checkpoint: a pe_jax checkpoint directory, a PyTorch file (.safetensors, a sharded index, .pt), an
            object-store URL or hf://ORG/REPO[:FILE]; None builds preset `model` (random init, planning).
        model: a preset name: needed for a PyTorch file (a CLIP preset builds a CLIP when the file holds a
            text tower, else its vision tower) or no checkpoint; for a pe_jax checkpoint it must agree with the
            stored config (execution fields aside).
        default_model: the preset of a PyTorch file when `model` is None (say the one a job recorded).
        **overrides: config fields to replace (`pe_jax.config.override`; a CLIP's take tower prefixes:
            vision_layers=2); a pe_jax checkpoint's only execution fields (dtype, remat_policy, ...).

    Example:
        >>> resolved = resolve_model(model="PE-Core-B16-224", dtype="bfloat16")
        >>> resolved.model_class.__name__, resolved.config.vision.dtype, resolved.preset
        ('CLIP', 'bfloat16', 'PE-Core-B16-224')
    """
    if checkpoint is None:
        preset = model or default_model
        if preset is None:
            raise UsageError("name a checkpoint or a preset (--model NAME on the command line, model= in Python); "
                             f"presets: {', '.join(available_configs())}")
        return _preset_model(preset, preset in TEXT_PRESETS).override(**overrides)
    source = os.fspath(checkpoint)
    path = resolve(source)  # an object-store URL or hf://: its local copy
    check_checkpoint(path)
    # a pe_jax.json that is no regular file (a FIFO) is refused by read_metadata, naming it
    if is_pe_jax_checkpoint(path) or os.path.lexists(os.path.join(path, METADATA_FILE)):
        resolved = _stored_model(read_metadata(path), path, source, model)
    else:
        resolved = _torch_model(path, source, model or default_model)
    return resolved.override(**overrides)


def check_checkpoint(path: str | os.PathLike) -> None:
    """A checkpoint on this host exists, and a directory is a pe_jax checkpoint: `resolve_model`'s check, which
    the command line also runs before jax loads (it reads no file, and imports no jax).

    Args:
        path: a local checkpoint path (a URL's local copy is checked once `resolve_model` has made it).

    Example:
        >>> check_checkpoint("no-such-checkpoint/")
        Traceback (most recent call last):
        ...
        pe_jax.errors.NotFound: checkpoint not found: no-such-checkpoint/
    """
    if not os.path.exists(path):
        raise NotFound(f"checkpoint not found: {path}")
    if os.path.isdir(path) and not (is_pe_jax_checkpoint(path) or os.path.lexists(os.path.join(path, METADATA_FILE))):
        raise UsageError(f"{path} is a directory without pe_jax.json: not a pe_jax checkpoint")


def _preset_model(preset: str, clip: bool, **where) -> ResolvedModel:
    """Preset `preset`, a CLIP or its vision tower (`where`: the checkpoint's fields)."""
    from pe_jax import modeling

    if preset not in available_configs():
        raise UsageError(f"unknown preset {preset!r}; available: {', '.join(available_configs())}")
    if clip:
        return ResolvedModel(modeling.CLIP, clip_config(preset), preset=preset, **where)
    return ResolvedModel(modeling.VisionTransformer, vision_config(preset), preset=preset, **where)


def _stored_model(meta: dict, path: str, source: str, model: str | None) -> ResolvedModel:
    """A pe_jax checkpoint's model: its own class and config (`model`, if named, must agree)."""
    try:
        config = checkpoint_config(meta)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    if model is not None:
        check_preset(model, config)
    return ResolvedModel(model_class(config), config, PE_JAX, meta.get("content_hash"), path,
                         model if model is not None else meta.get("preset"), source, meta)


def _torch_model(path: str, source: str, preset: str | None) -> ResolvedModel:
    """A PyTorch file's model: its naming from its keys, the class and config from `preset`."""
    if preset is None:
        raise UsageError(f"{path} is a PyTorch file: name its preset (--model NAME on the command line, "
                         f"model= in Python); presets: {', '.join(available_configs())}")
    keys = strip_wrappers(open_state_dict(path).keys(), None)  # the header's keys; no tensor is read
    naming = detect_naming(keys)
    # A CLIP preset with a file of the vision tower alone (timm, a bigger model's tower): the tower.
    holds_text = naming in ("original", "open_clip") and any(
        k == "token_embedding.weight" or k.endswith(".token_embedding.weight") for k in keys)
    return _preset_model(preset, preset in TEXT_PRESETS and holds_text, naming=naming, path=path, source=source)


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
    """An abstract (`nnx.eval_shape`) model of the checkpoint's class and config (`pe_jax.json` as read)."""
    cfg = checkpoint_config(meta)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return ResolvedModel(model_class(cfg), cfg, PE_JAX, meta.get("content_hash"), metadata=meta).abstract()


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


# ------------------------------------------------------------------- the earlier entry points, over resolve_model


def load_model(checkpoint: str | os.PathLike, *, model: str | None = None, mesh=None, strategy: str = "fsdp",
               verify: bool | None = None):
    """The model a checkpoint holds (`resolve_model(checkpoint, model=model).load(...)`): a pe_jax checkpoint
    directory builds its own class and config (`model`, if given, must agree with it); a PyTorch file needs
    `model`, a preset name. A pe_jax checkpoint is verified (checksums, .zarray) before anything is read
    unless `verify=False` (or PE_JAX_VERIFY=0).

    Args:
        checkpoint: a pe_jax checkpoint, a PyTorch file, an object-store URL or hf://ORG/REPO[:FILE].
        model: the preset (see `resolve_model`).
        mesh: a jax Mesh to shard over, by `strategy`.
        strategy: a sharding strategy of pe_jax.sharding.
        verify: check a pe_jax checkpoint's files first (None: unless PE_JAX_VERIFY=0).

    Example:
        >>> model = load_model("pe_b16/")  # doctest: +SKIP
    """
    return resolve_model(checkpoint, model=model).load(mesh=mesh, strategy=strategy, verify=verify)


def abstract_model(checkpoint: str | os.PathLike, *, model: str | None = None):
    """The model `load_model` builds, abstract (`nnx.eval_shape`): its class, config and shapes, no weights
    read (an object-store checkpoint is fetched, as `load_model` would)."""
    return resolve_model(checkpoint, model=model).abstract()


def preset_of(checkpoint: str | os.PathLike, model: str | None = None) -> str | None:
    """The preset a job records: the one named, else the one in a pe_jax checkpoint's metadata."""
    if model is not None:
        return model
    path = resolve(checkpoint)
    return resolve_model(path).preset if is_pe_jax_checkpoint(path) else None

