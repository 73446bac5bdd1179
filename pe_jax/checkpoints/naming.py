"""PyTorch state dicts <-> pe_jax models: one declarative key table for the three published namings.

Namings:
  * ``original``: facebookresearch/perception_models (`visual.conv1.weight`, text keys at top level);
  * ``timm``: `vit_pe_*` vision towers (`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`, ...);
  * ``open_clip``: `PE-Core-*` (`visual.trunk.` + timm keys, `text.` + original text keys, `logit_scale`);
  * towers inside other models, a prefix + timm or original keys (EMBEDDED): ``perception_lm`` (PE-Lang);
    PE-AV's PE-Core-L14-336 frame encoder: ``pe_video``, ``pe_audio_video`` and ``pe_av`` (Meta's release).

Each row of a table maps one PyTorch key to one pe_jax parameter (or a slice of one: `[:, 0:1]`); `{i}`
is the block index, which in pe_jax is an index into the stacked `layers` axis. Rows whose parameter
the model does not have (no class token, no LayerScale, no pooling head, ...) drop out, so one table
serves every preset. A transform says how the tensor's layout differs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from pe_jax.checkpoints.params import CheckpointMismatchError, ParamSpec
from pe_jax.checkpoints.transforms import CONV, COPY, FLAT, LINEAR, Copy, Linear, ZeroBias
from pe_jax.config import CLIPConfig, TextConfig, VisionConfig
from pe_jax.errors import InputError

# Planning a load needs only configs and shapes: jax and flax are imported where models are touched, so
# that conversion (pe_jax.convert) runs without them.

MODEL_NAMES = {CLIPConfig: "CLIP", VisionConfig: "VisionTransformer", TextConfig: "TextTransformer"}


# Layout transforms (PyTorch tensor <-> the pe_jax parameter slot it fills): pe_jax.checkpoints.transforms.

# The tables: (PyTorch key, pe_jax parameter, transform), relative to a tower. ---------------------------------------

Row = tuple[str, str, object]


def _ln(torch_name: str, jax_name: str) -> list[Row]:
    return [(f"{torch_name}.weight", f"{jax_name}.weight", COPY), (f"{torch_name}.bias", f"{jax_name}.bias", COPY)]


def _attn(torch_in: str, torch_out: str, jax_attn: str) -> list[Row]:
    """A fused q|k|v projection stored as `<torch_in>weight`/`<torch_in>bias` plus an output projection."""
    return [
        (f"{torch_in}weight", f"{jax_attn}.in_proj.kernel", LINEAR),
        (f"{torch_in}bias", f"{jax_attn}.in_proj.bias", FLAT),
        (f"{torch_out}.weight", f"{jax_attn}.out_proj.kernel", Linear(n_in=2)),
        (f"{torch_out}.bias", f"{jax_attn}.out_proj.bias", COPY),
    ]


def _mlp(torch_fc: str, torch_proj: str, jax_mlp: str) -> list[Row]:
    return [
        (f"{torch_fc}.weight", f"{jax_mlp}.c_fc.kernel", LINEAR), (f"{torch_fc}.bias", f"{jax_mlp}.c_fc.bias", COPY),
        (f"{torch_proj}.weight", f"{jax_mlp}.c_proj.kernel", LINEAR),
        (f"{torch_proj}.bias", f"{jax_mlp}.c_proj.bias", COPY),
    ]


_BLOCK = "transformer.resblocks.{i}"

# Blocks in the original naming (vision and text alike).
BLOCK_ORIGINAL: list[Row] = [
    *_ln(f"{_BLOCK}.ln_1", f"{_BLOCK}.ln_1"),
    *_attn(f"{_BLOCK}.attn.in_proj_", f"{_BLOCK}.attn.out_proj", f"{_BLOCK}.attn"),
    *_ln(f"{_BLOCK}.ln_2", f"{_BLOCK}.ln_2"),
    *_mlp(f"{_BLOCK}.mlp.c_fc", f"{_BLOCK}.mlp.c_proj", f"{_BLOCK}.mlp"),
    (f"{_BLOCK}.ls_1.gamma", f"{_BLOCK}.ls_1.gamma", COPY),
    (f"{_BLOCK}.ls_2.gamma", f"{_BLOCK}.ls_2.gamma", COPY),
]

VISION_ORIGINAL: list[Row] = [
    ("conv1.weight", "conv1.kernel", CONV),
    ("class_embedding", "class_embedding", COPY),
    ("positional_embedding", "positional_embedding", COPY),
    *_ln("ln_pre", "ln_pre"),
    *BLOCK_ORIGINAL,
    *_ln("ln_post", "ln_post"),
    ("attn_pool.probe", "attn_pool.probe", COPY),
    *_attn("attn_pool.attn.in_proj_", "attn_pool.attn.out_proj", "attn_pool.attn"),
    *_ln("attn_pool.layernorm", "attn_pool.layernorm"),
    *_mlp("attn_pool.mlp.c_fc", "attn_pool.mlp.c_proj", "attn_pool.mlp"),
    ("proj", "proj", COPY),
]

VISION_TIMM: list[Row] = [
    ("patch_embed.proj.weight", "conv1.kernel", CONV),
    ("cls_token", "class_embedding", Copy(lead=2)),
    ("pos_embed", "positional_embedding", Copy(lead=1)),
    *_ln("norm_pre", "ln_pre"),
    *_ln("blocks.{i}.norm1", f"{_BLOCK}.ln_1"),
    *_attn("blocks.{i}.attn.qkv.", "blocks.{i}.attn.proj", f"{_BLOCK}.attn"),
    *_ln("blocks.{i}.norm2", f"{_BLOCK}.ln_2"),
    *_mlp("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc2", f"{_BLOCK}.mlp"),
    ("blocks.{i}.gamma_1", f"{_BLOCK}.ls_1.gamma", COPY),
    ("blocks.{i}.gamma_2", f"{_BLOCK}.ls_2.gamma", COPY),
    *_ln("norm", "ln_post"),
    ("attn_pool.latent", "attn_pool.probe", COPY),
    # timm splits the pooling head's fused projection into q and kv.
    ("attn_pool.q.weight", "attn_pool.attn.in_proj.kernel[:, 0:1]", LINEAR),
    ("attn_pool.q.bias", "attn_pool.attn.in_proj.bias[0:1]", FLAT),
    ("attn_pool.kv.weight", "attn_pool.attn.in_proj.kernel[:, 1:3]", LINEAR),
    ("attn_pool.kv.bias", "attn_pool.attn.in_proj.bias[1:3]", FLAT),
    ("attn_pool.proj.weight", "attn_pool.attn.out_proj.kernel", Linear(n_in=2)),
    ("attn_pool.proj.bias", "attn_pool.attn.out_proj.bias", COPY),
    *_ln("attn_pool.norm", "attn_pool.layernorm"),
    *_mlp("attn_pool.mlp.fc1", "attn_pool.mlp.fc2", "attn_pool.mlp"),
    ("head.weight", "proj", LINEAR),
    ("head.bias", "proj", ZeroBias()),
]

TEXT_ORIGINAL: list[Row] = [
    ("token_embedding.weight", "token_embedding", COPY),
    ("positional_embedding", "positional_embedding", COPY),
    *BLOCK_ORIGINAL,
    *_ln("ln_final", "ln_final"),
    ("text_projection", "text_projection", COPY),
]

# The towers inside other models: naming -> (the tower's key prefix, its table); the rest is left unused.
EMBEDDED = {
    "perception_lm": ("model.vision_tower.timm_model.", VISION_TIMM),  # transformers' PerceptionLM
    "pe_video": ("video_encoder.embedder.vision_model.timm_model.", VISION_TIMM),  # PeVideoModel
    "pe_audio_video": ("video_model.video_encoder.embedder.vision_model.timm_model.", VISION_TIMM),
    # Meta's PE-AV: perception_models' PEAudioVisual (core/audio_visual_encoder/pe.py) holds
    # `CLIP.from_config("PE-Core-L14-336").visual` as `pe_encoder` and loads its file with a strict load_state_dict
    "pe_av": ("audio_visual_model.visual_model.pe_encoder.", VISION_ORIGINAL),
}
NAMINGS = ("original", "timm", "open_clip", *EMBEDDED)

# Non-persistent buffers some exports carry; they hold nothing to load.
IGNORED_KEYS = re.compile(r"(^|\.)rope\.|(^|\.)attn_mask$")


# Expanding a table against a model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One PyTorch key bound to a concrete parameter (path) and index into it."""

    torch_key: str
    path: tuple[str, ...]
    index: tuple
    transform: object


def _tower_tables(config, naming: str) -> list[tuple[str, str, list[Row], int]]:
    """(torch prefix, jax prefix, rows, layers) for each tower of the model `config` builds, in `naming`."""
    vision = VISION_ORIGINAL if naming == "original" else EMBEDDED[naming][1] if naming in EMBEDDED else VISION_TIMM
    if isinstance(config, CLIPConfig):
        if naming not in ("original", "open_clip"):
            raise InputError(f"{naming} checkpoints hold only a vision tower; load them into a VisionTransformer")
        vprefix, tprefix = ("visual.", "") if naming == "original" else ("visual.trunk.", "text.")
        return [
            (vprefix, "visual.", vision, config.vision.layers),
            (tprefix, "text.", TEXT_ORIGINAL, config.text.layers),
            ("", "", [("logit_scale", "logit_scale", COPY)], 0),
        ]
    if isinstance(config, VisionConfig):
        prefix = "visual.trunk." if naming == "open_clip" else EMBEDDED.get(naming, ("",))[0]
        return [(prefix, "", vision, config.layers)]
    if isinstance(config, TextConfig):
        return [("text." if naming == "open_clip" else "", "", TEXT_ORIGINAL, config.layers)]
    raise TypeError(f"no weight table for {type(config).__name__}")


_SLICE = re.compile(r"^(.*)\[(.*)\]$")


def _parse_index(spec: str) -> tuple:
    parts = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition(":")
        parts.append(slice(int(lo) if lo else None, int(hi) if hi else None))
    return tuple(parts)


def slots(config, naming: str, shapes: Mapping[tuple[str, ...], tuple]) -> list[Slot]:
    """Every (PyTorch key -> parameter slot) pair for the model of `config` in `naming`, given its shapes."""
    out = []
    for tprefix, jprefix, rows, layers in _tower_tables(config, naming):
        for torch_key, jax_key, transform in rows:
            index: tuple = ()
            match = _SLICE.match(jax_key)
            if match:
                jax_key, index = match.group(1), _parse_index(match.group(2))
            for i in range(layers) if "{i}" in torch_key else [None]:
                parts = (jprefix + jax_key).split(".")
                if i is not None:
                    parts.remove("{i}")
                path = tuple(parts)
                if path not in shapes:
                    continue  # the model has no such parameter (no class token, no LayerScale, ...)
                full_index = ((i,) if i is not None else ()) + index
                out.append(Slot(tprefix + torch_key.format(i=i), path, full_index, transform))
    return out


def slot_shape(shape, index) -> tuple:
    return np.broadcast_to(np.empty((), np.int8), shape)[index].shape


def detect_naming(keys: Iterable[str]) -> str:
    """Which of the namings (NAMINGS) a set of PyTorch keys uses.

    Args:
        keys: a state dict's keys.

    Example:
        >>> detect_naming(["visual.conv1.weight", "token_embedding.weight"]), detect_naming(["patch_embed.proj.weight"])
        ('original', 'timm')
    """
    keys = set(keys)
    for naming, (prefix, table) in EMBEDDED.items():
        if prefix + table[0][0] in keys:  # its patch embedding
            return naming
    if any(k.startswith("visual.trunk.") for k in keys) or "text.token_embedding.weight" in keys:
        return "open_clip"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if keys & {"visual.conv1.weight", "conv1.weight", "token_embedding.weight"}:
        return "original"
    sample = ", ".join(sorted(keys)[:8])
    raise InputError(f"not a Perception Encoder state dict: none of its {len(keys)} keys names a patch embedding "
                     f"or token embedding (first keys: {sample})")


def strip_wrappers(keys: Iterable[str], config) -> dict[str, str]:
    """{model-facing key: stored key}: drops `module.` and, for a lone vision tower, a CLIP's other keys."""
    mapping = {k.replace("module.", "", 1) if k.startswith("module.") else k: k for k in keys}
    embedded = [p for p, table in EMBEDDED.values() if p + table[0][0] in mapping]
    if isinstance(config, VisionConfig) and embedded:  # the tower alone; conversion reports the rest unused
        return {k: v for k, v in mapping.items() if k.startswith(embedded[0])}
    if isinstance(config, VisionConfig) and any(k.startswith("visual.") for k in mapping):
        if not any(k.startswith("visual.trunk.") for k in mapping):
            # The reference's load_ckpt: a CLIP checkpoint loads into its vision tower.
            return {k[len("visual."):]: v for k, v in mapping.items() if k.startswith("visual.")}
        return {k: v for k, v in mapping.items() if k.startswith("visual.trunk.")}
    return mapping


def tensor_shape(state_dict: Mapping, key: str) -> tuple:
    """A tensor's shape without reading its data when the mapping can tell (memory-mapped files)."""
    shape_of = getattr(state_dict, "shape_of", None)
    return tuple(shape_of(key)) if shape_of else tuple(np.shape(state_dict[key]))


@dataclass(frozen=True)
class LoadPlan:
    """A validated mapping of a state dict onto a model: which stored key fills which parameter slot."""

    naming: str
    slots: list[Slot]
    stored_keys: dict[str, str]  # model-facing key -> key as stored (with `module.` etc.)
    shapes: dict[tuple[str, ...], ParamSpec]


def plan_for(config, shapes: Mapping[tuple[str, ...], ParamSpec], key_shapes: Mapping[str, tuple], *,
             naming: str | None = None) -> LoadPlan:
    """Checks every stored key and shape against the model that `config` builds, whose parameters have
    `shapes`, before any data is read; one error lists every problem."""
    keys = strip_wrappers(key_shapes.keys(), config)
    naming = naming or detect_naming(keys)
    if naming not in NAMINGS:
        raise InputError(f"unknown naming {naming!r}; use one of {NAMINGS}")
    shapes = dict(shapes)
    table = slots(config, naming, shapes)
    expected = {s.torch_key for s in table}
    missing = sorted(expected - set(keys))
    unexpected = sorted(k for k in set(keys) - expected if not IGNORED_KEYS.search(k))
    problems = []
    for slot in table:
        if slot.torch_key in keys:
            want = tuple(slot.transform.torch_shape(slot_shape(shapes[slot.path].shape, slot.index)))
            got = tuple(key_shapes[keys[slot.torch_key]])
            if got != want:
                problems.append(f"{slot.torch_key}: expected shape {want}, got {got}")
    if missing or unexpected or problems:
        lines = [f"state dict ({naming} naming) does not match {MODEL_NAMES[type(config)]}:"]
        for what, found in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("mismatched tensors", problems)):
            lines += [f"{what} ({len(found)}):", *(f"  {k}" for k in found)] if found else []
        raise CheckpointMismatchError("\n".join(lines))
    return LoadPlan(naming, table, {k: keys[k] for k in expected}, shapes)


def _empty(path, shape, dtype):
    return np.empty(shape, dtype)


def fill_params(plan: LoadPlan, state_dict: Mapping, *, allocate: Callable = _empty,
                on_param: Callable[[tuple, np.ndarray], object] = lambda path, a: a,
                progress: Callable[[int], object] | None = None) -> dict[tuple[str, ...], object]:
    """Streams tensors into parameters: each stored tensor is read once, in table order.

    `allocate(path, shape, dtype)` makes a parameter's buffer (file-backed for a converter);
    `on_param(path, buffer)` receives each parameter the moment it is complete; `progress(nbytes)`
    is told of each tensor read.
    """
    buffers, filled, done = {}, dict.fromkeys(plan.shapes, 0), {}
    for slot in plan.slots:
        sds = plan.shapes[slot.path]
        target = slot_shape(sds.shape, slot.index)
        tensor = np.asarray(state_dict[plan.stored_keys[slot.torch_key]])
        if progress:
            progress(tensor.nbytes)
        if isinstance(slot.transform, ZeroBias):
            if np.any(tensor != 0):
                raise CheckpointMismatchError(
                    f"{slot.torch_key}: must be all zeros (the reference projection has no bias)")
            continue
        if slot.path not in buffers:
            buffers[slot.path] = allocate(slot.path, sds.shape, sds.dtype)
        buffers[slot.path][slot.index] = slot.transform.to_jax(tensor, target).astype(sds.dtype, copy=False)
        filled[slot.path] += math.prod(target)
        if filled[slot.path] == math.prod(sds.shape):  # complete: hand it over, drop our reference
            done[slot.path] = on_param(slot.path, buffers.pop(slot.path))
    incomplete = sorted(".".join(p) for p in plan.shapes if p not in done)
    if incomplete:  # a table bug rather than a bad file; never return half-filled parameters
        raise CheckpointMismatchError(f"parameters left unfilled: {incomplete}")
    return done
