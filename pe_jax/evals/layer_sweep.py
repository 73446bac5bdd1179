"""Retrieval straight from images: which layer and pooling serve best, every (layer, pooling) pair measured
from one pass of the tower per batch (`pe_jax.features.layer_features`), with the metrics product-search
benchmarks report (P@1, P@5, R@1, R@5, mAP@10, plus Hit@K).

Queries (and an optional separate gallery) are any labelled image input of `pe_jax.data.sources`: a folder with
one sub-folder per class, or a list file whose `labels` column holds each image's label. Without a gallery,
each query is left out of its own gallery (leave-one-out), as `pe_jax.evals.retrieval.evaluate` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pe_jax.errors import UsageError
from pe_jax.evals.retrieval import evaluate

REPORTED = ("P@1", "P@5", "R@1", "R@5", "mAP@10")  # the benchmark's columns; Hit@K follows for every K


def sweep_pairs(model, layers: Sequence[int], poolings: Sequence[str]) -> list[tuple[int, str]]:
    """The valid (layer, pooling) pairs, in order, layers counted from 0: `attn` (the model's own head) exists
    for the last layer of a tower with a head only, `cls` only where there is a class token; other pairs are
    left out. An unknown pooling or a layer out of range is an error."""
    from pe_jax.features import POOLINGS, resolve_pooling, vision_tower

    n = vision_tower(model).config.layers
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise UsageError(f"unknown pooling(s) {unknown}; use {', '.join(POOLINGS)}")
    bad = [layer for layer in layers if not -n <= layer < n]
    if bad:
        raise UsageError(f"layer(s) {bad} out of range for {n} layers")
    pairs = []
    for layer in dict.fromkeys(layer % n for layer in layers):
        for pooling in poolings:
            try:
                pairs.append((layer, resolve_pooling(model, layer, pooling)))
            except ValueError:  # attn below the last layer, cls without a class token: not a pair
                continue
    if not pairs:
        raise UsageError(f"no valid (layer, pooling) pair among layers {list(layers)} and poolings {list(poolings)}")
    return pairs


def labelled_items(src: str, labels: str):
    """(items, labels) of a class-per-folder tree (any `labels` name) or a list file's `labels` column."""
    from pe_jax import storage
    from pe_jax.data.sources import list_labelled, list_paths

    if storage.isdir(src):
        items, _ = list_labelled(src)
        return items, [it.label for it in items]
    items = list_paths(src)
    missing = [it.key for it in items if labels not in it.extra]
    if missing:
        raise UsageError(f"{src}: {len(missing)} row(s) have no {labels!r} column (first: {missing[0]})")
    return items, [it.extra[labels] for it in items]


def sweep_features(model, items, pairs, *, batch_size: int = 32, mesh=None, progress=None):
    """({pair: unit-norm features [N, D]}, indices of the items decoded, failures), one pass per batch."""
    from pe_jax.batching import apply_batches, round_batch_size
    from pe_jax.features import layer_features, vision_tower
    from pe_jax.preprocess import get_image_transform, image_batches

    size = round_batch_size(batch_size, mesh)
    transform = get_image_transform(vision_tower(model).config.image_size)
    kept, failures = [], []

    def decoded():
        for images, indices in image_batches([it.source for it in items], transform, size, failures):
            kept.extend(indices)
            yield images

    def encode(m, x):
        return layer_features(m, x, pairs, normalize=True)

    chunks = list(apply_batches(encode, model, decoded(), batch_size=size, mesh=mesh, progress=progress))
    if not chunks:
        raise UsageError(f"none of the {len(items)} images could be read")
    return {pair: np.concatenate([c[i] for c in chunks]) for i, pair in enumerate(pairs)}, kept, failures


def sweep(model, queries: str, labels: str, *, gallery: str | None = None, layers: Sequence[int] = (-1,),
          poolings: Sequence[str] = ("attn", "mean"), ks: Sequence[int] = (1, 5, 10), batch_size: int = 32,
          mesh=None, progress=None) -> dict:
    """{"results": [{"layer", "pooling", metrics...}], "best": the row with the highest mAP@10, "failures"}."""
    pairs = sweep_pairs(model, layers, poolings)
    ks = sorted(set(ks) | {1, 5, 10})
    q_items, q_labels = labelled_items(queries, labels)
    q_feats, q_kept, failures = sweep_features(model, q_items, pairs, batch_size=batch_size, mesh=mesh,
                                               progress=progress)
    q_labels = [q_labels[i] for i in q_kept]
    g_feats = g_labels = None
    if gallery:
        g_items, g_labels = labelled_items(gallery, labels)
        g_feats, g_kept, g_failures = sweep_features(model, g_items, pairs, batch_size=batch_size, mesh=mesh,
                                                     progress=progress)
        g_labels, failures = [g_labels[i] for i in g_kept], failures + g_failures
    results = []
    for pair in pairs:
        metrics, _ = evaluate(q_feats[pair], q_labels, ks, gallery=None if g_feats is None else g_feats[pair],
                              gallery_labels=g_labels, mesh=mesh)
        results.append({"layer": pair[0], "pooling": pair[1], **metrics})
    best = max(results, key=lambda r: r["mAP@10"])
    return {"results": results, "best": best, "failures": failures}


def table(report: dict, ks: Sequence[int]) -> str:
    """The sweep as a markdown table, one row per (layer, pooling), the best one marked."""
    hits = [f"Hit@{k}" for k in sorted(set(ks) | {1, 5, 10})]
    columns = [*REPORTED, *hits]
    lines = ["| layer | pooling | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in report["results"]:
        mark = " (best)" if r is report["best"] else ""
        lines.append(f"| {r['layer']} | {r['pooling']}{mark} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)
