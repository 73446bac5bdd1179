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
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}; use 'xla', 'cudnn' or 'auto'")
    # jax's XLA path computes the logits and the softmax in float32 whatever the input dtype.
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
