"""Training data through grain: image-text pairs and labelled images (listed by `pe_jax.data.sources`), decoded
in worker threads with the reference preprocessing, deterministically shuffled, split across hosts, resumable.

The pipeline is grain's `MapDataset`: records -> this host's slice -> shuffle(seed) -> repeat ->
random_map(decode, augment) -> threads. Each record's randomness comes from (seed, index), so a restored
iterator continues the exact same stream. A sample that does not decode is skipped and counted (the
last errors are kept), never fatal, and handed to the loop as a failure row (`failed`) for
WORKDIR/failures.jsonl; a dataset where nothing decodes is an error. Retrieval runs take
class-balanced batches instead (`BalancedBatches`: P classes x K images from `pe_jax.train.sampler`).
"""

from __future__ import annotations

import concurrent.futures
import json

import grain
import numpy as np
from PIL import Image

from pe_jax.data.sources import Item
from pe_jax.errors import UsageError
from pe_jax.preprocess.image import DECODE_ERRORS, decode_image, get_image_transform, reuse_freed_images


def random_resized_crop(img: Image.Image, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """A crop of random area fraction and aspect ratio (torchvision's RandomResizedCrop sampling), to be resized."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((left, top, left + cw, top + ch))
    return img


class Decode(grain.transforms.RandomMap):
    """(item, label or None) -> {"image": float32 [H, W, 3], "caption" | "label"}, or {"error": ...} for a bad
    sample."""

    def __init__(self, image_size: int, augment: bool = False):
        self.transform = get_image_transform(image_size)
        self.augment = augment

    def random_map(self, record: tuple[Item, int | None], rng: np.random.Generator):
        item, label = record
        try:
            img = decode_image(item.data)
            if self.augment:
                img = random_resized_crop(img, rng)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = self.transform(img)
        except DECODE_ERRORS as e:
            return {"error": f"{item.source}: {type(e).__name__}: {e}", "key": item.key, "source": item.source}
        out = {"image": image}
        if label is not None:
            out["label"] = np.int32(label)
        elif item.text is not None:
            out["caption"] = item.text
        return out


# ------------------------------------------------------------------------------------------------ batches


def _skip(batches, sample: dict):
    """Counts a sample that did not decode, keeps its error for the log and queues its failure row (the loop
    drains `failed` into WORKDIR/failures.jsonl; not in the iterator state: the file is the record)."""
    batches.skipped += 1
    batches.errors = [*batches.errors[-9:], sample["error"]]
    batches.failed.append({"key": sample["key"], "source": sample["source"], "error": sample["error"]})


class Batches:
    """Fixed-size batches of one host's share of the data, endless (epochs follow each other, each shuffled
    anew), resumable through `get_state` / `set_state` (a grain checkpointable iterator).

    Bad samples are skipped and counted here, in the main process, so every batch is full and the count is
    exact; if a whole pass over the data yields nothing, that is an error, not an endless loop.
    """

    def __init__(self, items: list[Item], batch_size: int, *, labels: list[int] | None = None, image_size: int,
                 tokenizer=None, augment: bool = False, seed: int = 0, workers: int = 4, process_index: int = 0,
                 process_count: int = 1):
        if not items:
            raise UsageError("the training dataset is empty")
        records = list(zip(items, labels or [None] * len(items), strict=True))[process_index::process_count]
        if not records:
            raise UsageError(f"process {process_index} of {process_count} has no training data "
                             f"(fewer records than processes)")
        self.num_records = len(records)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        dataset = (grain.MapDataset.source(records).shuffle(seed=seed).repeat()
                   .random_map(Decode(image_size, augment), seed=seed))
        reuse_freed_images(max(1, workers))
        options = grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=max(2 * batch_size, 16))
        self._iter = iter(dataset.to_iter_dataset(options))
        self.skipped = 0
        self.errors: list[str] = []  # the last few, for the log
        self.failed: list[dict] = []  # failure rows not yet recorded ({"key", "source", "error"})

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        samples, failures_in_a_row = [], 0
        while len(samples) < self.batch_size:
            sample = next(self._iter)
            if "error" in sample:
                _skip(self, sample)
                failures_in_a_row += 1
                if failures_in_a_row >= self.num_records:
                    raise UsageError(f"none of the {self.num_records} training samples could be decoded; "
                                     f"last errors: {'; '.join(self.errors[-3:])}")
                continue
            failures_in_a_row = 0
            samples.append(sample)
        batch = {"image": np.stack([s["image"] for s in samples])}
        if "caption" in samples[0]:
            batch["tokens"] = self.tokenizer([s["caption"] for s in samples])
        if "label" in samples[0]:
            batch["label"] = np.stack([s["label"] for s in samples])
        return batch

    # grain's orbax handler saves `get_state()` bytes per process and calls `set_state` + `start_prefetch`.
    def get_state(self) -> bytes:
        return json.dumps({"grain": self._iter.get_state(), "skipped": self.skipped, "errors": self.errors}).encode()

    def set_state(self, state: bytes):
        state = json.loads(state)
        self._iter.set_state(state["grain"])
        self.skipped, self.errors = state["skipped"], state["errors"]

    def start_prefetch(self):
        pass


class BalancedBatches:
    """Endless class-balanced batches of labelled images: each global batch is P classes x K images
    (`ClassBalancedSampler`, deterministic), this process's share decoded on `workers` threads when asked for.
    Resumable like `Batches`: the state is the sampler's position, and each image's augmentation comes from
    (seed, epoch, batch, slot). A sample that does not decode is counted as skipped and its slot takes a copy
    of a decoded image of its class in the batch (or of another class, with that label): batches stay full."""

    def __init__(self, items: list[Item], labels: list[int], sampler, *, image_size: int, augment: bool = False,
                 seed: int = 0, workers: int = 4):
        self.items, self.labels, self.sampler, self.seed = items, np.asarray(labels, np.int32), sampler, seed
        self.num_records, self.batch_size = len(items), sampler.local_batch_size
        self.decode = Decode(image_size, augment)
        reuse_freed_images(max(1, workers))
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self.skipped, self.errors, self.failed = 0, [], []

    def __iter__(self):
        return self

    def _sample(self, index: int, rng: np.random.Generator) -> dict:
        return self.decode.random_map((self.items[index], int(self.labels[index])), rng)

    def __next__(self) -> dict[str, np.ndarray]:
        failed = 0
        while True:
            indices = next(self.sampler)
            where = self.sampler.get_state()  # just past this batch: names it uniquely
            rngs = [np.random.default_rng([self.seed, where["epoch"], where["position"], j])
                    for j in range(len(indices))]
            samples = list(self.pool.map(self._sample, indices, rngs))
            for s in samples:
                if "error" in s:
                    _skip(self, s)
            good = [s for s in samples if "error" not in s]
            if good:
                break
            failed += len(samples)
            if failed >= self.num_records:
                raise UsageError(f"none of the {self.num_records} training samples could be decoded; "
                                 f"last errors: {'; '.join(self.errors[-3:])}")
        by_class = {int(s["label"]): s for s in good}
        samples = [s if "error" not in s else by_class.get(int(self.labels[i]), good[0])
                   for s, i in zip(samples, indices, strict=True)]
        return {"image": np.stack([s["image"] for s in samples]), "label": np.stack([s["label"] for s in samples])}

    def get_state(self) -> bytes:
        return json.dumps({"sampler": self.sampler.get_state(), "skipped": self.skipped,
                           "errors": self.errors}).encode()

    def set_state(self, state: bytes):
        state = json.loads(state)
        self.sampler.set_state(state["sampler"])
        self.skipped, self.errors = state["skipped"], state["errors"]

    def start_prefetch(self):
        pass


class StateSnapshot:
    """An iterator state frozen at save time: an async checkpoint writes it later, after training went on."""

    def __init__(self, batches: Batches):
        self.state = batches.get_state()

    def get_state(self) -> bytes:
        return self.state


# ------------------------------------------------------------------------------------------------ listing


def training_items(cfg) -> tuple[list[Item], list[int] | None, list[str] | None, list[dict]]:
    """(items, integer labels or None, class names or None, failure rows) of `cfg.data.train`. A sample the
    listing already knows cannot be used (a tar sample webdataset would not yield whole, one without a caption)
    is left out of training and returned as a failure row {"key", "source", "error"}, as the embedding job
    records its failures; a sample that fails to decode later is counted in `Batches.skipped` and queued in
    `Batches.failed` for the same file (`pe_jax.train.workdir.append_failures`).

    Args:
        cfg: the run's config (`pe_jax.train.config.FinetuneConfig`).

    Example:
        >>> items, labels, classnames, failures = training_items(load_config("demo_shapes")[0])  # doctest: +SKIP
    """
    from pe_jax.data.sources import label_indices, list_labelled, list_pairs

    failures: list[dict] = []
    if cfg.task == "contrastive":
        items, labels, classnames = list_pairs(cfg.data.train, failures), None, None
    else:
        listed, classnames = list_labelled(cfg.data.train)
        failures = [{"key": it.key, "source": it.source, "error": it.error} for it in listed if it.error]
        items = [it for it in listed if not it.error]
        labels = label_indices(items, classnames)
    if not items:
        raise UsageError(f"{cfg.data.train}: the training dataset is empty" + (
            f": none of its {len(failures)} samples can be used (the first: {failures[0]['error']})"
            if failures else ""))
    return items, labels, classnames, failures
