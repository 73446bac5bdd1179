"""Class-balanced batches for metric learning: each global batch holds P distinct classes x K images of each
(the "P x K" sampling of Hermans et al. 2017, "In Defense of the Triplet Loss"), as dataset indices.

An epoch is planned at once from (seed, epoch) alone, identically on every host:

1. Each class's indices are shuffled and cut into groups of K; a class with n >= K images gives floor(n / K)
   groups, so within an epoch no image is drawn twice (its n mod K leftovers wait for another epoch, whose
   shuffle differs). A class with fewer than K images gives one group: all its n images plus K - n drawn
   again at random from them (sampling with replacement, the only way to show K of it).
2. Batches take one group from each of P distinct classes, always from the P classes with the most groups
   left (ties broken at random). This largest-first rule forms the most batches possible, so only what no
   schedule could place is left over; the epoch ends when fewer than P classes have groups left.

Global batch b is [class 1's K indices, ..., class P's K indices]; process h of H gets its slice
[h * PK/H, (h + 1) * PK/H), so the hosts' shares are disjoint positions of the same global batch and,
concatenated in process order, give the global batch back (as `jax.make_array_from_process_local_data`
assembles it). The state is {"epoch", "position"} (the next global batch), independent of the process
count. Planning costs O(C) per batch for C classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pe_jax.errors import UsageError


def class_groups(codes: np.ndarray, num_classes: int, per_class: int, rng: np.random.Generator):
    """One epoch's groups of K indices: (members [G, K], groups per class [C]), the groups of class c at rows
    offsets[c]:offsets[c] + groups[c] (offsets = exclusive cumsum), each class's groups in random order."""
    counts = np.bincount(codes, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    order = rng.permutation(len(codes))
    order = order[np.argsort(codes[order], kind="stable")]  # each class's indices together, shuffled
    rank = np.arange(len(codes)) - np.repeat(starts, counts)
    full = counts // per_class
    big = order[rank < np.repeat(full * per_class, counts)].reshape(-1, per_class)
    big_class = np.repeat(np.arange(num_classes), full)
    small_classes = np.flatnonzero(counts < per_class)
    small = []
    for c in small_classes:  # every image once, then K - n of them again, drawn with replacement
        members = order[starts[c]:starts[c] + counts[c]]
        small.append(np.concatenate([members, rng.choice(members, per_class - counts[c])]))
    members = np.concatenate([big, np.asarray(small, dtype=big.dtype).reshape(-1, per_class)])
    group_class = np.concatenate([big_class, small_classes])
    members = members[np.argsort(group_class, kind="stable")]
    return members, np.where(counts < per_class, 1, full)


def schedule(groups: np.ndarray, classes_per_batch: int, rng: np.random.Generator) -> np.ndarray:
    """Group rows [num_batches, P] for classes with `groups[c]` groups each: every batch takes the next group
    of the P classes with the most groups left (random tie breaks, random order within the batch)."""
    remaining = groups.copy()
    offsets = np.cumsum(groups) - groups
    batches = []
    while np.count_nonzero(remaining) >= classes_per_batch:
        key = remaining + rng.random(len(remaining))  # counts are integers: the noise only breaks ties
        chosen = rng.permutation(np.argpartition(-key, classes_per_batch - 1)[:classes_per_batch])
        batches.append(offsets[chosen] + groups[chosen] - remaining[chosen])
        remaining[chosen] -= 1
    return np.asarray(batches, dtype=np.int64).reshape(-1, classes_per_batch)


def _check_int(name: str, value, low: int, high: int | None = None, why: str = ""):
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"{name} must be an integer {bound}{why}, got {value!r}")


class ClassBalancedSampler:
    """Endless P x K batches of dataset indices (see the module docstring), this process's share of each.

    `labels`: one class label per dataset item (any hashable, sortable values: ints, strings).
    `classes_per_batch` P, `per_class` K: the global batch is P x K indices; `process_count` must divide it.
    Iterating gives int64 [P * K / process_count]; `get_state()` / `set_state()` resume exactly.
    """

    def __init__(self, labels: Sequence, classes_per_batch: int, per_class: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise UsageError(f"the class-balanced sampler needs a non-empty list of labels, got shape {labels.shape}")
        self.classes, self.codes = np.unique(labels, return_inverse=True)
        self.codes = self.codes.reshape(-1)
        num_classes = len(self.classes)
        _check_int("classes_per_batch (P)", classes_per_batch, 1, num_classes,
                   f": a batch takes P distinct classes and the data has {num_classes}")
        _check_int("per_class (K)", per_class, 1)
        _check_int("seed", seed, 0)
        _check_int("process_count", process_count, 1)
        _check_int("process_index", process_index, 0, process_count - 1)
        if (classes_per_batch * per_class) % process_count:
            raise UsageError(f"the global batch of {classes_per_batch} x {per_class} = "
                             f"{classes_per_batch * per_class} indices does not split evenly over "
                             f"{process_count} processes")
        self.classes_per_batch, self.per_class, self.seed = int(classes_per_batch), int(per_class), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        """The global batch size, P x K."""
        return self.classes_per_batch * self.per_class

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """Every global batch of `epoch`: int64 [num_batches, P * K], class-major (K indices per class)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            members, groups = class_groups(self.codes, len(self.classes), self.per_class, rng)
            rows = schedule(groups, self.classes_per_batch, rng)
            self._plan = (epoch, members[rows].reshape(len(rows), self.batch_size).astype(np.int64))
        return self._plan[1]

    def num_batches(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch))

    def share(self, global_batch: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        n = self.local_batch_size
        return global_batch[self.process_index * n:(self.process_index + 1) * n]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.position >= self.num_batches(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        return self.share(batch)

    def get_state(self) -> dict[str, int]:
        """{"epoch", "position"}: the next global batch is `position` of `epoch`."""
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict[str, int]):
        if not isinstance(state, dict) or set(state) != {"epoch", "position"}:
            raise UsageError(f"a sampler state is {{'epoch': E, 'position': B}}, got {state!r}")
        _check_int("the state's epoch", state["epoch"], 0)
        _check_int("the state's position", state["position"], 0, self.num_batches(state["epoch"]),
                   f" (epoch {state['epoch']} has {self.num_batches(state['epoch'])} batches)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
