"""The metric-learning losses (`pe_jax.train.metric_losses`) against their formulas written as plain Python
loops in float64, their gradients, and a tiny optimization that each of them must win."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pe_jax.train.metric_losses import multi_similarity, normalized_softmax, supervised_contrastive

# Batch compositions: pairs, a class seen once among larger ones, all labels distinct, one class only,
# unbalanced with arbitrary (negative, large) label values.
COMPOSITIONS = {
    "pairs": [0, 0, 1, 1, 2, 2, 3, 3],
    "singleton": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3],
    "distinct": [0, 1, 2, 3, 4, 5, 6, 7],
    "one_class": [5, 5, 5, 5, 5],
    "unbalanced": [7, 7, 7, 7, 7, 7, -3, 100, 100, -3, 42],
}


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(labels, dim=16, seed=0, spread=None):
    """Random unit vectors; with `spread`, each class is a cluster (centre + spread x noise), which gives
    the multi-similarity mining both kept and pruned pairs."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    x = rng.normal(size=(len(labels), dim))
    if spread is not None:
        centres = {c: rng.normal(size=dim) for c in np.unique(labels)}
        x = np.stack([centres[c] for c in labels]) + spread * x
    return _normalize(x)


# ------------------------------------------------------------------------------------------ the formulas


def supcon_reference(emb, labels, t):
    n, losses = len(labels), []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(emb[i] @ emb[a]) / t) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(float(emb[i] @ emb[p]) / t) / denominator)
                           for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def normalized_softmax_reference(emb, labels, weights, s, m, kind):
    total = 0.0
    for i, y in enumerate(labels):
        logits = []
        for c in range(len(weights)):
            cos = float(emb[i] @ weights[c]) / float(np.linalg.norm(weights[c]))
            if c == y and kind == "cosface":
                cos = cos - m
            elif c == y:
                theta = math.acos(max(-1.0, min(1.0, cos)))
                cos = math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)
            logits.append(s * cos)
        total += -math.log(math.exp(logits[y]) / sum(math.exp(v) for v in logits))
    return total / len(labels)


def multi_similarity_reference(emb, labels, alpha, beta, base, eps, stats=None):
    n, total = len(labels), 0.0
    for i in range(n):
        sims = [float(emb[i] @ emb[j]) for j in range(n)]
        pos = [sims[j] for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [sims[k] for k in range(n) if labels[k] != labels[i]]
        if not pos or not neg:
            continue
        mined_neg = [v for v in neg if v + eps > min(pos)]
        mined_pos = [v for v in pos if v - eps < max(neg)]
        if stats is not None:
            stats["pruned"] += len(pos) - len(mined_pos) + len(neg) - len(mined_neg)
            stats["kept"] += len(mined_pos) + len(mined_neg)
        if not mined_neg or not mined_pos:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (v - base)) for v in mined_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (v - base)) for v in mined_neg)) / beta
    return total / n


# ------------------------------------------------------------------------------------------ equal to them


@pytest.mark.parametrize("name", COMPOSITIONS)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supervised_contrastive_is_its_formula(name, temperature):
    labels = COMPOSITIONS[name]
    for seed, spread in [(0, None), (1, 0.5)]:
        emb = _embeddings(labels, seed=seed, spread=spread)
        got = float(jax.jit(supervised_contrastive, static_argnums=2)(emb, np.asarray(labels), temperature))
        np.testing.assert_allclose(got, supcon_reference(emb, labels, temperature), rtol=2e-5, atol=1e-6)


def test_supervised_contrastive_without_positives_is_zero():
    emb = _embeddings(COMPOSITIONS["distinct"])
    assert float(supervised_contrastive(emb, np.asarray(COMPOSITIONS["distinct"]))) == 0.0


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize("name", COMPOSITIONS)
@pytest.mark.parametrize("scale,margin", [(30.0, 0.2), (16.0, 0.5), (10.0, 2.5)])
def test_normalized_softmax_is_its_formula(kind, name, scale, margin):
    codes = np.unique(COMPOSITIONS[name], return_inverse=True)[1]
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(codes.max() + 2, 16)) * rng.uniform(0.5, 3.0, size=(codes.max() + 2, 1))
    emb = _embeddings(codes, seed=4)
    fn = jax.jit(normalized_softmax, static_argnames=("scale", "margin", "kind"))
    got = float(fn(emb, codes, weights, scale=scale, margin=margin, kind=kind))
    want = normalized_softmax_reference(emb, codes, weights, scale, margin, kind)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_arcface_past_pi_continues_linearly():
    # theta + m > pi for a target opposite its centre: the target logit is cos(theta) - m sin(m).
    weights = np.eye(2, 4)
    emb = -np.eye(2, 4)  # cos(theta) = -1 to its own class, 0 to the other
    got = float(normalized_softmax(emb, np.array([0, 1]), weights, scale=4.0, margin=0.3))
    want = normalized_softmax_reference(emb, [0, 1], weights, 4.0, 0.3, "arcface")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, math.log(1 + math.exp(4.0 * (1 + 0.3 * math.sin(0.3)))), rtol=1e-5)


def test_normalized_softmax_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="arcface"):
        normalized_softmax(np.eye(2), np.array([0, 1]), np.eye(2), kind="sphereface")


@pytest.mark.parametrize("name", COMPOSITIONS)
@pytest.mark.parametrize("alpha,beta,base,eps", [(2.0, 50.0, 0.5, 0.1), (2.0, 40.0, 0.1, 0.3)])
def test_multi_similarity_is_its_formula(name, alpha, beta, base, eps):
    labels = COMPOSITIONS[name]
    fn = jax.jit(multi_similarity, static_argnums=(2, 3, 4, 5))
    for seed, spread in [(0, None), (1, 0.7), (2, 1.5)]:
        emb = _embeddings(labels, seed=seed, spread=spread)
        got = float(fn(emb, np.asarray(labels), alpha, beta, base, eps))
        want = multi_similarity_reference(emb, labels, alpha, beta, base, eps)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_multi_similarity_cases_exercise_the_mining():
    """The cases above both keep and prune pairs, so the comparison covers the mining, not just the sums."""
    stats = {"kept": 0, "pruned": 0}
    for labels in COMPOSITIONS.values():
        for seed, spread in [(0, None), (1, 0.7), (2, 1.5)]:
            multi_similarity_reference(_embeddings(labels, seed=seed, spread=spread), labels, 2.0, 50.0, 0.5, 0.1,
                                       stats)
    assert stats["kept"] > 50 and stats["pruned"] > 50, stats


# ------------------------------------------------------------------------------------------ gradients


def _losses(num_classes):
    weights = np.random.default_rng(5).normal(size=(num_classes, 16))
    return {
        "supcon": lambda e, y: supervised_contrastive(e, y),
        "arcface": lambda e, y: normalized_softmax(e, y, weights, kind="arcface"),
        "cosface": lambda e, y: normalized_softmax(e, y, weights, kind="cosface"),
        "ms": lambda e, y: multi_similarity(e, y),
    }, weights


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_gradients_are_finite(name):
    codes = np.unique(COMPOSITIONS[name], return_inverse=True)[1]
    losses, weights = _losses(codes.max() + 1)
    clustered = _embeddings(codes, seed=6, spread=0.3)
    duplicated = clustered.copy()
    duplicated[1] = duplicated[0]  # identical embeddings: cos = 1 exactly
    at_centres = _normalize(weights[codes]) * np.where(np.arange(len(codes)) % 2, 1, -1)[:, None]  # cos = +-1
    for loss_name, loss in losses.items():
        for emb in (clustered, duplicated, at_centres):
            grad = jax.jit(jax.grad(loss))(jnp.asarray(emb, jnp.float32), codes)
            assert np.isfinite(np.asarray(grad)).all(), (loss_name, name)


# ------------------------------------------------------------------------------------------ they learn


def _problem(num_classes=8, per_class=64, dim=32, seed=0):
    """Features whose class signal (orthogonal class means, tight, in the first num_classes dimensions) is
    buried under wide noise in the other dimensions: cosine retrieval on them is poor, a learned linear map
    separates the classes. Half of each class trains, the other half is held out."""
    rng = np.random.default_rng(seed)
    means = np.zeros((num_classes, dim))
    means[:, :num_classes] = 3.0 * np.eye(num_classes)
    std = np.r_[np.full(num_classes, 0.5), np.full(dim - num_classes, 2.0)]
    labels = np.repeat(np.arange(num_classes), per_class)
    x = means[labels] + rng.normal(size=(len(labels), dim)) * std
    train = np.arange(len(labels)) % per_class < per_class // 2
    return (x[train], labels[train]), (x[~train], labels[~train])


def precision_at_1(emb, labels):
    """Leave-one-out P@1 by cosine."""
    sim = _normalize(emb) @ _normalize(emb).T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[sim.argmax(1)] == labels))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["supcon", "arcface", "cosface", "ms"])
def test_a_linear_map_learns_to_separate_the_classes(name):
    (x, y), (x_held, y_held) = _problem()
    rng = np.random.default_rng(1)
    params = {"map": jnp.asarray(rng.normal(size=(x.shape[1], 16)) / np.sqrt(x.shape[1]), jnp.float32),
              "centres": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
    losses = {
        "supcon": lambda p, e: supervised_contrastive(e, y),
        "arcface": lambda p, e: normalized_softmax(e, y, p["centres"], kind="arcface"),
        "cosface": lambda p, e: normalized_softmax(e, y, p["centres"], kind="cosface"),
        "ms": lambda p, e: multi_similarity(e, y),
    }
    embed = lambda p, feats: feats @ p["map"] / jnp.linalg.norm(feats @ p["map"], axis=1, keepdims=True)
    objective = lambda p: losses[name](p, embed(p, jnp.asarray(x, jnp.float32)))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(objective)(p)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(p, updates), state, loss

    before = precision_at_1(np.asarray(embed(params, x_held)), y_held)
    first = float(objective(params))
    state = opt.init(params)
    for _ in range(300):
        params, state, loss = step(params, state)
    after = precision_at_1(np.asarray(embed(params, x_held)), y_held)
    assert float(loss) < first
    assert after >= 0.9 and after >= before + 0.3, (before, after)
