"""The model's single attention entry point, with a backend switch.

Layout is [batch, tokens, heads, head_dim] (BTNH) throughout. The softmax always runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# cuDNN's fused attention takes half-precision inputs and head dims that are multiples of 8 up to 128
# on every GPU generation we target (Hopper allows 256; the 192-wide G/14 pooling head falls back to XLA
# elsewhere, so we keep the portable bound).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
    """Turns "auto" into the concrete backend for this platform, dtype and head size."""
    if implementation != "auto":
        return implementation
    cudnn_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= _CUDNN_MAX_HEAD_DIM
    )
    return "cudnn" if cudnn_ok else "xla"


def dot_product_attention(q, k, v, *, is_causal: bool = False, implementation: str = "xla"):
    """Scaled dot-product attention, scale head_dim**-0.5. q: [B, Tq, H, D], k/v: [B, Tk, H, D]."""
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}; use 'xla', 'cudnn' or 'auto'")
    return _xla_attention(q, k, v, is_causal)


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
