"""The embedding job's pipeline, shared by its engines (`pe_jax.embed` on this host or a jax.distributed job,
`pe_jax.embed.ray_engine` on a Ray cluster): inputs decoded on a thread pool a bounded window ahead of the device,
cut into fixed batches that never span two parts (the last of a part padded, so one program is compiled),
encoded, and gathered back into whole parts. `prepare` is their common start: the listing and the settings
a job pins.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pe_jax import storage
from pe_jax.checkpoints.verify import content_hash
from pe_jax.config import config_digest
from pe_jax.data.sources import Item, Source
from pe_jax.embed.daemon_pool import DaemonPool
from pe_jax.embed.layout import PartFiles, towers
from pe_jax.embed.options import EmbedOptions, check_sizes  # noqa: F401 (check_sizes: its first home)
from pe_jax.embed.output import Settings
from pe_jax.embed.parts import Listing, list_parts
from pe_jax.errors import UsageError
from pe_jax.features import vision_tower
from pe_jax.pretrained import RANDOM_INIT, ResolvedModel
from pe_jax.storage.atomic import storage_error
from pe_jax.storage.files import check_outside


class _Quiet:
    """A progress bar nobody sees (a Ray actor's part)."""

    total = None

    def update(self, n: int = 1):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass


@dataclass
class JobState:
    """A running job's state, shared by its stages: the counts, what is left to decode of each claimed part
    (set when the part is claimed, counted down as its items are decoded), the progress bar and the stop event.

    Example:
        >>> state = JobState()
        >>> state.claim(0, 2)
        >>> state.decoded(0, failed=True), state.decoded(0, failed=False), state.failed
        (False, True, 1)
    """

    bar: Any = field(default_factory=_Quiet)
    stop: threading.Event = field(default_factory=threading.Event)
    embedded: int = 0
    failed: int = 0
    left: dict[int, int] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)  # the parts this process wrote (their checksums just made)

    def claim(self, n: int, items: int):
        """Part `n` (of `items` items) enters the pipeline."""
        self.left[n] = items

    def decoded(self, n: int, failed: bool) -> bool:
        """One item of part `n` has been decoded (`failed`: it could not be); True when it was the part's last."""
        if failed:
            self.failed += 1
            self.bar.update(1)
        self.left[n] -= 1
        if self.left[n]:
            return False
        del self.left[n]
        return True


def check_arguments(model, modality, dtype, part_size, batch_size, layer_idx, pooling) -> str | None:
    """The image pooling a job uses (None for text and video), its arguments checked: `EmbedOptions` does both
    now; kept for callers of the first form."""
    options = EmbedOptions(modality=modality, dtype=dtype, part_size=part_size, batch_size=batch_size,
                           layer_idx=layer_idx, pooling=pooling)
    return options.for_model(model).pooling


def prepare(out_dir: str, source: Source, model, options: EmbedOptions, *, preset: str | None,
            checkpoint, join: bool = False) -> tuple[Listing, Settings]:
    """The job's listing and settings, its output folders made (an object store needs none). An image,text
    job lists its inputs as images (each sample's caption: a shard's `.txt`, a list's caption column).

    Args:
        out_dir: the output folder.
        source: the classified input (`pe_jax.data.sources.classify`).
        model: the model (or its abstract skeleton): its config is pinned.
        options: the job's options, `for_model`-resolved.
        preset: the preset name pinned in the manifest.
        checkpoint: the weights (their content hash is pinned), or None for random weights.
        join: the job shares its folder with other processes (refused for an object-store output).

    Example:
        >>> listing, settings = prepare("emb/", classify("images/"), model, EmbedOptions())  # doctest: +SKIP
    """
    if storage.is_url(out_dir) and join:
        raise UsageError(f"{out_dir}: an object-store output has no locks to share parts with --join; run one "
                         "job per output (processes of one multi-host job split the parts), or --engine ray")
    src = source.path
    if not storage.is_url(out_dir) and not storage.is_url(src):
        check_outside(out_dir, src, what="output folder")
    image_size = vision_tower(model).config.image_size
    files = PartFiles(out_dir, options.layout, options.modality)
    listing = list_parts(source, options.listed_as, options.part_size)
    weights = weights_id(checkpoint)
    o = options
    preprocessing = f"pe_jax.preprocess.get_image_transform({image_size}) (squash, bilinear, mean=std=0.5)" \
        if not o.tiles else f"pe_jax.preprocess.tiling.tiling_transform({image_size}, {o.tiles}) (PerceptionLM's " \
        "thumb+tile: the thumbnail's row" + (", the tiles' features)" if o.tile_features else ")")
    settings = Settings(preset, weights, o.modality, src if storage.is_url(src) else os.path.abspath(src),
                        listing.inputs, listing.sha256, listing.part_size, o.dtype, o.normalize, o.layer_idx,
                        o.pooling, image_size, preprocessing, layout=o.layout,
                        model_config=config_digest(model.config), tiles=o.tiles, tile_features=o.tile_features,
                        input_versions=listing.versions)
    tiles = [storage.join(out_dir, "tiles")] if o.tile_features else []
    for sub in [*files.folders(), *tiles] if not storage.is_url(out_dir) else ():
        try:
            os.makedirs(sub, exist_ok=True)
        except OSError as e:
            raise storage_error(e, sub, "create the folder") from None
    return listing, settings


def weights_id(checkpoint) -> str:
    """The content hash a job records for `checkpoint`: a `ResolvedModel`'s (its metadata not read again), a
    path's, or "random-init" without one.

    Args:
        checkpoint: a `pe_jax.pretrained.ResolvedModel`, a checkpoint path or URL, or None.

    Example:
        >>> weights_id(None)
        'random-init'
    """
    if not checkpoint:
        return RANDOM_INIT
    if isinstance(checkpoint, ResolvedModel):
        return checkpoint.weights_id()
    return content_hash(checkpoint)


def item_loader(modality: str, transform, num_frames: int, stop: threading.Event):
    """item -> (model input, None) or (None, error message): a failure is recorded, never fatal."""
    from pe_jax.preprocess.image import decode_image

    def load(item: Item):
        if stop.is_set():  # interrupted: the result is never used
            return None, "interrupted"
        if item.error is not None:  # the listing already knows (a misgrouped sample, a missing sidecar)
            return None, item.error
        try:
            if modality == "image,text":  # one decode and one caption per sample, for both towers
                text = caption_of(item)
                if not isinstance(text, str):
                    raise UsageError("the sample has no caption (a .txt sidecar, or a caption or text column)")
                return (transform(decode_image(item.data)), text), None
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


def caption_of(item: Item):
    """The caption of an image-text sample: a shard's `.txt`, else a list's `caption` (or `text`) column.

    Args:
        item: a listed sample.

    Example:
        >>> caption_of(Item("k", "a.jpg", extra={"caption": "a cat"}))
        'a cat'
    """
    if item.text is not None:
        return item.text
    return item.extra.get("caption", item.extra.get("text"))


@functools.cache  # one function per feature choice: jax.jit's caches key on it, so each part reuses the program
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


@functools.cache
def _tile_encoder(normalize: bool, layer_idx: int | None, pooling: str | None):
    """encode(model, (tiles [B, 1 + N, T, T, 3], grid [B, 2])) -> (the thumbnails' rows [B, D], the tiles' rows
    [B, N, D], zeros past each image's cols * rows tiles, grid): every tile is encoded on its own, as a batch."""
    import jax.numpy as jnp

    image = _encoder("image", normalize, layer_idx, pooling)

    def encode(m, x):
        tiles, grid = x
        b, k = tiles.shape[:2]
        out = image(m, tiles.reshape(b * k, *tiles.shape[2:])).reshape(b, k, -1)
        used = jnp.arange(k - 1)[None, :] < (grid[:, 0] * grid[:, 1])[:, None]
        return out[:, 0], jnp.where(used[..., None], out[:, 1:], 0), grid

    return encode


def decode_ahead(parts, load, workers: int, window: int, stop: threading.Event):
    """The job's decoding stage (benchmarks/bench_embed.py times it alone): (part, item, input, error) for every
    item of the (part, items) pairs of `parts` in order, decoded on `workers` threads at most
    `window` items ahead. Raises KeyboardInterrupt once `stop` is set (within 0.1 s, even while an item's read
    hangs: the threads are daemons, `pe_jax.embed.daemon_pool`, left to end with their read or the process)."""
    from pe_jax.preprocess.image import reuse_freed_images

    reuse_freed_images(max(1, workers))
    stream = ((n, it) for n, items in parts for it in items)
    with DaemonPool(workers) as pool:
        pending = collections.deque((n, it, pool.submit(load, it)) for n, it in itertools.islice(stream, window))
        try:
            while pending:
                n, it, future = pending.popleft()
                for m, nxt in itertools.islice(stream, 1):
                    pending.append((m, nxt, pool.submit(load, nxt)))
                while not (stop.is_set() or concurrent.futures.wait((future,), timeout=0.1).done):
                    pass  # a URL that never answers: Ctrl-C is still seen within 0.1 s
                if stop.is_set():
                    raise KeyboardInterrupt
                yield (n, it, *future.result())
        finally:
            for *_, future in pending:
                future.cancel()


def empty_embeddings(model, settings: Settings):
    """A part without rows: an empty array, or {tower: empty array} for an image,text job.

    Args:
        model: the job's model (its output widths).
        settings: the job's settings (modality, layer, pooling, dtype).

    Example:
        >>> empty_embeddings(model, settings)["text"].shape  # doctest: +SKIP
        (0, 512)
    """
    if settings.modality != "image,text":
        return np.zeros((0, output_dim(model, settings)), settings.dtype)
    return {"image": np.zeros((0, output_dim(model, settings)), settings.dtype),
            "text": np.zeros((0, model.config.text.output_dim), settings.dtype)}


def output_dim(model, settings: Settings) -> int:
    """The width of the job's (first tower's) rows."""
    if settings.modality in ("image", "image,text"):
        from pe_jax.features import feature_dim

        return feature_dim(model, settings.layer_idx, settings.pooling)
    return model.config.text.output_dim


def encode_parts(model, claimed, settings: Settings, options: EmbedOptions, state: JobState, mesh=None,
                 largest: int | None = None):
    """(part, embedded items, embeddings, failures) for each (part, items) of `claimed`, as each completes: the
    job's decode -> batch -> encode pipeline, shared by the local and the Ray engine (`pe_jax.embed.ray_engine`).
    Each part of `claimed` is `state.claim`ed by the time its items are decoded; `mesh`: the devices' mesh;
    `largest`: at most this many items in any part (`Listing.largest_part`): batches are no larger."""
    from pe_jax.batching import apply_batches, round_batch_size
    from pe_jax.preprocess import get_image_transform, get_text_tokenizer
    from pe_jax.preprocess.tiling import tiling_transform

    o, modality, both = options, settings.modality, settings.modality == "image,text"
    # a batch never spans two parts: one bigger than a part (or the whole input) would only pad
    cap = min([x for x in (settings.part_size, settings.inputs, largest) if x] or [o.batch_size])
    size = round_batch_size(min(o.batch_size, cap), mesh)
    tokenizer = get_text_tokenizer(model.config.text.context_length) if "text" in towers(modality) else None
    transform = get_image_transform(settings.image_size) if not o.tiles else \
        tiling_transform(settings.image_size, o.tiles, o.tile_features)
    load = item_loader(modality, transform, o.num_frames, state.stop)
    kind = "tiles" if o.tile_features else modality  # a tiled image's input: (tiles, grid)
    batches = _part_batches(decode_ahead(claimed, load, o.workers, 2 * size, state.stop), state, size,
                            _collate(kind, tokenizer), _empty_input(model, kind, o.tiles or o.num_frames))
    pending = collections.deque()
    host_batches = (pending.append(meta) or x for x, meta in batches)
    done = collections.defaultdict(list)
    run = functools.partial(apply_batches, model=model, batch_size=size, mesh=mesh)
    if both:  # each tower's own program (the same as a one-tower job's), fed from the one decoded batch
        images, texts = itertools.tee(host_batches)
        image = _encoder("image", o.normalize, o.layer_idx, o.pooling)
        outputs = zip(run(image, batches=(x[0] for x in images), progress=state.bar.update),
                      run(_encoder("text", o.normalize, None, None), batches=(x[1] for x in texts)), strict=True)
    else:
        encoder = _tile_encoder(o.normalize, o.layer_idx, o.pooling) if o.tile_features else \
            _encoder(modality, o.normalize, o.layer_idx, o.pooling)
        outputs = run(encoder, batches=host_batches, progress=state.bar.update)
    # what each output holds: the towers of an image,text job; rows, tile rows and grids of --tile-features
    names = towers(modality) if both else ("image", "tiles", "tile_grid") if o.tile_features else None
    for out in outputs:
        n, items, failures, last = pending.popleft()
        done[n].append((items, out))
        if last:
            chunks = done.pop(n)
            outs = [c for _, c in chunks]
            embeddings = np.concatenate(outs).astype(settings.dtype) if names is None else \
                {t: np.concatenate([c[i] for c in outs]).astype(np.int32 if t == "tile_grid" else settings.dtype)
                 for i, t in enumerate(names)}
            yield (n, *non_finite_as_failures([it for its, _ in chunks for it in its], embeddings, failures))


def non_finite_as_failures(items: list, embeddings, failures: list):
    """(items, embeddings, failures) without the rows whose embedding holds NaN or Inf (in any tower): those
    are failure rows saying so, never counted as embedded."""
    arrays = list(embeddings.values()) if isinstance(embeddings, dict) else [embeddings]
    # per row over every other axis: reshape(len(a), -1) fails on a part of 0 rows (all its items failed)
    ok = np.logical_and.reduce([np.isfinite(a).all(axis=tuple(range(1, a.ndim))) for a in arrays])
    if ok.all():
        return items, embeddings, failures
    failures = failures + [{"key": it.key, "source": it.source, "error": "the model's embedding holds NaN or Inf"}
                           for it, good in zip(items, ok, strict=True) if not good]
    keep = lambda a: a[ok]  # noqa: E731
    kept = {t: keep(a) for t, a in embeddings.items()} if isinstance(embeddings, dict) else keep(embeddings)
    return [it for it, good in zip(items, ok, strict=True) if good], kept, failures


def _collate(kind: str, tokenizer):
    """Decoded inputs -> one host batch: stacked pixels, token ids, (pixels, token ids) for image,text, or
    (tiles, grids) for `kind` "tiles"."""
    if kind == "image,text":
        return lambda inputs: (np.stack([x for x, _ in inputs]), tokenizer([t for _, t in inputs]))
    if kind == "tiles":
        return lambda inputs: (np.stack([x for x, _ in inputs]), np.stack([g for _, g in inputs]))
    return tokenizer if tokenizer is not None else np.stack


def _empty_input(model, kind: str, frames: int):
    """A batch of no inputs of `kind` (a modality, or "tiles": `frames` is then the most tiles)."""
    if kind == "image,text":
        return _empty_input(model, "image", frames), _empty_input(model, "text", frames)
    if kind == "text":
        return np.zeros((0, model.config.text.context_length), np.int32)
    size = vision_tower(model).config.image_size
    if kind == "tiles":
        return np.zeros((0, 1 + frames, size, size, 3), np.float32), np.zeros((0, 2), np.int32)
    return np.zeros((0, *((frames,) if kind == "video" else ()), size, size, 3), np.float32)


def _part_batches(decoded, state: JobState, size: int, collate, empty):
    """Fixed batches of decoded inputs that never span two parts: yields (batch, (part, items, part failures,
    last batch of the part)). A part whose items all failed still yields one empty batch, so it is written."""
    current, items, inputs, failures = None, [], [], []
    for n, item, x, error in decoded:
        if n != current:
            current, items, inputs, failures = n, [], [], []
        if error is None:
            items.append(item)
            inputs.append(x)
        else:
            failures.append({"key": item.key, "source": item.source, "error": error})
        last = state.decoded(n, failed=error is not None)
        if len(items) == size or last:
            batch = collate(inputs) if inputs else empty  # an empty last batch still closes its part
            yield batch, (current, list(items), failures if last else [], last)
            items, inputs = [], []
