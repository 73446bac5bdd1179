"""Frozen configs and the named presets of every published Perception Encoder checkpoint.

Architecture fields mirror the reference `core/vision_encoder/config.py`; execution fields (dtypes,
remat policy, attention backend) live beside them so that `from_config(name, **overrides)` can set any
of them. MLP widths are integers: G/14's 8960 is not `int(1536 * 8960 / 1536)` in floating point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass
from typing import Literal

from pe_jax.errors import UsageError

PoolType = Literal["attn", "tok", "avg", "none"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"]
AttentionImpl = Literal["xla", "cudnn", "splash", "auto"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Execution:
    """How a tower runs, independent of its weights."""

    dtype: DType = "float32"  # compute dtype of matmuls; LayerNorm, softmax and RoPE stay in float32
    param_dtype: DType = "float32"
    remat_policy: RematPolicy = "none"  # policy of nnx.remat around each scanned block
    attention: AttentionImpl = "xla"  # "auto": cuDNN on GPU (dtype and head size allowing), splash on TPU


@dataclass(frozen=True)
class VisionConfig(Execution):
    """A vision tower's architecture (the reference's fields) and execution (`Execution`'s fields).

    Args:
        patch_size, width, layers, heads, mlp_dim: the transformer's shape.
        output_dim: the pooled feature's size after the projection (None: no projection, `width`).
        image_size: the pretraining resolution (the position-embedding grid); any multiple of the patch runs.
        use_cls_token, use_abs_posemb, use_rope2d, ls_init_value, use_ln_pre, use_ln_post: as the reference.
        pool_type: attn (the attention pooler), tok (class token), avg or none; attn_pooler_*: its shape.

    Example:
        >>> cfg = vision_config("PE-Core-T16-384", layers=1)
        >>> cfg.width, cfg.layers, cfg.grid_size, cfg.embed_dim
        (192, 1, 24, 512)
    """

    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    output_dim: int | None = 1024
    image_size: int = 224  # pretraining size: sets the position-embedding grid; any multiple of the patch runs
    use_cls_token: bool = True
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    ls_init_value: float | None = None  # LayerScale on both residual branches when set
    pool_type: PoolType = "attn"
    attn_pooler_heads: int = 8
    attn_pooler_mlp_ratio: int = 4
    use_ln_pre: bool = True
    use_ln_post: bool = True

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def embed_dim(self) -> int:
        """Size of the pooled, projected output."""
        return self.output_dim or self.width

    def __post_init__(self):
        _check(self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}")
        _check((self.width // self.heads) % 4 == 0, "2D RoPE needs a head dim divisible by 4")
        _check(self.pool_type in ("attn", "tok", "avg", "none"), f"unknown pool_type {self.pool_type!r}")
        _check(not (self.pool_type == "tok" and not self.use_cls_token), "pool_type 'tok' needs a class token")
        _check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size")
        _check(self.layers >= 1, "layers must be >= 1")
        _check_execution(self)


@dataclass(frozen=True)
class TextConfig(Execution):
    """A text tower's architecture (causal transformer, pooled at the end-of-text token) and execution.

    Args:
        context_length: tokens per text (32 for PE-Core B, L; 72 for G).
        width, heads, layers, mlp_dim: the transformer's shape.
        output_dim: the projected feature's size (the CLIP's shared embedding size).
        vocab_size: the BPE vocabulary (`pe_jax.preprocess.get_text_tokenizer`).

    Example:
        >>> clip_config("PE-Core-T16-384").text.context_length
        32
    """

    context_length: int = 32
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_dim: int = 4096
    output_dim: int = 1024
    vocab_size: int = 49408

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def __post_init__(self):
        _check(self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}")
        _check(self.layers >= 1, "layers must be >= 1")
        _check_execution(self)


@dataclass(frozen=True)
class CLIPConfig:
    """A PE-Core CLIP: its two towers and the initial logit scale (`clip_config` builds the presets).

    Args:
        vision: the vision tower's config.
        text: the text tower's config (the same `output_dim`).
        init_logit_scale: log of the initial temperature's inverse.

    Example:
        >>> cfg = clip_config("PE-Core-T16-384", vision_layers=1, text_layers=1)
        >>> cfg.vision.layers, cfg.text.layers, cfg.vision.output_dim == cfg.text.output_dim
        (1, 1, True)
    """

    vision: VisionConfig
    text: TextConfig
    init_logit_scale: float = 2.6592600345611572  # log(1 / 0.07), as the reference


def _check(ok: bool, message: str):
    if not ok:
        raise UsageError(message)


def _check_execution(cfg: Execution):
    for field in ("dtype", "param_dtype"):
        _check(getattr(cfg, field) in ("float32", "bfloat16", "float16"), f"unknown {field} {getattr(cfg, field)!r}")
    _check(cfg.remat_policy in RematPolicy.__args__, f"unknown remat_policy {cfg.remat_policy!r}")
    _check(cfg.attention in AttentionImpl.__args__, f"unknown attention implementation {cfg.attention!r}")


# --------------------------------------------------------------------------------------------------
# Presets: every checkpoint Meta published. PE-Core has both towers; Lang and Spatial are vision only.
# --------------------------------------------------------------------------------------------------

_CORE_G = VisionConfig(patch_size=14, width=1536, layers=50, heads=16, mlp_dim=8960, output_dim=1280,
                       image_size=448, use_cls_token=False)
_CORE_L = VisionConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, output_dim=1024,
                       image_size=336)
_CORE_B = VisionConfig(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, output_dim=1024, image_size=224)
_CORE_S = VisionConfig(patch_size=16, width=384, layers=12, heads=6, mlp_dim=1536, output_dim=512, image_size=384)
_CORE_T = VisionConfig(patch_size=16, width=192, layers=12, heads=3, mlp_dim=768, output_dim=512, image_size=384)

_TEXT_G = TextConfig(context_length=72, width=1280, heads=20, layers=24, mlp_dim=5120, output_dim=1280)
_TEXT_L = TextConfig(context_length=32, width=1024, heads=16, layers=24, mlp_dim=4096, output_dim=1024)
_TEXT_S = TextConfig(context_length=32, width=512, heads=8, layers=12, mlp_dim=2048, output_dim=512)

# Lang and Spatial towers return tokens: no pooling, no ln_post, no projection.
_TOKENS = dict(pool_type="none", use_ln_post=False, output_dim=None)

VISION_PRESETS: dict[str, VisionConfig] = {
    "PE-Core-G14-448": _CORE_G,
    "PE-Core-L14-336": _CORE_L,
    "PE-Core-B16-224": _CORE_B,
    "PE-Core-S16-384": _CORE_S,
    "PE-Core-T16-384": _CORE_T,
    "PE-Lang-G14-448": dataclasses.replace(_CORE_G, layers=47, ls_init_value=0.1, **_TOKENS),
    "PE-Lang-L14-448": dataclasses.replace(_CORE_L, image_size=448, layers=23, ls_init_value=0.1, **_TOKENS),
    "PE-Spatial-G14-448": dataclasses.replace(_CORE_G, ls_init_value=0.1, **_TOKENS),
    "PE-Spatial-L14-448": dataclasses.replace(_CORE_L, image_size=448, **_TOKENS),
    "PE-Spatial-B16-512": dataclasses.replace(_CORE_B, image_size=512, **_TOKENS),
    "PE-Spatial-S16-512": dataclasses.replace(_CORE_S, image_size=512, **_TOKENS),
    "PE-Spatial-T16-512": dataclasses.replace(_CORE_T, image_size=512, **_TOKENS),
}
# The tiling checkpoints (PLM stage 2) share their architecture with the plain Lang towers.
VISION_PRESETS["PE-Lang-G14-448-Tiling"] = VISION_PRESETS["PE-Lang-G14-448"]
VISION_PRESETS["PE-Lang-L14-448-Tiling"] = VISION_PRESETS["PE-Lang-L14-448"]

TEXT_PRESETS: dict[str, TextConfig] = {
    "PE-Core-G14-448": _TEXT_G,
    "PE-Core-L14-336": _TEXT_L,
    "PE-Core-B16-224": _TEXT_L,
    "PE-Core-S16-384": _TEXT_S,
    "PE-Core-T16-384": _TEXT_S,
}

EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(Execution))


def available_configs(kind: Literal["all", "clip", "vision"] = "all") -> list[str]:
    """Names of the presets: `clip` ones have a text tower, every one has a vision tower.

    Args:
        kind: "clip" (PE-Core: both towers), or "all" / "vision" (every preset: a vision tower).

    Example:
        >>> "PE-Core-B16-224" in available_configs("clip"), "PE-Spatial-T16-512" in available_configs("clip")
        (True, False)
    """
    if kind == "clip":
        return list(TEXT_PRESETS)
    return list(VISION_PRESETS)


def vision_config(name: str, **overrides) -> VisionConfig:
    """The vision preset `name`, with any field replaced by `overrides`.

    Args:
        name: a preset of `available_configs()`.
        **overrides: `VisionConfig` fields to replace (layers=2, dtype="bfloat16", ...).

    Example:
        >>> vision_config("PE-Spatial-T16-512", layers=2, dtype="bfloat16").layers
        2
    """
    return _replace(_lookup(name, VISION_PRESETS, "vision"), overrides)


def clip_config(name: str, **overrides) -> CLIPConfig:
    """The CLIP preset `name`.

    Execution fields (`dtype`, `param_dtype`, `remat_policy`, `attention`) apply to both towers;
    other fields take a tower prefix: `vision_layers=2`, `text_context_length=16`, `init_logit_scale=...`.

    Args:
        name: a preset of `available_configs("clip")`.
        **overrides: the fields to replace, as above.

    Example:
        >>> cfg = clip_config("PE-Core-T16-384", dtype="bfloat16", text_layers=1)
        >>> cfg.vision.dtype, cfg.text.dtype, cfg.text.layers
        ('bfloat16', 'bfloat16', 1)
    """
    preset = CLIPConfig(_lookup(name, VISION_PRESETS, "vision"), _lookup(name, TEXT_PRESETS, "CLIP"))
    return override(preset, **overrides)


def override(cfg, **overrides):
    """`cfg` with fields replaced; for a CLIP, as `clip_config` takes them (tower prefixes)."""
    if not isinstance(cfg, CLIPConfig):
        return _replace(cfg, overrides)
    per_tower: dict[str, dict] = {"vision": {}, "text": {}}
    top = {}
    for key, value in overrides.items():
        if key in EXECUTION_FIELDS:
            per_tower["vision"][key] = per_tower["text"][key] = value
        elif key.startswith(("vision_", "text_")):
            tower, field = key.split("_", 1)
            per_tower[tower][field] = value
        elif key == "init_logit_scale":
            top[key] = value
        else:
            raise UsageError(f"unknown CLIP override {key!r}: use vision_<field>, text_<field> or one of "
                             f"{', '.join(EXECUTION_FIELDS + ('init_logit_scale',))}")
    return dataclasses.replace(cfg, vision=_replace(cfg.vision, per_tower["vision"]),
                               text=_replace(cfg.text, per_tower["text"]), **top)


def architecture_differences(a, b) -> list[tuple[str, object, object]]:
    """(field, value in a, value in b) for each field that differs, execution fields (how a model runs, not
    what it is) and the initial logit scale left out."""
    def walk(x: dict, y: dict, prefix: str):
        out = []
        for k in sorted(set(x) | set(y)):
            u, v = x.get(k), y.get(k)
            if isinstance(u, dict) and isinstance(v, dict):
                out += walk(u, v, f"{prefix}{k}.")
            elif u != v and k not in EXECUTION_FIELDS + ("init_logit_scale",):
                out.append((f"{prefix}{k}", u, v))
        return out

    return walk(dataclasses.asdict(a), dataclasses.asdict(b), "")


def _lookup(name: str, table: dict, kind: str):
    if name not in table:
        raise UsageError(f"unknown {kind} preset {name!r}; available: {', '.join(table)}")
    return table[name]


def _replace(cfg, overrides: dict):
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"unknown {type(cfg).__name__} field(s) {unknown}; fields are {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def config_to_dict(cfg: VisionConfig | TextConfig | CLIPConfig) -> dict:
    """A JSON-able dict naming the config type, for checkpoint metadata."""
    return {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}


OUTPUT_NEUTRAL = ("remat_policy", "attention")  # how a tower runs, not what it computes


def config_digest(cfg: VisionConfig | TextConfig | CLIPConfig) -> str:
    """A short hash of everything in `cfg` that changes a model's outputs (the architecture, RoPE, pooling, the
    compute and parameter dtypes; not remat or the attention backend): what binds outputs to a model beside
    the weights' content hash (an edited pe_jax.json keeps the content hash and changes the embeddings).

    Args:
        cfg: a VisionConfig, TextConfig or CLIPConfig.

    Example:
        >>> config_digest(clip_config("PE-Core-B16-224"))  # doctest: +SKIP
        'config:5f0c...'
    """
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in OUTPUT_NEUTRAL}

    text = json.dumps(strip(config_to_dict(cfg)), sort_keys=True, default=str)
    return "config:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_dict(d: dict) -> VisionConfig | TextConfig | CLIPConfig:
    d = dict(d)
    kind = d.pop("type")
    if kind == "CLIPConfig":
        return CLIPConfig(VisionConfig(**d.pop("vision")), TextConfig(**d.pop("text")), **d)
    return {"VisionConfig": VisionConfig, "TextConfig": TextConfig}[kind](**d)


# ------------------------------------------------------------------------------------ a mesh's axes, as text

MESH_AXES = ("data", "fsdp", "model")


def check_mesh(sizes: dict[str, int], text: str | None = None) -> dict[str, int]:
    """Mesh axis sizes, checked without jax: axes among MESH_AXES, each size >= 1 or -1 (the rest of the
    devices, once). Whether the devices are there is `pe_jax.sharding.make_mesh`'s check.

    Args:
        sizes: axis name -> size.
        text: the mesh as the user wrote it, named in the message (default: `sizes`).

    Example:
        >>> check_mesh({"fsdp": 4, "model": 2})
        {'fsdp': 4, 'model': 2}
    """
    shown = text if text is not None else sizes
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise UsageError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    if any(not isinstance(v, numbers.Integral) or (v < 1 and v != -1) for v in sizes.values()):
        raise UsageError(f"mesh {shown}: sizes are integers >= 1 (or -1: the rest of the devices)")
    if list(sizes.values()).count(-1) > 1:
        raise UsageError("at most one mesh axis may be -1")
    return sizes


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,model=2' -> {'fsdp': 4, 'model': 2}, its syntax, axes and sizes checked (`check_mesh`); pure
    Python, so the command line checks a --mesh before jax loads.

    Args:
        text: comma-separated NAME=SIZE pairs.

    Example:
        >>> parse_mesh("fsdp=4, model=2")
        {'fsdp': 4, 'model': 2}
    """
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        try:
            size = int(value)
        except ValueError:
            size = None
        if not eq or size is None:
            raise UsageError(f"bad mesh axis {part!r}: expected NAME=SIZE, e.g. fsdp=8,model=2")
        if name in sizes:
            raise UsageError(f"mesh {text}: axis {name} given twice")
        sizes[name] = size
    return check_mesh(sizes, text)
