"""Metric-learning losses for retrieval finetuning: supervised contrastive, normalized softmax with a margin
(ArcFace / CosFace) and multi-similarity.

Each takes embeddings `emb` [B, D], expected L2-normalized (the caller normalizes, as `encode_image(...,
normalize=True)` does), and integer class labels [B] (any integers; only equality matters, except for the
normalized softmax, whose labels index `class_weights`). All are pure `jnp`, jit-friendly (no data-dependent
shapes: pair selections are masks) and computed in float32. Under `jit` with a sharded batch the embeddings
are global arrays, so every anchor is compared with the whole global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pe_jax.errors import UsageError

# A finite stand-in for -inf in masked log-sum-exps: exp() of it underflows to 0 and its gradient is 0.
_MASKED = -1e9


def _similarities(emb, labels):
    """(cosine similarity matrix [B, B] in float32, same-class mask without the diagonal, different-class mask)."""
    emb = jnp.asarray(emb, jnp.float32)
    labels = jnp.asarray(labels)
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(labels.shape[0], dtype=bool)
    return sim, same & not_self, ~same


def _log1p_sum_exp(x, mask):
    """log(1 + sum_{j in mask} exp(x_j)) per row, stable; 0 for a row with an empty mask."""
    masked = jnp.where(mask, x, _MASKED)
    with_one = jnp.concatenate([jnp.zeros_like(masked[:, :1]), masked], axis=1)
    return jax.nn.logsumexp(with_one, axis=1)


def supervised_contrastive(emb, labels, temperature: float = 0.1):
    """Supervised contrastive loss, the "L_out" form (Khosla et al. 2020, "Supervised Contrastive Learning",
    eq. 2).

    With s_ij = emb_i . emb_j, A(i) = every other sample of the batch and P(i) = the other samples of i's class:

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) )
        L   = mean of l_i over the anchors with |P(i)| >= 1

    An anchor with no positive in the batch (a class seen once) is left out of the mean (it still appears in
    the others' denominators); a batch with no positive pair at all gives 0.
    """
    sim, positive, _ = _similarities(emb, labels)
    logits = sim / temperature
    not_self = ~jnp.eye(logits.shape[0], dtype=bool)
    log_prob = logits - jax.nn.logsumexp(jnp.where(not_self, logits, _MASKED), axis=1, keepdims=True)
    num_pos = positive.sum(axis=1)
    per_anchor = -jnp.where(positive, log_prob, 0.0).sum(axis=1) / jnp.maximum(num_pos, 1)
    has_pos = num_pos > 0
    return jnp.where(has_pos, per_anchor, 0.0).sum() / jnp.maximum(has_pos.sum(), 1)


def _arcface_target(cos, margin: float):
    """cos(theta + m) for theta = arccos(cos), while theta + m <= pi; past it, where cos(theta + m) would turn
    back up, the linear continuation cos(theta) - m sin(m) (insightface's `th` / `mm`), so the target logit
    keeps falling as theta grows."""
    inside = jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7)  # sin(theta) has an infinite slope at theta = 0, pi
    shifted = inside * math.cos(margin) - jnp.sqrt(1.0 - inside * inside) * math.sin(margin)
    return jnp.where(cos > math.cos(math.pi - margin), shifted, cos - margin * math.sin(margin))


def normalized_softmax(emb, labels, class_weights, scale: float = 30.0, margin: float = 0.2,
                       kind: str = "arcface"):
    """Normalized softmax with a margin on the target class: cross-entropy of scaled cosines to class centres.

    With W_c = class_weights[c] / |class_weights[c]| ([C, D], normalized here) and cos(theta_ic) = emb_i . W_c:

        ArcFace (Deng et al. 2019, additive angular margin):  target logit  s cos(theta_iy + m)
        CosFace (Wang et al. 2018, additive cosine margin):   target logit  s (cos(theta_iy) - m)
        other logits                                          s cos(theta_ic),  c != y_i
        L = mean_i -log softmax(logits_i)[y_i]

    ArcFace's cos(theta + m) is used while theta + m <= pi and continued linearly, cos(theta) - m sin(m), past
    it (as the insightface implementation does). Labels must lie in [0, C).
    """
    if kind not in ("arcface", "cosface"):
        raise UsageError(f"unknown normalized softmax kind {kind!r}: use 'arcface' or 'cosface'")
    weights = jnp.asarray(class_weights, jnp.float32)
    weights = weights / jnp.maximum(jnp.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
    cos = jnp.asarray(emb, jnp.float32) @ weights.T
    labels = jnp.asarray(labels)
    target = jnp.take_along_axis(cos, labels[:, None], axis=1)
    target = _arcface_target(target, margin) if kind == "arcface" else target - margin
    is_target = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
    logits = scale * jnp.where(is_target, target, cos)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - scale * target[:, 0])


def multi_similarity(emb, labels, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     epsilon: float = 0.1):
    """Multi-similarity loss with its hard-pair mining (Wang et al. 2019, "Multi-Similarity Loss with General
    Pair Weighting for Deep Metric Learning", eqs. 13-15).

    With s_ij = emb_i . emb_j, P_i = the other samples of i's class and N_i = the samples of other classes,
    mining keeps, for each anchor i,

        negatives  k in N_i  with  s_ik + epsilon > min_{j in P_i} s_ij
        positives  j in P_i  with  s_ij - epsilon < max_{k in N_i} s_ik

    (each set is mined against the other's full, unmined set), and

        l_i = 1/alpha log(1 + sum_{mined P_i} exp(-alpha (s_ij - base)))
            + 1/beta  log(1 + sum_{mined N_i} exp( beta (s_ik - base)))
        L   = sum_i l_i / B

    As in the authors' implementation (MalongTech/research-ms-loss), an anchor contributes only when both its
    mined sets are non-empty, and the sum is divided by the batch size B. Mining is a selection: no gradient
    flows through it.
    """
    sim, positive, negative = _similarities(emb, labels)
    held = jax.lax.stop_gradient(sim)
    hardest_pos = jnp.min(jnp.where(positive, held, jnp.inf), axis=1, keepdims=True)
    hardest_neg = jnp.max(jnp.where(negative, held, -jnp.inf), axis=1, keepdims=True)
    mined_neg = negative & (held + epsilon > hardest_pos)
    mined_pos = positive & (held - epsilon < hardest_neg)
    pos_term = _log1p_sum_exp(-alpha * (sim - base), mined_pos) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - base), mined_neg) / beta
    kept = mined_pos.any(axis=1) & mined_neg.any(axis=1)
    return jnp.where(kept, pos_term + neg_term, 0.0).sum() / sim.shape[0]
