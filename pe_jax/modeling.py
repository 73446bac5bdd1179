"""Perception Encoder in Flax NNX: the vision tower, the text tower and CLIP.

Layout follows JAX (images NHWC); parameter names follow the reference
(facebookresearch/perception_models `core/vision_encoder/pe.py`) so that the weight table reads 1:1.
Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `head_dim`, `vocab`, `proj`,
`layers`); a rules table elsewhere maps them onto a mesh. Transformer blocks are stacked on a `layers`
axis and run with `nnx.scan`, optionally under `nnx.remat`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_jax.attention import dot_product_attention
from pe_jax.config import CLIPConfig, Execution, TextConfig, VisionConfig, clip_config, vision_config

LN_EPS = 1e-5


def _param(value, names: Sequence[str | None]) -> nnx.Param:
    # Sharding is applied outside the model (pe_jax.sharding), never eagerly at construction.
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


class Dense(nnx.Module):
    """y = x . kernel + bias, contracting the trailing `len(in_shape)` axes of x.

    Kernels keep their structure ([embed, 3, heads, head_dim] for a fused q|k|v projection) so that
    heads can be sharded without a reshape.
    """

    def __init__(self, in_shape, out_shape, names, cfg: Execution, *, use_bias=True, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        n_in, n = len(in_shape), len(in_shape) + len(out_shape)
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n)))
        self.kernel = _param(init(rngs.params(), in_shape + out_shape, cfg.param_dtype), names)
        self.bias = _param(jnp.zeros(out_shape, cfg.param_dtype), names[n_in:]) if use_bias else None
        self.n_in = n_in
        self.dtype = cfg.dtype

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype."""

    def __init__(self, dim: int, cfg: Execution):
        self.weight = _param(jnp.ones((dim,), cfg.param_dtype), ("embed",))
        self.bias = _param(jnp.zeros((dim,), cfg.param_dtype), ("embed",))
        self.dtype = cfg.dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float, cfg: Execution):
        self.gamma = _param(jnp.full((dim,), init_value, cfg.param_dtype), ("embed",))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, cfg: Execution, *, rngs: nnx.Rngs):
        self.c_fc = Dense((width,), (hidden,), ("embed", "mlp"), cfg, rngs=rngs)
        self.c_proj = Dense((hidden,), (width,), ("mlp", "embed"), cfg, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class Attention(nnx.Module):
    """Multi-head attention with a fused q|k|v projection, as nn.MultiheadAttention lays it out."""

    def __init__(self, width: int, heads: int, cfg: Execution, *, rngs: nnx.Rngs):
        head_dim = width // heads
        self.in_proj = Dense((width,), (3, heads, head_dim), ("embed", None, "heads", "head_dim"), cfg, rngs=rngs)
        self.out_proj = Dense((heads, head_dim), (width,), ("heads", "head_dim", "embed"), cfg, rngs=rngs)
        self.implementation = cfg.attention

    def __call__(self, x, *, rope=None, is_causal=False):
        q, k, v = jnp.unstack(self.in_proj(x), axis=2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = dot_product_attention(q, k, v, is_causal=is_causal, implementation=self.implementation)
        return self.out_proj(out)

    def pool(self, probe, x):
        """Cross-attention of a learned probe over tokens x (the attention-pooling head)."""
        kernel, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
        dtype = self.in_proj.dtype
        q = jnp.einsum("bpd,dhk->bphk", probe.astype(dtype), kernel[:, 0].astype(dtype)) + bias[0].astype(dtype)
        kv = jnp.einsum("btd,dshk->btshk", x.astype(dtype), kernel[:, 1:].astype(dtype)) + bias[1:].astype(dtype)
        out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], implementation=self.implementation)
        return self.out_proj(out)


class ResidualAttentionBlock(nnx.Module):
    def __init__(self, width, heads, mlp_dim, ls_init_value, cfg: Execution, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(width, cfg)
        self.attn = Attention(width, heads, cfg, rngs=rngs)
        self.ln_2 = LayerNorm(width, cfg)
        self.mlp = MLP(width, mlp_dim, cfg, rngs=rngs)
        use_ls = ls_init_value is not None
        self.ls_1 = LayerScale(width, ls_init_value, cfg) if use_ls else None
        self.ls_2 = LayerScale(width, ls_init_value, cfg) if use_ls else None

    def __call__(self, x, rope=None, is_causal=False):
        h = self.attn(self.ln_1(x), rope=rope, is_causal=is_causal)
        x = x + (self.ls_1(h) if self.ls_1 is not None else h)
        h = self.mlp(self.ln_2(x))
        return x + (self.ls_2(h) if self.ls_2 is not None else h)


def _remat_policy(name: str):
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


class Transformer(nnx.Module):
    """A stack of blocks with parameters stacked on a leading `layers` axis, applied with nnx.scan."""

    def __init__(self, width, layers, heads, mlp_dim, cfg: Execution, *, ls_init_value=None, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return ResidualAttentionBlock(width, heads, mlp_dim, ls_init_value, cfg, rngs=rngs)

        self.resblocks = make(rngs)
        self.layers = layers
        self.remat_policy = cfg.remat_policy

    def __call__(self, x, *, rope=None, is_causal=False, start: int = 0, stop: int | None = None):
        """Runs blocks [start, stop)."""
        stop = self.layers if stop is None else stop
        blocks = self.resblocks
        if (start, stop) != (0, self.layers):
            graphdef, state = nnx.split(blocks)
            blocks = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))

        def body(block, x):
            return block(x, rope, is_causal)

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=_remat_policy(self.remat_policy), prevent_cse=False)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(block, x):
            return body(block, x)

        return run(blocks, x)


# ----------------------------------------------------------------------------------------------------
# 2D RoPE and position-embedding resampling: static functions of the token grid, built in numpy.
# ----------------------------------------------------------------------------------------------------


def rope_angles(head_dim: int, grid_h: int, grid_w: int, use_cls_token: bool) -> np.ndarray:
    """Rotation angles [tokens, head_dim], float32, exactly as the reference Rope2D.

    The first half of each head rotates by the column index, the second half by the row index; pairs
    are interleaved. Patch positions start at 1 when a class token is present (which gets angle 0).
    """
    dim = head_dim // 2  # per axis
    bands = 1.0 / (np.float32(10000) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)))
    offset = 1 if use_cls_token else 0
    per_axis = lambda n: np.repeat(np.arange(offset, n + offset, dtype=np.float32)[:, None] * bands, 2, axis=-1)
    fx = np.broadcast_to(per_axis(grid_w)[None, :], (grid_h, grid_w, dim))
    fy = np.broadcast_to(per_axis(grid_h)[:, None], (grid_h, grid_w, dim))
    angles = np.concatenate([fx, fy], axis=-1).reshape(grid_h * grid_w, head_dim)
    if use_cls_token:
        angles = np.concatenate([np.zeros((1, head_dim), np.float32), angles])
    return angles.astype(np.float32)


def apply_rope(x, angles):
    """Rotates interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x: [B, T, H, D]."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    return (xf * cos + rotated * sin).astype(x.dtype)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's bilinear interpolation, align_corners=False, no antialias."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in))
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Towers
# ----------------------------------------------------------------------------------------------------


class AttentionPooling(nnx.Module):
    """A learned probe attends over the tokens, then a residual MLP; no residual around the attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, cfg: Execution, *, rngs: nnx.Rngs):
        self.probe = _param(jax.random.normal(rngs.params(), (1, 1, width), cfg.param_dtype), (None, None, "embed"))
        self.attn = Attention(width, heads, cfg, rngs=rngs)
        self.layernorm = LayerNorm(width, cfg)
        self.mlp = MLP(width, width * mlp_ratio, cfg, rngs=rngs)

    def __call__(self, x):
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], *self.probe.shape[1:]))
        x = self.attn.pool(probe, x)
        return x + self.mlp(self.layernorm(x))


class VisionTransformer(nnx.Module):
    """The PE vision tower. Input: images [B, H, W, 3], float, normalized; H and W multiples of the patch."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d, p = cfg.width, cfg.patch_size
        self.conv1 = Dense((p, p, 3), (d,), (None, None, None, "embed"), cfg, use_bias=False, rngs=rngs)
        scale = d**-0.5
        if cfg.use_cls_token:
            self.class_embedding = _param(scale * jax.random.normal(rngs.params(), (d,), cfg.param_dtype), ("embed",))
        if cfg.use_abs_posemb:
            n = int(cfg.use_cls_token) + cfg.grid_size**2
            self.positional_embedding = _param(
                scale * jax.random.normal(rngs.params(), (n, d), cfg.param_dtype), (None, "embed"))
        self.ln_pre = LayerNorm(d, cfg) if cfg.use_ln_pre else None
        self.transformer = Transformer(d, cfg.layers, cfg.heads, cfg.mlp_dim, cfg,
                                       ls_init_value=cfg.ls_init_value, rngs=rngs)
        self.ln_post = LayerNorm(d, cfg) if cfg.use_ln_post else None
        self.attn_pool = (AttentionPooling(d, cfg.attn_pooler_heads, cfg.attn_pooler_mlp_ratio, cfg, rngs=rngs)
                          if cfg.pool_type == "attn" else None)
        if cfg.output_dim is not None:
            self.proj = _param(scale * jax.random.normal(rngs.params(), (d, cfg.output_dim), cfg.param_dtype),
                               ("embed", "proj"))

    @classmethod
    def from_config(cls, name: str, checkpoint=None, *, seed: int = 0, mesh=None, strategy: str = "fsdp",
                    **overrides) -> VisionTransformer:
        """Builds preset `name` (fields replaced by `overrides`); loads `checkpoint` (a pe_jax checkpoint,
        a PyTorch file or state dict) when given; shards over `mesh` by `strategy` (see pe_jax.sharding)."""
        return _build(cls, vision_config(name, **overrides), checkpoint, seed, mesh, strategy)

    # -- embedding ------------------------------------------------------------------------------------

    def _check_images(self, images):
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] (NHWC), got shape {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"images must be floating point (normalized), got dtype {images.dtype}")
        h, w = images.shape[1:3]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")

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
            raise ValueError(f"layer_idx {layer_idx} out of range for {n} layers")
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
    """The PE text tower: causal transformer pooled at the end-of-text token (the largest id)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.width
        self.token_embedding = _param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, d), cfg.param_dtype),
                                      ("vocab", "embed"))
        self.positional_embedding = _param(
            0.01 * jax.random.normal(rngs.params(), (cfg.context_length, d), cfg.param_dtype), (None, "embed"))
        self.transformer = Transformer(d, cfg.layers, cfg.heads, cfg.mlp_dim, cfg, rngs=rngs)
        self.ln_final = LayerNorm(d, cfg)
        self.text_projection = _param(
            d**-0.5 * jax.random.normal(rngs.params(), (d, cfg.output_dim), cfg.param_dtype), ("embed", "proj"))

    def _check_tokens(self, tokens):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, context_length], got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {cfg.context_length}")

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


def _l2_normalize(x):
    # Like torch F.normalize: divide by max(norm, eps).
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nnx.Module):
    """PE-Core CLIP: a vision tower, a text tower and a learned logit scale."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, rngs=rngs)
        self.text = TextTransformer(cfg.text, rngs=rngs)
        self.logit_scale = _param(jnp.asarray(cfg.init_logit_scale, jnp.float32), ())

    @classmethod
    def from_config(cls, name: str, checkpoint=None, *, seed: int = 0, mesh=None, strategy: str = "fsdp",
                    **overrides) -> CLIP:
        """Builds preset `name`; loads `checkpoint` when given; shards over `mesh` by `strategy`.
        See `pe_jax.config.clip_config` for overrides."""
        return _build(cls, clip_config(name, **overrides), checkpoint, seed, mesh, strategy)

    def encode_image(self, images, normalize: bool = False):
        x = self.visual(images)
        return _l2_normalize(x) if normalize else x

    def encode_text(self, tokens, normalize: bool = False):
        x = self.text(tokens)
        return _l2_normalize(x) if normalize else x

    def encode_video(self, video, normalize: bool = False):
        """Mean of the frame embeddings of video [B, T, H, W, 3]; frames are normalized first if asked."""
        if video.ndim != 5:
            raise ValueError(f"video must be [batch, frames, height, width, 3], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        frames = self.encode_image(video.reshape(b * t, *video.shape[2:]), normalize=normalize)
        return frames.reshape(b, t, -1).mean(axis=1)

    def __call__(self, images, tokens):
        """(normalized image features, normalized text features, exp(logit_scale)), as the reference forward."""
        return (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
                jnp.exp(self.logit_scale[...]))


def _build(cls, cfg, checkpoint, seed: int, mesh=None, strategy: str = "fsdp"):
    """Random init or checkpoint, on one device or directly sharded over `mesh` by `strategy`.

    Nothing is allocated twice: a checkpoint fills an abstract skeleton (`nnx.eval_shape`), and a sharded
    random init runs inside `jax.jit` with output shardings, so no device holds the unsharded model.
    """
    from pe_jax import sharding as sh
    from pe_jax.checkpoint import load

    ctor = lambda: cls(cfg, rngs=nnx.Rngs(seed))
    skeleton = nnx.eval_shape(ctor)
    shardings = None
    if mesh is not None:
        sh.check_strategy(strategy)
        shardings = sh.param_shardings(skeleton, mesh, strategy)
    if checkpoint is not None:
        return load(skeleton, checkpoint, shardings=shardings)
    graphdef, abstract = nnx.split(skeleton)
    out_shardings = sh.state_shardings(abstract, mesh, strategy) if mesh is not None else None
    # Initializing inside jit is also much faster than eagerly, op by op.
    state = jax.jit(lambda: nnx.state(ctor()), out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


