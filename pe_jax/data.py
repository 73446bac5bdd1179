"""Training data through grain: image-text pairs and labelled images, decoded in worker threads with the
reference preprocessing, deterministically shuffled, split across hosts, resumable.

Sources:
  * image-text pairs: a JSONL or CSV of (path, caption) (`image`/`path` and `caption`/`text` columns), or
    webdataset tar shards ('shards/{000..099}.tar': members `KEY.jpg`/`KEY.png` + `KEY.txt`);
  * labelled images: a folder with one sub-folder per class, or a CSV of path,label.

The pipeline is grain's `MapDataset`: records -> this host's slice -> shuffle(seed) -> repeat ->
random_map(decode, augment) -> threads. Each record's randomness comes from (seed, index), so a restored
iterator continues the exact same stream. A sample that does not decode is skipped and counted (the
last errors are kept), never fatal; a dataset where nothing decodes is an error.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass

import grain
import numpy as np
from PIL import Image

from pe_jax.embed import IMAGE_EXTS, expand_braces, read_rows
from pe_jax.transforms import _DECODE_ERRORS, get_image_transform


@dataclass(frozen=True)
class Record:
    source: str  # a path, or "shard.tar::member"
    caption: str | None = None
    label: int | None = None
    location: tuple[int, int] | None = None  # (offset, size) of a tar member's bytes


# ------------------------------------------------------------------------------------------------ listing


def list_pairs(spec: str) -> list[Record]:
    """Image-text records of a JSONL/CSV of (path, caption) or of webdataset tar shards."""
    if ".tar" in spec:
        return [r for shard in _shards(spec) for r in _tar_pairs(shard)]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"no image-text list at {spec} (expected .jsonl, .csv or tar shards)")
    base = os.path.dirname(os.path.abspath(spec))
    rows = read_rows(spec)
    if rows is None:
        raise ValueError(f"{spec}: image-text pairs come as .jsonl, .csv or tar shards")
    records = []
    for i, row in enumerate(rows):
        path, caption = row.get("image", row.get("path")), row.get("caption", row.get("text"))
        if path is None or caption is None:
            raise ValueError(f"{spec}: row {i} needs an image path ('image' or 'path') and a caption "
                             f"('caption' or 'text'); it has {sorted(row)}")
        records.append(Record(path if os.path.isabs(path) else os.path.join(base, path), str(caption)))
    return records


def _shards(spec: str) -> list[str]:
    shards = expand_braces(spec)
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"{spec}: shard(s) not found: {', '.join(missing[:5])}")
    if not shards:
        raise ValueError(f"{spec}: the pattern matches no tar shard")
    return shards


def _tar_pairs(shard: str) -> list[Record]:
    """Pairs of a tar shard, with each image's byte range so a sample reads without scanning the tar."""
    try:
        with tarfile.open(shard) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                key, ext = os.path.splitext(m.name)
                by_key.setdefault(key, {})[ext.lower()] = m
            records = []
            for key in sorted(by_key):
                parts = by_key[key]
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if image is None or ".txt" not in parts:
                    continue
                caption = tar.extractfile(parts[".txt"]).read().decode("utf-8", errors="replace").strip()
                records.append(Record(f"{shard}::{image.name}", caption, location=(image.offset_data, image.size)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{shard}: not a readable tar shard ({type(e).__name__}: {e})") from None
    return records


def list_labelled(spec: str) -> tuple[list[Record], list[str]]:
    """(records, class names) of an image folder with one sub-folder per class, or a CSV of path,label."""
    from pe_jax.zero_shot import labelled_images

    paths, labels, classnames = labelled_images(spec)
    return [Record(p, label=int(y)) for p, y in zip(paths, labels, strict=True)], classnames


# ------------------------------------------------------------------------------------------------ decoding


def read_image(record: Record) -> Image.Image:
    if record.location is not None:
        shard = record.source.split("::", 1)[0]
        offset, size = record.location
        with open(shard, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        import io

        img = Image.open(io.BytesIO(data))
    else:
        img = Image.open(record.source)
    img.load()  # decode now: a truncated file fails here
    return img


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
    """Record -> {"image": float32 [H, W, 3], "caption" | "label"}, or {"error": ...} for a bad sample."""

    def __init__(self, image_size: int, augment: bool = False):
        self.transform = get_image_transform(image_size)
        self.augment = augment

    def random_map(self, record: Record, rng: np.random.Generator):
        try:
            img = read_image(record)
            if self.augment:
                img = random_resized_crop(img, rng)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = self.transform(img)
        except (FileNotFoundError, *_DECODE_ERRORS) as e:
            return {"error": f"{record.source}: {type(e).__name__}: {e}"}
        out = {"image": image}
        if record.caption is not None:
            out["caption"] = record.caption
        if record.label is not None:
            out["label"] = np.int32(record.label)
        return out


# ------------------------------------------------------------------------------------------------ batches


class Batches:
    """Fixed-size batches of one host's share of the data, endless (epochs follow each other, each shuffled
    anew), resumable through `get_state` / `set_state` (a grain checkpointable iterator).

    Bad samples are skipped and counted here, in the main process, so every batch is full and the count is
    exact; if a whole pass over the data yields nothing, that is an error, not an endless loop.
    """

    def __init__(self, records: list[Record], batch_size: int, *, image_size: int, tokenizer=None,
                 augment: bool = False, seed: int = 0, workers: int = 4, process_index: int = 0,
                 process_count: int = 1):
        if not records:
            raise ValueError("the training dataset is empty")
        records = records[process_index::process_count]
        if not records:
            raise ValueError(f"process {process_index} of {process_count} has no training data "
                             f"(fewer records than processes)")
        self.num_records = len(records)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        dataset = (grain.MapDataset.source(records).shuffle(seed=seed).repeat()
                   .random_map(Decode(image_size, augment), seed=seed))
        options = grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=max(2 * batch_size, 16))
        self._iter = iter(dataset.to_iter_dataset(options))
        self.skipped = 0
        self.errors: list[str] = []  # the last few, for the log

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        samples, failures_in_a_row = [], 0
        while len(samples) < self.batch_size:
            sample = next(self._iter)
            if "error" in sample:
                self.skipped += 1
                self.errors = [*self.errors[-9:], sample["error"]]
                failures_in_a_row += 1
                if failures_in_a_row >= self.num_records:
                    raise ValueError(f"none of the {self.num_records} training samples could be decoded; "
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


class StateSnapshot:
    """An iterator state frozen at save time: an async checkpoint writes it later, after training went on."""

    def __init__(self, batches: Batches):
        self.state = batches.get_state()

    def get_state(self) -> bytes:
        return self.state


def load_eval_images(spec: str, image_size: int, *, max_images: int | None = None, classnames=None):
    """(images [N, H, W, 3], labels [N], class names, failures) of a labelled folder or CSV, decoded once.

    `classnames` sets the classes to choose from (labels are looked up by name; more classes than the data
    holds make the task harder, e.g. held-out combinations among all of them).
    """
    from pe_jax.transforms import load_images

    records, found = list_labelled(spec)
    if classnames:
        index = {c: i for i, c in enumerate(classnames)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise ValueError(f"{spec}: labels {unknown[:5]} are not among the {len(classnames)} evaluation classes")
        records = [Record(r.source, label=index[found[r.label]]) for r in records]
    else:
        classnames = found
    if max_images is not None and len(records) > max_images:  # an even spread, not the first classes only
        keep = np.linspace(0, len(records) - 1, max_images).round().astype(int)
        records = [records[i] for i in keep]
    images, failures = load_images([r.source for r in records], get_image_transform(image_size), on_error="skip")
    bad = {i for i, _, _ in failures}
    labels = np.asarray([r.label for i, r in enumerate(records) if i not in bad], np.int32)
    if len(labels) == 0:
        raise ValueError(f"{spec}: none of the {len(records)} evaluation images could be read")
    return images, labels, classnames, [{"path": s, "error": e} for _, s, e in failures]
