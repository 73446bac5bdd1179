"""Exact k-nearest-neighbour search by cosine similarity, and the metrics product-retrieval benchmarks report.

For a query q with N_q relevant gallery items (same label) and rel_q(i) = 1 when the i-th ranked item is
relevant, h_q(K) = sum_{i<=K} rel_q(i):
  * P@K   = h_q(K) / K
  * R@K   = h_q(K) / N_q                       (true recall)
  * Hit@K = 1[h_q(K) >= 1]                     (the metric-learning "Recall@K")
  * AP@K  = sum_{i<=K} P@i rel_q(i) / norm,  norm = min(K, N_q) ("min_k_nrel", default), N_q ("nrel") or
            h_q(K) ("hits"); mAP@K is its mean over queries.
Queries with no relevant item in the gallery are left out of every mean (their count is reported). Without
a separate gallery, each query is removed from its own gallery (leave-one-out). Ties in similarity rank
the lower gallery index first.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pe_jax.batching import pad_rows, place, round_batch_size
from pe_jax.errors import UsageError
from pe_jax.layers import l2_normalize

NORMALIZATIONS = ("min_k_nrel", "nrel", "hits")


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude_self: bool = False, chunk: int = 1024,
        mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [nq, k], indices [nq, k]) of the k most cosine-similar gallery rows for each query.

    Runs on the device in query chunks (one compiled shape); with `mesh`, the gallery is padded to a
    multiple of the data-parallel size (padding rows never match), split over the data axes, and XLA
    merges the per-shard top-k. `exclude_self` masks gallery row i for query i.
    """
    if k < 1:
        raise UsageError(f"K must be >= 1, got {k}")
    n = len(gallery)
    k = min(k, n - int(exclude_self))
    if k < 1:
        raise UsageError(f"the gallery has {n} item(s): nothing to search" + (" besides the query itself"
                                                                             if exclude_self and n else ""))
    q = np.asarray(l2_normalize(np.asarray(queries, np.float32)))
    g = pad_rows(np.asarray(l2_normalize(np.asarray(gallery, np.float32))), round_batch_size(n, mesh))
    g_dev = place(g, mesh) if mesh is not None else jnp.asarray(g)

    @jax.jit
    def top(qc, offset, g):
        scores = qc @ g.T
        columns = jnp.arange(g.shape[0])[None, :]
        scores = jnp.where(columns >= n, -jnp.inf, scores)  # padding rows of a sharded gallery
        if exclude_self:
            scores = jnp.where(columns == offset + jnp.arange(qc.shape[0])[:, None], -jnp.inf, scores)
        return jax.lax.top_k(scores, k)  # ties: lower index first

    chunk = min(chunk, len(q))
    out_s, out_i = [], []
    for start in range(0, len(q), chunk):
        qc = q[start:start + chunk]
        s, i = top(pad_rows(qc, chunk), start, g_dev)
        out_s.append(np.asarray(s)[:len(qc)])
        out_i.append(np.asarray(i)[:len(qc)])
    return np.concatenate(out_s), np.concatenate(out_i)


def metrics(neighbours: np.ndarray, query_labels: Sequence, gallery_labels: Sequence, ks: Sequence[int], *,
            exclude_self: bool = False, normalization: str = "min_k_nrel") -> dict[str, float]:
    """{"P@K", "R@K", "Hit@K", "mAP@K"} for each K, from ranked neighbour indices [nq, >= max(ks)]."""
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"unknown AP normalization {normalization!r}; use one of {NORMALIZATIONS}")
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(ql) != len(neighbours):
        raise UsageError(f"{len(ql)} query labels for {len(neighbours)} queries")
    if any(k < 1 for k in ks):
        raise UsageError(f"K must be >= 1, got {list(ks)}")
    labels, counts = np.unique(gl, return_counts=True)
    label_count = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    n_rel = np.array([label_count.get(lab, 0) for lab in ql.tolist()]) - (1 if exclude_self else 0)
    n_rel = np.maximum(n_rel, 0)
    keep = n_rel > 0
    if not keep.any():
        raise UsageError("no query has a relevant item in the gallery")
    rel = (gl[neighbours] == ql[:, None])[keep].astype(np.float64)  # [nq, depth]
    n_rel = n_rel[keep]
    depth = rel.shape[1]
    out = {}
    for k in ks:
        r = rel[:, : min(k, depth)]
        hits = r.sum(1)
        precision_at_i = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
        ap_sum = (precision_at_i * r).sum(1)
        norm = {"min_k_nrel": np.minimum(k, n_rel), "nrel": n_rel, "hits": hits}[normalization]
        out[f"P@{k}"] = float(np.mean(hits / k))
        out[f"R@{k}"] = float(np.mean(hits / n_rel))
        out[f"Hit@{k}"] = float(np.mean(hits > 0))
        out[f"mAP@{k}"] = float(np.mean(np.divide(ap_sum, norm, out=np.zeros_like(ap_sum), where=norm > 0)))
    out["queries"] = int(keep.sum())
    out["queries_without_relevant"] = int((~keep).sum())
    return out


def evaluate(queries: np.ndarray, query_labels: Sequence, ks: Sequence[int] = (1, 5, 10), *,
             gallery: np.ndarray | None = None, gallery_labels: Sequence | None = None,
             normalization: str = "min_k_nrel", mesh=None) -> tuple[dict[str, float], np.ndarray]:
    """Metrics and the neighbour indices; leave-one-out over `queries` when no gallery is given."""
    loo = gallery is None
    g, gl = (queries, query_labels) if loo else (gallery, gallery_labels)
    if gl is None:
        raise UsageError("a separate gallery needs gallery_labels")
    _, idx = knn(queries, g, max(ks), exclude_self=loo, mesh=mesh)
    return metrics(idx, query_labels, gl, ks, exclude_self=loo, normalization=normalization), idx
