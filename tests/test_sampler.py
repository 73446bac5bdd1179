"""The class-balanced P x K sampler (`pe_jax.train.sampler`): exact batches, epochs without replacement,
determinism, exact resumption, disjoint per-process shares and clear errors."""

import itertools
import json

import numpy as np
import pytest

from pe_jax.train.sampler import ClassBalancedSampler


def _unbalanced(seed=0, num_classes=23):
    """Labels of classes from 1 to 40 images (several below K), shuffled, with gaps in the label values."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 41, size=num_classes)
    sizes[:3] = [1, 2, 3]
    labels = np.repeat(np.arange(num_classes) * 7 - 30, sizes)
    return labels[rng.permutation(len(labels))]


CASES = {
    "unbalanced": (_unbalanced(), 5, 4),
    "strings": (np.array(["shoe", "bag", "cup", "hat", "pen"] * 6 + ["mug"]), 3, 2),
    "one_per_class": (np.arange(12), 4, 3),
    "all_classes": (np.repeat(np.arange(6), 5), 6, 4),
}


def _max_batches(labels, p, k):
    """The most batches of p distinct classes that the groups of one epoch can form."""
    counts = np.unique(labels, return_counts=True)[1]
    groups = np.where(counts < k, 1, counts // k)
    return max(t for t in range(groups.sum() // p + 1) if np.minimum(groups, t).sum() >= p * t)


@pytest.mark.parametrize("case", CASES)
def test_batches_hold_p_distinct_classes_of_k_images(case):
    labels, p, k = CASES[case]
    sampler = ClassBalancedSampler(labels, p, k, seed=3)
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert batches.shape == (_max_batches(labels, p, k), p * k) and batches.dtype == np.int64
        blocks = labels[batches].reshape(len(batches), p, k)
        assert (blocks == blocks[:, :, :1]).all()  # class-major: K of one class, then the next
        assert all(len(set(b[:, 0])) == p for b in blocks)
        # Without replacement within the epoch for classes with >= K images; the smaller ones show each image.
        drawn = batches.reshape(-1, k)
        big = np.array([counts[labels[g[0]]] >= k for g in drawn])
        assert len(np.unique(drawn[big])) == drawn[big].size
        for group in drawn[~big]:
            assert set(group) == set(np.flatnonzero(labels == labels[group[0]]))


def test_a_balanced_epoch_draws_every_image_once():
    labels = np.repeat(np.arange(10), 8)
    sampler = ClassBalancedSampler(labels, 4, 4, seed=0)
    for epoch in range(3):
        assert sorted(sampler.epoch_batches(epoch).ravel()) == list(range(80))
    assert not np.array_equal(sampler.epoch_batches(0), sampler.epoch_batches(1))


def test_iteration_runs_through_the_epochs():
    labels, p, k = CASES["unbalanced"]
    sampler = ClassBalancedSampler(labels, p, k, seed=5)
    expected = np.concatenate([sampler.epoch_batches(e) for e in range(3)])
    got = np.stack(list(itertools.islice(ClassBalancedSampler(labels, p, k, seed=5), len(expected))))
    np.testing.assert_array_equal(got, expected)


def test_same_seed_same_batches_other_seed_others():
    labels, p, k = CASES["unbalanced"]
    take = lambda seed: np.stack(list(itertools.islice(ClassBalancedSampler(labels, p, k, seed=seed), 40)))
    np.testing.assert_array_equal(take(11), take(11))
    assert not np.array_equal(take(11), take(12))


@pytest.mark.parametrize("stop", [1, 7, 13, 30])
def test_resuming_from_a_saved_state_continues_exactly(stop):
    labels, p, k = CASES["unbalanced"]
    reference = ClassBalancedSampler(labels, p, k, seed=2)
    stream = np.stack(list(itertools.islice(reference, stop + 40)))
    first = ClassBalancedSampler(labels, p, k, seed=2)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    assert set(state) == {"epoch", "position"}
    resumed = ClassBalancedSampler(labels, p, k, seed=2)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(list(itertools.islice(resumed, 40))), stream[stop:])


def test_a_state_at_the_end_of_an_epoch_resumes_into_the_next():
    labels, p, k = CASES["unbalanced"]
    sampler = ClassBalancedSampler(labels, p, k, seed=2)
    n = sampler.num_batches(0)
    sampler.set_state({"epoch": 0, "position": n})
    np.testing.assert_array_equal(next(sampler), sampler.epoch_batches(1)[0])
    assert sampler.get_state() == {"epoch": 1, "position": 1}


@pytest.mark.parametrize("count", [1, 2, 4, 5, 10, 20])
def test_process_shares_partition_each_global_batch(count):
    labels, p, k = CASES["unbalanced"]  # a global batch of 20
    reference = ClassBalancedSampler(labels, p, k, seed=9)
    hosts = [ClassBalancedSampler(labels, p, k, seed=9, process_index=i, process_count=count) for i in range(count)]
    assert {h.local_batch_size for h in hosts} == {p * k // count}
    for _ in range(reference.num_batches(0) + 5):
        global_batch = next(reference)
        np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), global_batch)


def test_the_state_does_not_depend_on_the_process_count():
    labels, p, k = CASES["unbalanced"]
    single = ClassBalancedSampler(labels, p, k, seed=4)
    for _ in range(9):
        next(single)
    hosts = [ClassBalancedSampler(labels, p, k, seed=4, process_index=i, process_count=4) for i in range(4)]
    for h in hosts:
        h.set_state(single.get_state())
    np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), next(single))


@pytest.mark.parametrize("kwargs,message", [
    ({"labels": [], "classes_per_batch": 2, "per_class": 2}, "non-empty"),
    ({"labels": [[0, 1]], "classes_per_batch": 1, "per_class": 1}, "non-empty"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 3, "per_class": 2}, r"P.*\[1, 2\].*has 2"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 0, "per_class": 2}, "classes_per_batch"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 2, "per_class": 0}, r"per_class \(K\) must be an integer >= 1"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 2, "per_class": 2.0}, "per_class"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 2, "per_class": 2, "seed": -1}, "seed"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 2, "per_class": 2, "process_count": 3}, "split evenly"),
    ({"labels": [0, 0, 1, 1], "classes_per_batch": 2, "per_class": 2, "process_count": 2, "process_index": 2},
     "process_index"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedSampler(**kwargs)


@pytest.mark.parametrize("state", [{"epoch": 0}, {"epoch": 0, "position": -1}, {"epoch": 0, "position": 99},
                                   {"epoch": "0", "position": 0}, [0, 0]])
def test_bad_states_are_clear_errors(state):
    sampler = ClassBalancedSampler(np.repeat(np.arange(4), 4), 2, 2)
    with pytest.raises(ValueError, match="state"):
        sampler.set_state(state)
