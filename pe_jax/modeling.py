"""Perception Encoder in Flax NNX: the vision tower, the text tower and CLIP.

Layout follows JAX (images NHWC); parameter names follow the reference
(facebookresearch/perception_models `core/vision_encoder/pe.py`) so that the weight table reads 1:1.
The blocks (`pe_jax.layers`) are stacked on a `layers` axis and run with `jax.lax.scan` (plain JAX can
close over a model), optionally under `jax.checkpoint`. This module does no I/O: `from_config(checkpoint=...)`
hands an abstract skeleton to `pe_jax.checkpoints.load.load_into`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pe_jax.config import CLIPConfig, TextConfig, VisionConfig, clip_config, vision_config
from pe_jax.errors import UsageError, WrongType
from pe_jax.layers import (
    AttentionPooling,
    Dense,
    LayerNorm,
    Transformer,
    bilinear_matrix,
    l2_normalize,
    param,
    rope_angles,
)


class VisionTransformer(nnx.Module):
    """The PE vision tower. Input: images [B, H, W, 3], float, normalized; H and W multiples of the patch.

    Args:
        cfg: its config (`pe_jax.config.vision_config`); `from_config` builds a preset and loads weights.
        rngs: the random init's keys.

    Example:
        >>> import jax.numpy as jnp
        >>> vit = VisionTransformer.from_config("PE-Core-T16-384", layers=1, image_size=32)
        >>> vit(jnp.zeros((2, 32, 32, 3))).shape
        (2, 512)
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d, p = cfg.width, cfg.patch_size
        self.conv1 = Dense((p, p, 3), (d,), (None, None, None, "embed"), cfg, use_bias=False, rngs=rngs)
        scale = d**-0.5
        if cfg.use_cls_token:
            self.class_embedding = param(scale * jax.random.normal(rngs.params(), (d,), cfg.param_dtype), ("embed",))
        if cfg.use_abs_posemb:
            n = int(cfg.use_cls_token) + cfg.grid_size**2
            self.positional_embedding = param(
                scale * jax.random.normal(rngs.params(), (n, d), cfg.param_dtype), (None, "embed"))
        self.ln_pre = LayerNorm(d, cfg) if cfg.use_ln_pre else None
        self.transformer = Transformer(d, cfg.layers, cfg.heads, cfg.mlp_dim, cfg,
                                       ls_init_value=cfg.ls_init_value, rngs=rngs)
        self.ln_post = LayerNorm(d, cfg) if cfg.use_ln_post else None
        self.attn_pool = (AttentionPooling(d, cfg.attn_pooler_heads, cfg.attn_pooler_mlp_ratio, cfg, rngs=rngs)
                          if cfg.pool_type == "attn" else None)
        if cfg.output_dim is not None:
            self.proj = param(scale * jax.random.normal(rngs.params(), (d, cfg.output_dim), cfg.param_dtype),
                               ("embed", "proj"))

    @classmethod
    def from_config(cls, name: str, checkpoint=None, *, seed: int = 0, mesh=None, strategy: str = "fsdp",
                    verify: bool | None = None, **overrides) -> VisionTransformer:
        """Builds preset `name` (fields replaced by `overrides`); loads `checkpoint` (a pe_jax checkpoint,
        a PyTorch file or state dict) when given; shards over `mesh` by `strategy` (see pe_jax.sharding).
        A pe_jax checkpoint is verified first unless `verify=False` (see pe_jax.checkpoints.verify)."""
        return build(cls, vision_config(name, **overrides), checkpoint, seed, mesh, strategy, verify)

    # -- embedding ------------------------------------------------------------------------------------

    def _check_images(self, images):
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UsageError(f"images must be [batch, height, width, 3] (NHWC), got shape {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise WrongType(f"images must be floating point (normalized), got dtype {images.dtype}")
        h, w = images.shape[1:3]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise UsageError(f"image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")

    def _sample_abs_posemb(self, grid_h: int, grid_w: int):
        """The position embedding, bilinearly resampled to the grid (class row kept), as the reference."""
        cfg, pos = self.config, self.positional_embedding[...]
        g = cfg.grid_size
        if (grid_h, grid_w) == (g, g):
            return pos
        cls_row, grid = (pos[:1], pos[1:]) if cfg.use_cls_token else (pos[:0], pos)
        grid = grid.reshape(g, g, -1).astype(jnp.float32)
        grid = jnp.einsum("hi,wj,ijd->hwd", bilinear_matrix(g, grid_h), bilinear_matrix(g, grid_w), grid,
                          precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([cls_row, grid.reshape(grid_h * grid_w, -1).astype(pos.dtype)])

    def _embed(self, images):
        """Patch embedding, class token and position embedding. Returns tokens and RoPE angles."""
        self._check_images(images)
        cfg = self.config
        b, h, w, _ = images.shape
        p, gh, gw = cfg.patch_size, h // cfg.patch_size, w // cfg.patch_size
        patches = images.reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p, p, 3)
        x = self.conv1(patches)
        if cfg.use_cls_token:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        if cfg.use_abs_posemb:
            x = x + self._sample_abs_posemb(gh, gw).astype(x.dtype)
        rope = jnp.asarray(rope_angles(cfg.head_dim, gh, gw, cfg.use_cls_token)) if cfg.use_rope2d else None
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return x, rope

    def _layer_stop(self, layer_idx: int) -> int:
        n = self.config.layers
        if not -n <= layer_idx < n:
            raise UsageError(f"layer_idx {layer_idx} out of range for {n} layers")
        return layer_idx % n + 1

    def _finish_tokens(self, x, norm: bool, strip_cls_token: bool):
        if norm and self.ln_post is not None:
            x = self.ln_post(x)
        if strip_cls_token and self.config.use_cls_token:
            x = x[:, 1:]
        return x

    # -- public API -----------------------------------------------------------------------------------

    def forward_features(self, images, norm: bool = False, layer_idx: int = -1, strip_cls_token: bool = False):
        """Token features [B, tokens, width] after block `layer_idx` (negative counts from the end)."""
        x, rope = self._embed(images)
        x = self.transformer(x, rope=rope, stop=self._layer_stop(layer_idx))
        return self._finish_tokens(x, norm, strip_cls_token)

    def forward_intermediates(self, images, layer_indices: Sequence[int], norm: bool = False,
                              strip_cls_token: bool = False) -> list:
        """Token features of several layers from one pass, in the order of `layer_indices`.

        The scan is split at the requested layers, so nothing beyond the deepest one runs and no
        per-layer stack of activations is kept.
        """
        stops = sorted({self._layer_stop(i) for i in layer_indices})
        x, rope = self._embed(images)
        found, start = {}, 0
        for stop in stops:
            x = self.transformer(x, rope=rope, start=start, stop=stop)
            found[stop], start = x, stop
        return [self._finish_tokens(found[self._layer_stop(i)], norm, strip_cls_token) for i in layer_indices]

    def pool(self, x):
        """Pooling and projection of final token features (after ln_post)."""
        cfg = self.config
        if cfg.pool_type == "tok":
            x = x[:, 0]
        elif cfg.pool_type == "avg":
            x = x.mean(axis=1)
        elif cfg.pool_type == "attn":
            x = self.attn_pool(x)[:, 0]
        if cfg.output_dim is not None:
            x = x @ self.proj[...].astype(x.dtype)
        return x

    def __call__(self, images, layer_idx: int = -1):
        """Pooled, projected embedding [B, output_dim] (token features [B, T, width] for pool_type 'none')."""
        return self.pool(self.forward_features(images, norm=True, layer_idx=layer_idx))


class TextTransformer(nnx.Module):
    """The PE text tower: causal transformer pooled at the end-of-text token (the largest id).

    Args:
        cfg: its config (`pe_jax.config.clip_config(name).text`).
        rngs: the random init's keys.

    Example:
        >>> from pe_jax.preprocess import get_text_tokenizer
        >>> model = CLIP.from_config("PE-Core-T16-384", vision_layers=1, text_layers=1, vision_image_size=32)
        >>> model.text(get_text_tokenizer(32)(["a photo of a cat"])).shape  # a CLIP's text tower
        (1, 512)
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.width
        self.token_embedding = param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, d), cfg.param_dtype),
                                      ("vocab", "embed"))
        self.positional_embedding = param(
            0.01 * jax.random.normal(rngs.params(), (cfg.context_length, d), cfg.param_dtype), (None, "embed"))
        self.transformer = Transformer(d, cfg.layers, cfg.heads, cfg.mlp_dim, cfg, rngs=rngs)
        self.ln_final = LayerNorm(d, cfg)
        self.text_projection = param(
            d**-0.5 * jax.random.normal(rngs.params(), (d, cfg.output_dim), cfg.param_dtype), ("embed", "proj"))

    def _check_tokens(self, tokens):
        cfg = self.config
        if tokens.ndim != 2:
            raise UsageError(f"tokens must be [batch, context_length], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise WrongType(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > cfg.context_length:
            raise UsageError(f"{tokens.shape[1]} tokens exceed the context length {cfg.context_length}")

    def __call__(self, tokens):
        """Projected text embedding [B, output_dim] from token ids [B, T], T <= context_length."""
        self._check_tokens(tokens)
        cfg = self.config
        x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(cfg.dtype)
        x = x + self.positional_embedding[: tokens.shape[1]].astype(cfg.dtype)
        x = self.transformer(x, is_causal=True)
        x = self.ln_final(x)
        pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=-1)[:, None, None], axis=1)[:, 0]
        return pooled @ self.text_projection[...].astype(pooled.dtype)


class CLIP(nnx.Module):
    """PE-Core CLIP: a vision tower, a text tower and a learned logit scale.

    Args:
        cfg: its config (`pe_jax.config.clip_config`); `from_config` builds a preset and loads weights.
        rngs: the random init's keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from pe_jax.preprocess import get_text_tokenizer
        >>> model = CLIP.from_config("PE-Core-T16-384", vision_layers=1, text_layers=1, vision_image_size=32)
        >>> image = model.encode_image(jnp.zeros((2, 32, 32, 3)), normalize=True)
        >>> text = model.encode_text(get_text_tokenizer(32)(["a red circle"]), normalize=True)
        >>> image.shape, text.shape, (image @ text.T).shape
        ((2, 512), (1, 512), (2, 1))
    """

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, rngs=rngs)
        self.text = TextTransformer(cfg.text, rngs=rngs)
        self.logit_scale = param(jnp.asarray(cfg.init_logit_scale, jnp.float32), ())

    @classmethod
    def from_config(cls, name: str, checkpoint=None, *, seed: int = 0, mesh=None, strategy: str = "fsdp",
                    verify: bool | None = None, **overrides) -> CLIP:
        """Builds preset `name`; loads `checkpoint` when given (verified unless `verify=False`); shards over
        `mesh` by `strategy`. See `pe_jax.config.clip_config` for overrides."""
        return build(cls, clip_config(name, **overrides), checkpoint, seed, mesh, strategy, verify)

    def encode_image(self, images, normalize: bool = False):
        x = self.visual(images)
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens, normalize: bool = False):
        x = self.text(tokens)
        return l2_normalize(x) if normalize else x

    def encode_video(self, video, normalize: bool = False):
        """Mean of the frame embeddings of video [B, T, H, W, 3]; frames are normalized first if asked."""
        if video.ndim != 5:
            raise UsageError(f"video must be [batch, frames, height, width, 3], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        frames = self.encode_image(video.reshape(b * t, *video.shape[2:]), normalize=normalize)
        return frames.reshape(b, t, -1).mean(axis=1)

    def __call__(self, images, tokens):
        """(normalized image features, normalized text features, exp(logit_scale)), as the reference forward."""
        return (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
                jnp.exp(self.logit_scale[...]))


def build(cls, cfg, checkpoint=None, seed: int = 0, mesh=None, strategy: str = "fsdp", verify=None, *,
          naming: str | None = None, metadata: dict | None = None):
    """Random init or checkpoint, on one device or directly sharded over `mesh` by `strategy`. Which class and
    config a checkpoint needs is decided above this (pe_jax.pretrained.resolve_model, which also passes the
    checkpoint's `naming` and `metadata` on to `load_into`, so they are not looked up again).

    Nothing is allocated twice: a checkpoint fills an abstract skeleton (`nnx.eval_shape`), and a sharded
    random init runs inside `jax.jit` with output shardings, so no device holds the unsharded model.
    """
    from pe_jax import sharding as sh
    from pe_jax.checkpoints.load import load_into

    ctor = lambda: cls(cfg, rngs=nnx.Rngs(seed))
    skeleton = nnx.eval_shape(ctor)
    shardings = None
    if mesh is not None:
        sh.check_strategy(strategy)
        shardings = sh.param_shardings(skeleton, mesh, strategy)
    if checkpoint is not None:
        return load_into(skeleton, checkpoint, shardings, verify=verify, naming=naming, metadata=metadata)
    graphdef, abstract = nnx.split(skeleton)
    out_shardings = sh.state_shardings(abstract, mesh, strategy) if mesh is not None else None
    # Initializing inside jit is also much faster than eagerly, op by op.
    state = jax.jit(lambda: nnx.state(ctor()), out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
