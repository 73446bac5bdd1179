"""Large embedding jobs: resumable, order-preserving, failures recorded, never half-written, one job per folder.

Inputs are listed by `pe_jax.sources` in a deterministic order and cut into parts: one part per input shard
for webdataset tar shards (`part-00042` holds shard 00042's samples, in member order), `part_size` items
otherwise. Part N produces `embeddings/part-N.npy` and `metadata/part-N.parquet` (row-aligned: key, source,
caption/label/text where the input has them, carried columns; one schema for every part) plus
`failures/part-N.jsonl` (`pe_jax.embed_output`). A rerun skips finished parts, which makes a job killed at
any point (even SIGKILL) finish with exactly one row per good input, identical to an uninterrupted run.
`manifest.json` pins the settings and the input listing; a rerun with other settings or another listing into
the same folder is refused, naming what changed.

A job holds the folder's lock (`pe_jax.jobs`) for its whole run: a second process is refused, naming the
holder, unless both `join`, and then each takes only parts nobody holds (per-part locks). Ctrl-C stops the
decoding threads at the next item and raises KeyboardInterrupt from the main thread; finished parts stay.

Decoding runs in a thread pool a bounded window ahead of the device, so memory holds a few batches of
pixels whatever the part or job size; batches have a fixed size (the last of a part padded), so one program
is compiled. Processes of a multi-host job take parts round-robin by `jax.process_index()` and meet at a
barrier before the summary.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import os
import signal
import threading
import time

import jax
import numpy as np

from pe_jax import embed_output as output
from pe_jax.checkpoints.verify import content_hash
from pe_jax.distributed import barrier
from pe_jax.embed_parts import Listing, list_parts
from pe_jax.files import check_outside
from pe_jax.jobs import folder_lock, release, storage_error, try_lock
from pe_jax.sources import Item

Settings, read_embeddings = output.Settings, output.read_embeddings
__all__ = ["Settings", "check_sizes", "embed", "list_parts", "read_embeddings"]


def check_sizes(**sizes: int):
    """Each of `sizes` (batch_size=0, ...) must be >= 1: '--batch-size must be >= 1, got 0'."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# ------------------------------------------------------------------------------------------------ the job


def item_loader(modality: str, transform, num_frames: int, stop: threading.Event):
    """item -> (model input, None) or (None, error message): a failure is recorded, never fatal."""
    from pe_jax.preprocess.image import decode_image

    def load(item: Item):
        if stop.is_set():  # interrupted: the result is never used
            return None, "interrupted"
        try:
            if modality == "text":
                if not isinstance(item.text, str):
                    raise TypeError(f"the text is a {type(item.text).__name__}, not a string")
                return item.text, None
            if modality == "video":
                from pe_jax.preprocess.video import load_frames

                return load_frames(item.source, num_frames, transform=transform), None
            return transform(decode_image(item.data)), None
        except Exception as e:  # noqa: BLE001 (any decoding problem is this item's failure)
            return None, f"{type(e).__name__}: {e}"

    return load


def _encoder(modality: str, normalize: bool, layer_idx: int | None, pooling: str | None):
    """encode(model, batch): uses only its traced `model` argument, so weights are never program constants."""
    from pe_jax.features import features
    from pe_jax.layers import l2_normalize

    def encode(m, x):
        if modality == "text":
            return m.encode_text(x, normalize=normalize)
        if modality == "video":  # the mean of unit frame embeddings is not unit: normalize it again
            out = m.encode_video(x, normalize=normalize)
            return l2_normalize(out) if normalize else out
        return features(m, x, layer_idx=layer_idx, pooling=pooling, normalize=normalize)

    return encode


def decode_ahead(parts, load, workers: int, window: int, stop: threading.Event):
    """The job's decoding stage (benchmarks/bench_embed.py times it alone): (part, item, input, error) for every
    item of the (part, items) pairs of `parts` in order, decoded on `workers` threads at most
    `window` items ahead. Raises KeyboardInterrupt once `stop` is set, after the decoding threads have ended."""
    stream = ((n, it) for n, items in parts for it in items)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = collections.deque((n, it, pool.submit(load, it)) for n, it in itertools.islice(stream, window))
        try:
            while pending:
                if stop.is_set():
                    raise KeyboardInterrupt
                n, it, future = pending.popleft()
                for m, nxt in itertools.islice(stream, 1):
                    pending.append((m, nxt, pool.submit(load, nxt)))
                yield (n, it, *future.result())
        finally:
            for *_, future in pending:
                future.cancel()


@contextlib.contextmanager
def _interruptible():
    """An Event set by Ctrl-C (SIGINT) while the block runs in the main thread: the job stops at its next item,
    between two library calls, instead of wherever the signal lands (inside a decoder thread's C code, jax)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        raise KeyboardInterrupt


def _claimed(out_dir: str, listing: Listing, mine, sizes: dict, held: dict, write_empty, bar):
    """(part, items) for each part of `listing` that is `mine(n)`, that this process locks
    (`locks/part-N.lock`) and that is not on disk yet; the lock stays in `held` until the part is written. A part
    without items is written at once. A part's items are listed (a shard indexed) only once it is claimed."""
    for n, items_of in listing.parts():
        if not mine(n) or output.part_done(out_dir, n):
            continue
        fd = try_lock(output.part_path(out_dir, "locks", n, "lock"))
        if fd is None:
            continue  # another process of a --join job holds it
        if output.part_done(out_dir, n):
            release(fd)
            continue
        held[n] = fd
        items = items_of()
        if listing.part_size is None:  # tar shards: counted as they are indexed
            bar.total = (bar.total or 0) + len(items)
            bar.set_postfix_str(f"shard {n + 1}/{listing.count}", refresh=False)
        if not items:  # a shard without images: an empty part
            write_empty(n)
            release(held.pop(n))
            continue
        sizes[n] = len(items)
        yield n, items


def embed(model, src: str, out_dir: str, *, modality: str = "image", batch_size: int = 32, part_size: int = 1000,
          dtype: str = "float16", normalize: bool = True, layer_idx: int | None = None, pooling: str | None = None,
          mesh=None, preset: str | None = None, checkpoint: str | None = None, workers: int = 4,
          num_frames: int = 8, progress: bool = True, join: bool = False) -> dict:
    """Embeds every input of `src` into `out_dir`; returns the summary. See the module docstring. `join`: share
    the folder with other joining processes instead of refusing while one runs."""
    pooling = _check_arguments(model, modality, dtype, part_size, batch_size, layer_idx, pooling)
    check_outside(out_dir, src, what="output folder")
    image_size = getattr(model, "visual", model).config.image_size
    listing = list_parts(src, modality, part_size)
    weights = content_hash(checkpoint) if checkpoint else "random-init"
    settings = Settings(preset, weights, modality,
                        os.path.abspath(src), listing.inputs, listing.sha256, listing.part_size, dtype,
                        normalize, layer_idx, pooling, image_size,
                        f"pe_jax.preprocess.get_image_transform({image_size}) (squash, bilinear, mean=std=0.5)")
    for sub in ("embeddings", "metadata", "failures", "locks"):
        try:
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        except OSError as e:
            raise storage_error(e, os.path.join(out_dir, sub), "create the folder") from None
    lock = folder_lock(out_dir, "embedding job", join=join, hint="or run both with --join to share its parts") \
        if jax.process_index() == 0 else contextlib.nullcontext()  # a multi-host job's processes share it
    with lock, _interruptible() as stop:
        output.check_manifest(out_dir, settings)
        output.sweep_temporaries(out_dir)
        barrier("pe_jax_embed_manifest")
        start, stats = time.perf_counter(), {"embedded": 0, "failed": 0}
        _run(model, listing, out_dir, settings, stats, stop, dict(
            modality=modality, batch_size=batch_size, normalize=normalize, layer_idx=layer_idx, pooling=pooling,
            mesh=mesh, workers=workers, num_frames=num_frames, progress=progress))
        barrier("pe_jax_embed_done")  # every process's parts are on disk before anyone counts them
        seconds = time.perf_counter() - start
        return output.finish(out_dir, settings, listing.count, {
            "embedded": stats["embedded"], "failed": stats["failed"], "seconds": round(seconds, 3),
            "items_per_second": round(stats["embedded"] / seconds, 2) if seconds else None})


def _run(model, listing: Listing, out_dir: str, settings: Settings, stats: dict, stop: threading.Event, o: dict):
    """Embeds this process's unfinished parts (those it can lock) and writes each as soon as it is complete."""
    from tqdm import tqdm

    from pe_jax.batching import apply_batches, round_batch_size
    from pe_jax.features import feature_dim
    from pe_jax.preprocess import get_image_transform, get_text_tokenizer

    modality, dtype = settings.modality, settings.dtype
    schema = output.metadata_schema(listing.first, modality)
    def mine(n):
        return n % jax.process_count() == jax.process_index()
    total = None if listing.part_size is None else sum(
        listing.size(n) for n in range(listing.count) if mine(n) and not output.part_done(out_dir, n))
    dim = feature_dim(model, o["layer_idx"], o["pooling"]) if modality == "image" else model.config.text.output_dim
    size = round_batch_size(o["batch_size"], o["mesh"])
    tokenizer = get_text_tokenizer(model.config.text.context_length) if modality == "text" else None
    load = item_loader(modality, get_image_transform(settings.image_size), o["num_frames"], stop)
    sizes, held = {}, {}
    try:
        with tqdm(total=total, desc="embedding", unit="item", disable=not o["progress"]) as bar:
            claimed = _claimed(out_dir, listing, mine, sizes, held,
                               lambda n: output.write_part(out_dir, n, [], np.zeros((0, dim), dtype), [], schema), bar)
            batches = _part_batches(decode_ahead(claimed, load, o["workers"], 2 * size, stop), sizes, size, tokenizer,
                                    _empty_input(model, modality, o["num_frames"]), stats, bar)
            pending = collections.deque()
            host_batches = (pending.append(meta) or x for x, meta in batches)
            done = collections.defaultdict(list)
            encode = _encoder(modality, o["normalize"], o["layer_idx"], o["pooling"])
            for out in apply_batches(encode, model, host_batches, batch_size=size, mesh=o["mesh"], progress=bar.update):
                n, items, failures, last = pending.popleft()
                done[n].append((items, out))
                if last:
                    chunks = done.pop(n)
                    output.write_part(out_dir, n, [it for its, _ in chunks for it in its],
                               np.concatenate([c for _, c in chunks]).astype(dtype), failures, schema)
                    release(held.pop(n))
                    stats["embedded"] += sum(len(its) for its, _ in chunks)
    finally:
        for fd in held.values():
            release(fd)


def _check_arguments(model, modality, dtype, part_size, batch_size, layer_idx, pooling) -> str | None:
    """Clear errors for bad arguments; returns the image pooling used (None for text and video)."""
    from pe_jax.features import resolve_pooling

    if modality not in ("image", "text", "video"):
        raise ValueError(f"unknown modality {modality!r}; use image, text or video")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; use float16 or float32")
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"part size and batch size must be >= 1, got {part_size} and {batch_size}")
    if modality == "image":
        return resolve_pooling(model, layer_idx, pooling)
    if not hasattr(model, "text"):
        raise ValueError(f"{modality} embeddings need a PE-Core CLIP model")
    if layer_idx is not None or pooling is not None:
        raise ValueError("--layer-idx and --pooling apply to image embeddings")
    return None


def _empty_input(model, modality: str, num_frames: int) -> np.ndarray:
    if modality == "text":
        return np.zeros((0, model.config.text.context_length), np.int32)
    size = getattr(model, "visual", model).config.image_size
    frames = (num_frames,) if modality == "video" else ()
    return np.zeros((0, *frames, size, size, 3), np.float32)


def _part_batches(decoded, sizes: dict[int, int], size: int, tokenizer, empty: np.ndarray, stats: dict, bar):
    """Fixed batches of decoded inputs that never span two parts: yields (batch, (part, items, part failures,
    last batch of the part)). A part whose items all failed still yields one empty batch, so it is written."""
    current, items, inputs, failures = None, [], [], []

    def flush(last: bool):
        batch = tokenizer(inputs) if tokenizer is not None else np.stack(inputs) if inputs else None
        return batch, (current, list(items), failures if last else [], last)

    counts = sizes  # filled as parts are claimed, before their items are decoded
    for n, item, x, error in decoded:
        if n != current:
            current, items, inputs, failures = n, [], [], []
        if error is None:
            items.append(item)
            inputs.append(x)
        else:
            failures.append({"key": item.key, "source": item.source, "error": error})
            stats["failed"] += 1
            bar.update(1)
        counts[n] -= 1
        if len(items) == size or counts[n] == 0:
            batch, meta = flush(counts[n] == 0)
            yield (empty if batch is None else batch), meta  # an empty last batch still closes its part
            items, inputs = [], []

