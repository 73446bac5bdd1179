"""Optimizers for finetuning: gradient clipping, AdamW or LAMB with weight decay on matrices only, BEiT
layer-wise learning-rate decay over the stacked `layers` axis, and the warmup-cosine schedule."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from pe_jax.errors import UsageError


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params) -> object:
    """Weight decay on matrices only: no decay on norms, biases, embeddings, probe, logit scale."""
    def keep(path, leaf):
        name = _path_name(path)
        no_decay = ("embedding", "probe", "logit_scale", "logit_bias", "bias", "ln_", "layernorm", "ls_")
        return leaf.ndim >= 2 and not any(n in name for n in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


# Parameters below the first block: they take the smallest layer-wise learning rate.
_EMBEDDING = re.compile(r"(^|\.)(conv1|class_embedding|positional_embedding|ln_pre|token_embedding)(\.|$)")


def layer_decay(decay: float) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay (BEiT): block i of a tower with L blocks is scaled by decay^(L - i),
    the embeddings by decay^(L + 1), everything above the blocks (norms, pooling, heads) by 1.

    Blocks are stacked on a leading `layers` axis, so a stacked update is scaled by a vector along it.
    """
    def scales(updates):
        towers = {}  # tower prefix -> number of blocks
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
            name = _path_name(path)
            if ".transformer.resblocks." in f".{name}":
                towers[name.split("transformer.resblocks")[0]] = leaf.shape[0]

        def scale(path, leaf):
            name = _path_name(path)
            for prefix, n in towers.items():
                if name.startswith(prefix) and "transformer.resblocks" in name:
                    s = decay ** (n - jnp.arange(n, dtype=jnp.float32))
                    return s.reshape((n,) + (1,) * (leaf.ndim - 1))
                if name.startswith(prefix) and _EMBEDDING.search(name[len(prefix):]):
                    return jnp.float32(decay ** (n + 1))
            return jnp.float32(1.0)

        return jax.tree_util.tree_map_with_path(scale, updates)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(learning_rate=1e-5, weight_decay: float = 0.05, clip_norm: float | None = 1.0, *,
                   optimizer: str = "adamw", b1: float = 0.9, b2: float = 0.999, layer_decay_rate: float | None = None):
    """Gradient clipping, AdamW or LAMB (decoupled weight decay on matrices only), then layer-wise decay.

    `learning_rate` is a float or an optax schedule.
    """
    makers = {"adamw": optax.adamw, "lamb": optax.lamb}
    if optimizer not in makers:
        raise UsageError(f"unknown optimizer {optimizer!r}: use one of {sorted(makers)}")
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(makers[optimizer](learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    if layer_decay_rate is not None and layer_decay_rate != 1.0:
        parts.append(layer_decay(layer_decay_rate))
    return optax.chain(*parts)


def warmup_cosine(peak: float, steps: int, warmup_steps: int = 0, end_fraction: float = 0.0):
    """Linear warmup from 0 to `peak`, then cosine decay to `end_fraction * peak` at `steps`."""
    if warmup_steps >= steps:
        return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, steps, end_value=peak * end_fraction)
