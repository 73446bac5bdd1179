"""The building blocks of the PE towers: dense layers with logical axis names, LayerNorm in float32,
attention with 2D RoPE, the residual block, the scanned (stacked-layer) transformer and attention pooling.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `head_dim`, `vocab`, `proj`,
`layers`); `pe_jax.sharding` maps them onto a mesh. Parameter names follow the reference so that the
checkpoint key table reads 1:1.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_jax.attention import dot_product_attention
from pe_jax.config import Execution

LN_EPS = 1e-5


def param(value, names: Sequence[str | None]) -> nnx.Param:
    """A parameter with logical axis names; sharding is applied outside the model (pe_jax.sharding)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def l2_normalize(x, axis: int = -1):
    """x / max(||x||, 1e-12) in float32, like torch F.normalize: the one L2 normalization of pe_jax."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


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
        self.kernel = param(init(rngs.params(), in_shape + out_shape, cfg.param_dtype), names)
        self.bias = param(jnp.zeros(out_shape, cfg.param_dtype), names[n_in:]) if use_bias else None
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
        self.weight = param(jnp.ones((dim,), cfg.param_dtype), ("embed",))
        self.bias = param(jnp.zeros((dim,), cfg.param_dtype), ("embed",))
        self.dtype = cfg.dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float, cfg: Execution):
        self.gamma = param(jnp.full((dim,), init_value, cfg.param_dtype), ("embed",))

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
    """A stack of blocks with parameters stacked on a leading `layers` axis, applied with jax.lax.scan."""

    def __init__(self, width, layers, heads, mlp_dim, cfg: Execution, *, ls_init_value=None, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return ResidualAttentionBlock(width, heads, mlp_dim, ls_init_value, cfg, rngs=rngs)

        self.resblocks = make(rngs)
        self.layers = layers
        self.remat_policy = cfg.remat_policy

    def __call__(self, x, *, rope=None, is_causal=False, start: int = 0, stop: int | None = None):
        """Runs blocks [start, stop).

        A pure `jax.lax.scan` over the stacked state, each step merging one block: unlike `nnx.scan`, this
        never lifts the module's Variables into a transform, so a model closed over by plain `jax.jit`,
        `jax.make_jaxpr` or `jax.export` (created outside that trace) runs too.
        """
        stop = self.layers if stop is None else stop
        graphdef, state = nnx.split(self.resblocks)
        if (start, stop) != (0, self.layers):
            state = jax.tree.map(lambda a: a[start:stop], state)

        def body(x, block_state):
            # copy=True: fresh Variables at this trace level, never the (outer) originals.
            return nnx.merge(graphdef, block_state, copy=True)(x, rope, is_causal), None

        if self.remat_policy != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat_policy), prevent_cse=False)
        return jax.lax.scan(body, x, state)[0]


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
        self.probe = param(jax.random.normal(rngs.params(), (1, 1, width), cfg.param_dtype), (None, None, "embed"))
        self.attn = Attention(width, heads, cfg, rngs=rngs)
        self.layernorm = LayerNorm(width, cfg)
        self.mlp = MLP(width, width * mlp_ratio, cfg, rngs=rngs)

    def __call__(self, x):
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], *self.probe.shape[1:]))
        x = self.attn.pool(probe, x)
        return x + self.mlp(self.layernorm(x))
