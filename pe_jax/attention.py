"""The model's single attention entry point, with a backend switch.

Layout is [batch, tokens, heads, head_dim] (BTNH) throughout. The softmax always runs in float32.
Backends: "xla" (portable matmuls), "cudnn" (fused, GPU) and "splash" (Pallas kernel, TPU); "auto" picks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pe_jax.errors import UsageError
from pe_jax.sharding import activation_spec

# cuDNN's fused attention takes half-precision inputs and head dims that are multiples of 8 up to 128
# on every GPU generation we target (Hopper allows 256; the 192-wide G/14 pooling head falls back to XLA
# elsewhere, so we keep the portable bound).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128

# Splash tiles both sequence axes in blocks of 128 (its default block sizes), so we pad tokens to this.
_SPLASH_BLOCK = 128


# The platform a program is being compiled for when that is not this process's (ahead of time, from a CPU host):
# "auto" then picks that platform's backend, call by call, as it would there.
_COMPILING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("pe_jax_compiling_for", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Within this context, attention="auto" resolves as on `platform` ("tpu", "gpu"), e.g. while tracing a
    program to compile for compile-only TPU devices on a CPU host.

    Example:
        >>> with compiling_for("tpu"):
        ...     resolve_implementation("auto", "bfloat16", 64)
        'splash'
    """
    token = _COMPILING_FOR.set(platform)
    try:
        yield
    finally:
        _COMPILING_FOR.reset(token)


def resolve_implementation(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """Turns "auto" into the concrete backend for `platform` (default: this process's), dtype and head size.

    Args:
        implementation: "auto", or a backend name (returned as is).
        dtype: the compute dtype of q, k, v.
        head_dim: the size of one head.
        platform: "tpu", "gpu" (or "cuda") or "cpu"; compiling ahead of time for another platform names it.

    Example:
        >>> resolve_implementation("auto", "bfloat16", 64, platform="tpu")
        'splash'
    """
    if implementation != "auto":
        return implementation
    platform = platform or _COMPILING_FOR.get() or jax.default_backend()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform == "tpu":
        return "splash"  # takes any dtype, head size and length (we pad), so no further conditions
    cudnn_ok = (
        platform == "gpu"
        and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= _CUDNN_MAX_HEAD_DIM
    )
    return "cudnn" if cudnn_ok else "xla"


def dot_product_attention(q, k, v, *, is_causal: bool = False, implementation: str = "xla"):
    """Scaled dot-product attention, scale head_dim**-0.5. q: [B, Tq, H, D], k/v: [B, Tk, H, D]."""
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, is_causal)
    if impl == "splash":
        # Always the compiled kernel, so jax.export(..., platforms=["tpu"]) from a CPU host lowers the
        # real thing; on CPU call splash_attention(..., interpret=True) directly.
        return splash_attention(q, k, v, is_causal=is_causal)
    if impl != "xla":
        raise UsageError(f"unknown attention implementation {implementation!r}; use 'xla', 'cudnn', 'splash' or 'auto'")
    return _xla_attention(q, k, v, is_causal)


def _cudnn_attention(q, k, v, is_causal: bool):
    """cuDNN's fused attention. Its backward refuses odd token counts (a ViT with a class token has 197, 577 or
    1025; the pooling head one query), found compiling the finetuning step for H100: tokens are padded to an
    even count, padded keys masked by length (no bias tensor), padded queries sliced off."""
    (b, tq), tk = q.shape[:2], k.shape[1]
    if tq % 2 == 0 and tk % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    pad = lambda a, t: jnp.pad(a, ((0, 0), (0, t - a.shape[1]), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        pad(q, tq + tq % 2), pad(k, tk + tk % 2), pad(v, tk + tk % 2), is_causal=is_causal,
        query_seq_lengths=jnp.full((b,), tq, jnp.int32), key_value_seq_lengths=jnp.full((b,), tk, jnp.int32),
        implementation="cudnn")
    return out[:, :tq]


def _xla_attention(q, k, v, is_causal: bool):
    """Softmax attention as batched matmuls in [B, H, T, D] layout, float32 logits and normalizer.

    Normalizing after the value matmul (dividing [.., Tq, D] instead of [.., Tq, Tk]) and the head-major
    layout make this ~3x faster on CPU than jax.nn.dot_product_attention's XLA path, with the same math.
    """
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
    if is_causal:
        tq, tk = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((tq, tk), bool), tk - tq), logits, -jnp.inf)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / weights.sum(-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def splash_attention(q, k, v, *, is_causal: bool = False, interpret: bool = False):
    """Pallas TPU splash attention with dot_product_attention's contract; interpret=True runs it on CPU.

    Tokens are padded to a multiple of the block size, padded keys are masked out by a static mask and
    padded queries are sliced off, so any length works (the 1-query pooling head included). Under a mesh
    (`jax.set_mesh`) the kernel runs per shard inside a `shard_map`: XLA cannot partition a Mosaic kernel
    itself, so batch and heads are split as the sharding rules split activations, tokens never.

    Args:
        q: [batch, query tokens, heads, head_dim].
        k, v: [batch, key tokens, heads, head_dim].
        is_causal: mask future keys (aligned bottom-right, as the XLA path).
        interpret: run the kernel in Pallas' interpreter (any platform; slow).

    Example:
        >>> q = k = v = jnp.ones((1, 4, 2, 8))
        >>> splash_attention(q, k, v, interpret=True).shape
        (1, 4, 2, 8)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q, k, v, is_causal=is_causal, interpret=interpret)
    spec = activation_spec(mesh, ("batch", None, "heads", None), q.shape)
    local = functools.partial(_splash_local, is_causal=is_causal, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, is_causal: bool, interpret: bool):
    """The kernel over the (local) arrays it is given: every example and head present."""
    (_, tq, h, d), tk = q.shape, k.shape[1]
    tq_pad, tk_pad = (-(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK for t in (tq, tk))
    # The kernel applies no scale; fold it into q (in float32, before any rounding to q's dtype).
    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    q, k, v = (
        jnp.pad(a, ((0, 0), (0, t - a.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # -> [B, H, T, D]
        for a, t in ((q, tq_pad), (k, tk_pad), (v, tk_pad))
    )
    kernel = splash_kernel.make_splash_mha_single_device(
        _splash_mask(h, tq, tk, tq_pad, tk_pad, is_causal), interpret=interpret
    )
    # Mosaic has no float32-precision matmul of half-precision operands: a global "highest" matmul precision
    # (as parity work sets) would make the kernel fail to compile on TPU, so half inputs use the default.
    half = jnp.dtype(q.dtype).itemsize < 4
    with jax.default_matmul_precision("default") if half else contextlib.nullcontext():
        out = jax.vmap(kernel)(q, k, v)  # the kernel is per example: [H, T, D]
    return out[:, :, :tq].transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=32)
def _splash_mask(heads: int, tq: int, tk: int, tq_pad: int, tk_pad: int, is_causal: bool):
    """Static [heads, tq_pad, tk_pad] mask: real keys only, causal aligned bottom-right like the XLA path.

    Padded query rows see every real key (never an empty row, so no NaNs even in gradients). Blocks that
    are all padding are skipped by the kernel. Cached: it is hashed into splash's own mask-info cache.
    """
    rows, cols = np.arange(tq_pad)[:, None], np.arange(tk_pad)[None, :]
    mask = np.broadcast_to(cols < tk, (tq_pad, tk_pad))
    if is_causal:
        mask = mask & (cols <= rows + (tk - tq))
    return splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask)] * heads)
