"""Retrieval metrics against a plain-numpy reference and hand-computed cases; exact kNN on the device."""

import numpy as np
import pytest

from pe_jax import sharding
from pe_jax.evals import retrieval


def _reference(q, ql, g, gl, ks, loo, norm):
    """Per-query loops, straight from the definitions."""
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    sums, n = {}, 0
    for i in range(len(q)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if not (loo and j == i)]
        relevant = [j for j in range(len(g)) if gl[j] == ql[i] and not (loo and j == i)]
        if not relevant:
            continue
        n += 1
        for k in ks:
            rel = [1.0 if gl[j] == ql[i] else 0.0 for j in order[:k]]
            hits = sum(rel)
            ap = sum(sum(rel[: p + 1]) / (p + 1) * rel[p] for p in range(len(rel)))
            d = {"min_k_nrel": min(k, len(relevant)), "nrel": len(relevant), "hits": hits}[norm]
            for name, v in [("P", hits / k), ("R", hits / len(relevant)), ("Hit", float(hits > 0)),
                            ("mAP", ap / d if d else 0.0)]:
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
    return {key: v / n for key, v in sums.items()}


@pytest.mark.parametrize("norm", retrieval.NORMALIZATIONS)
@pytest.mark.parametrize("loo", [True, False])
def test_matches_numpy_reference(norm, loo):
    rng = np.random.default_rng(0)
    q, ql = rng.standard_normal((60, 8)), rng.integers(0, 7, 60)
    g, gl = (None, None) if loo else (rng.standard_normal((45, 8)), rng.integers(0, 9, 45))
    ks = (1, 5, 10)
    ours, _ = retrieval.evaluate(q, ql, ks, gallery=g, gallery_labels=gl, normalization=norm)
    expected = _reference(q, ql, q if loo else g, ql if loo else gl, ks, loo, norm)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_hand_computed_case_with_ties_and_no_relevant():
    # Gallery: 4 items. Query 0 (label a): ranked [a, b, a, c] -> rel [1, 0, 1, 0], N=2.
    # Query 1 (label z): nothing relevant -> left out and counted.
    neighbours = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    m = retrieval.metrics(neighbours, ["a", "z"], ["a", "b", "a", "c"], ks=[1, 2, 4])
    assert m["queries"] == 1 and m["queries_without_relevant"] == 1
    assert m["P@1"] == 1 and m["P@2"] == 0.5 and m["P@4"] == 0.5
    assert m["R@1"] == 0.5 and m["R@4"] == 1.0 and m["Hit@1"] == 1.0
    assert m["mAP@1"] == 1.0  # 1 / min(1, 2)
    assert m["mAP@4"] == pytest.approx((1 + 2 / 3) / 2)
    # ties: equal similarities rank the lower gallery index first
    scores, idx = retrieval.knn(np.ones((1, 2)), np.ones((3, 2)), 3)
    assert idx.tolist() == [[0, 1, 2]]


def test_k_larger_than_gallery_and_sharded_gallery():
    rng = np.random.default_rng(1)
    q, ql = rng.standard_normal((9, 4)), rng.integers(0, 2, 9)
    m, idx = retrieval.evaluate(q, ql, ks=[20])  # only 8 others: K is capped for ranking, P@K still / K
    assert idx.shape == (9, 8)
    assert m["R@20"] == 1.0 and m["Hit@20"] == 1.0
    mesh = sharding.make_mesh("data=8")
    g = rng.standard_normal((64, 4))
    s1, i1 = retrieval.knn(q, g, 5)
    s2, i2 = retrieval.knn(q, g, 5, mesh=mesh, chunk=4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    # a gallery that does not divide over the data axis is padded; padding rows are never neighbours
    for n in (65, 3):
        g = rng.standard_normal((n, 4))
        s1, i1 = retrieval.knn(q, g, min(5, n), exclude_self=False)
        s2, i2 = retrieval.knn(q, g, min(5, n), mesh=mesh, chunk=4)
        np.testing.assert_array_equal(i1, i2)
        assert i2.max() < n and np.isfinite(s2).all()
    m1, _ = retrieval.evaluate(q, ql, ks=[1, 3])
    m8, _ = retrieval.evaluate(q, ql, ks=[1, 3], mesh=mesh)
    assert m1 == m8


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown AP normalization"):
        retrieval.metrics(np.zeros((1, 1), int), [0], [0], [1], normalization="x")
    with pytest.raises(ValueError, match="no query has a relevant item"):
        retrieval.metrics(np.zeros((1, 1), int), [0], [1], [1])
    with pytest.raises(ValueError, match="K must be >= 1"):
        retrieval.metrics(np.zeros((1, 1), int), [0], [0], [0])
