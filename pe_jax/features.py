"""Image features of a layer with a pooling: the one definition used by the embedding job, the classifier
and the retrieval layer sweep.

Poolings of the token features after block `layer_idx` (negative counts from the end):
  * ``attn``: the model's own head (attention pooling and projection), i.e. the embedding; last layer only;
  * ``mean``: the mean of the patch tokens after the final norm (the class token left out);
  * ``cls``: the class token after the final norm, for towers that have one.
The default is ``attn`` for the last layer of a tower with a head, else ``mean`` (PE-Lang and PE-Spatial
towers have no head). Functions take a CLIP or a vision tower and are traceable: call them inside `jit`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pe_jax.errors import UsageError
from pe_jax.layers import l2_normalize

POOLINGS = ("attn", "mean", "cls")


def vision_tower(model):
    """The vision tower of a CLIP, or the model itself."""
    return getattr(model, "visual", model)


def _layer(tower, layer_idx: int | None) -> int:
    n = tower.config.layers
    idx = -1 if layer_idx is None else layer_idx
    if not -n <= idx < n:
        raise UsageError(f"layer_idx {layer_idx} out of range for {n} layers")
    return idx % n


def resolve_pooling(model, layer_idx: int | None = None, pooling: str | None = None) -> str:
    """The pooling that `features` applies (the default filled in); a clear error for an invalid pair."""
    tower = vision_tower(model)
    cfg = tower.config
    last = _layer(tower, layer_idx) == cfg.layers - 1
    has_head = cfg.pool_type != "none"
    if pooling is None:
        return "attn" if last and has_head else "mean"
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if pooling == "attn" and not has_head:
        raise UsageError("pooling 'attn' needs a tower with a pooling head; this one returns tokens (use mean or cls)")
    if pooling == "attn" and not last:
        raise UsageError(f"pooling 'attn' is the model's own head, valid for the last layer only (got {layer_idx})")
    if pooling == "cls" and not cfg.use_cls_token:
        raise UsageError("pooling 'cls' needs a class token; this tower has none (use mean)")
    return pooling


def feature_dim(model, layer_idx: int | None = None, pooling: str | None = None) -> int:
    tower = vision_tower(model)
    pooling = resolve_pooling(model, layer_idx, pooling)
    return tower.config.embed_dim if pooling == "attn" else tower.config.width


def _pool(tower, tokens, pooling: str):
    """Pools token features that went through the final norm (class token included)."""
    if pooling == "attn":
        return tower.pool(tokens)
    if pooling == "cls":
        return tokens[:, 0]
    return tokens[:, int(tower.config.use_cls_token):].mean(axis=1)


def features(model, images, *, layer_idx: int | None = None, pooling: str | None = None, normalize: bool = False):
    """[B, D] features of `images` at block `layer_idx` (default: the last) with `pooling` (see the module).

    Args:
        model: a CLIP or a vision tower.
        images: float [B, H, W, 3], preprocessed (`pe_jax.preprocess.get_image_transform`).
        layer_idx: the block (negative: from the end); pooling: attn, mean or cls (`resolve_pooling`).
        normalize: unit-norm rows.

    Example:
        >>> import jax.numpy as jnp
        >>> from pe_jax import VisionTransformer
        >>> vit = VisionTransformer.from_config("PE-Core-T16-384", layers=1, image_size=32)
        >>> features(vit, jnp.zeros((2, 32, 32, 3)), layer_idx=0, pooling="mean").shape  # width: 192
        (2, 192)
    """
    tower = vision_tower(model)
    pooling = resolve_pooling(model, layer_idx, pooling)
    tokens = tower.forward_features(images, norm=True, layer_idx=_layer(tower, layer_idx))
    out = _pool(tower, tokens, pooling)
    return l2_normalize(out) if normalize else out


def layer_features(model, images, pairs: Sequence[tuple[int, str]], *, normalize: bool = False) -> list:
    """Features for several (layer_idx, pooling) pairs from one pass of the tower, in the order of `pairs`."""
    tower = vision_tower(model)
    pairs = [(_layer(tower, i), resolve_pooling(model, i, p)) for i, p in pairs]
    layers = sorted({i for i, _ in pairs})
    tokens = dict(zip(layers, tower.forward_intermediates(images, layer_indices=layers, norm=True), strict=True))
    out = [_pool(tower, tokens[i], p) for i, p in pairs]
    return [l2_normalize(x) for x in out] if normalize else out
