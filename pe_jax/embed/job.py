"""Large embedding jobs: resumable, order-preserving, failures recorded, never half-written, one job per folder.

Inputs are listed by `pe_jax.data.sources` in a deterministic order and cut into parts: one part per input shard
for webdataset tar shards (`part-00042` holds shard 00042's samples, in member order), `part_size` items
otherwise. Part N produces `embeddings/part-N.npy` and `metadata/part-N.parquet` (row-aligned: key, source,
caption/label/text where the input has them, carried columns; one schema for every part) plus
`failures/part-N.jsonl` (`pe_jax.embed.output`). A rerun skips finished parts, which makes a job killed at
any point (even SIGKILL) finish with exactly one row per good input, identical to an uninterrupted run.
`manifest.json` pins the settings and the input listing; a rerun with other settings or another listing into
the same folder is refused, naming what changed.

A job holds the folder's lock (`pe_jax.storage.locks`) for its whole run: a second process is refused, naming the
holder, unless both `join`, and then each takes only parts nobody holds (per-part locks). Ctrl-C stops the
decoding threads at the next item and raises KeyboardInterrupt from the main thread; finished parts stay.

Inputs, outputs and checkpoints may be object-store URLs (`pe_jax.storage`): an object is written whole in one
PUT, embeddings last, so the embeddings object marks a finished part there too. An object store has no locks:
one job writes a URL output (the processes of a multi-host job split its parts; a Ray job has one writer).

The pipeline (`pe_jax.embed.pipeline`) decodes a bounded window ahead of the device, so memory holds a few
batches of pixels whatever the part or job size. Processes of a multi-host job take parts round-robin by
`jax.process_index()` and meet at a barrier before the summary. `run` picks the engine: this one, or Ray
(`pe_jax.embed.ray_engine`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import jax

from pe_jax import storage
from pe_jax.data.sources import Source, classify
from pe_jax.distributed import barrier
from pe_jax.embed import manifest, output
from pe_jax.embed.options import ENGINES, EmbedOptions, check_sizes
from pe_jax.embed.parts import Listing, list_parts
from pe_jax.embed.pipeline import JobState, decode_ahead, empty_embeddings, encode_parts, item_loader, prepare
from pe_jax.errors import UsageError
from pe_jax.storage.locks import NO_LOCK, folder_lock, release, try_lock

Settings, read_embeddings = output.Settings, output.read_embeddings
__all__ = ["ENGINES", "EmbedOptions", "Settings", "check_sizes", "decode_ahead", "embed", "item_loader", "list_parts",
           "read_embeddings", "run"]


def run(src: str | Source, out_dir: str, *, checkpoint: str, model: str | None = None, engine: str = "local",
        mesh=None, join: bool = False, verify: bool | None = None, ray_address: str | None = None,
        actors: int | None = None, accelerators_per_actor: int = 0, options: EmbedOptions | None = None,
        **kwargs) -> dict:
    """Embeds every input of `src` into `out_dir` with the weights at `checkpoint` (a pe_jax checkpoint, or a
    PyTorch file with its preset `model`; a path or a URL), on one engine: "local" (this host, or every
    process of a jax.distributed job; `mesh`, `join`) or "ray" (actors on a Ray cluster, `pe_jax.embed.ray_engine`:
    `ray_address`, `actors`, `accelerators_per_actor`). `options`: an `EmbedOptions`, or its fields as keywords
    (modality: image, text, video or image,text for both towers in one pass; layout: pe-jax or clip-retrieval;
    batch_size, part_size, dtype, normalize, layer_idx, pooling, workers, num_frames, progress). The options and
    the input (`src`, classified once: `pe_jax.data.sources.classify`) are checked before any model loads.
    Returns the summary.

    Args:
        src: the input (`pe_jax.data.sources.classify`: tar shards, a folder, a list or text file) or its path.
        out_dir: the output folder (or an object-store URL).
        checkpoint, model, verify: the weights (`pe_jax.pretrained.resolve_model`).
        engine: "local" (`mesh`, `join`: as `embed`) or "ray" (`ray_address`, `actors`, `accelerators_per_actor`).
        options: an `EmbedOptions`, or its fields as keywords.

    Example:
        >>> run("shards/{000..009}.tar", "emb/", checkpoint="ckpt/", modality="image,text",
        ...     layout="clip-retrieval")  # doctest: +SKIP
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
    options = EmbedOptions.of(options, **kwargs)
    source = src if isinstance(src, Source) else classify(src, options.listed_as)
    if engine == "ray":
        if mesh is not None or join:
            raise UsageError("the Ray engine shards work over actors: mesh and --join apply to --engine local")
        from pe_jax.embed.ray_engine import embed_ray

        return embed_ray(source, out_dir, checkpoint=checkpoint, model=model, verify=verify, address=ray_address,
                         actors=actors, accelerators_per_actor=accelerators_per_actor, options=options)
    if ray_address is not None or actors is not None or accelerators_per_actor:
        raise UsageError("--ray-address, --actors and --accelerators-per-actor apply to --engine ray")
    from pe_jax.pretrained import resolve_model

    resolved = resolve_model(checkpoint, model=model)  # the job's one read of the checkpoint's metadata
    weights = resolved.load(mesh=mesh, verify=verify)
    return embed(weights, source, out_dir, mesh=mesh, preset=resolved.preset, checkpoint=resolved, join=join,
                 options=options)


# ------------------------------------------------------------------------------------------------ the job


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


def _claimed(out_dir: str, listing: Listing, mine, state: JobState, held: dict, write_empty, files=None):
    """(part, items) for each part of `listing` that is `mine(n)`, that this process locks
    (`locks/part-N.lock`) and that is not on disk yet; the lock stays in `held` until the part is written. A part
    without items is written at once. A part's items are listed (a shard indexed) only once it is claimed."""
    for n, items_of in listing.parts():
        if not mine(n) or output.part_done(out_dir, n, files):
            continue
        fd = try_lock(output.part_path(out_dir, "locks", n, "lock")) if not storage.is_url(out_dir) else NO_LOCK
        if fd is None:
            continue  # another process of a --join job holds it
        if output.part_done(out_dir, n, files):
            release(fd)
            continue
        held[n] = fd
        items = items_of()
        if listing.part_size is None:  # tar shards: counted as they are indexed
            state.bar.total = (state.bar.total or 0) + len(items)
            state.bar.set_postfix_str(f"shard {n + 1}/{listing.count}", refresh=False)
        if not items:  # a shard without images: an empty part
            write_empty(n)
            release(held.pop(n))
            continue
        state.claim(n, len(items))
        yield n, items


def embed(model, src: str | Source, out_dir: str, *, mesh=None, preset: str | None = None,
          checkpoint=None, join: bool = False, options: EmbedOptions | None = None, **kwargs) -> dict:
    """Embeds every input of `src` into `out_dir` with `model` in hand; returns the summary. See the module
    docstring.

    Args:
        model: the model (a CLIP for text, video or image,text).
        src: the input, classified (`pe_jax.data.sources.classify`) or its path.
        out_dir: the output folder (or an object-store URL).
        mesh: the devices to shard batches over (default: one device).
        preset: the preset name pinned in the manifest.
        checkpoint: where the weights came from, a path or the job's `pe_jax.pretrained.ResolvedModel`
            (their content hash is pinned); None: "random-init".
        join: share the folder with other joining processes instead of refusing while one runs.
        options: an `EmbedOptions`, or its fields as keywords (modality "image,text" embeds each sample's image
            and caption in one pass, `pe_jax.embed.layout`; layout "clip-retrieval" writes clip-retrieval's
            folders and names).

    Example:
        >>> embed(model, "images/", "emb/", batch_size=64)["complete"]  # doctest: +SKIP
        True
    """
    options = EmbedOptions.of(options, **kwargs).for_model(model)
    source = src if isinstance(src, Source) else classify(src, options.listed_as)
    listing, settings = prepare(out_dir, source, model, options, preset=preset, checkpoint=checkpoint, join=join)
    local = not storage.is_url(out_dir) and jax.process_index() == 0  # a multi-host job's processes share it
    lock = folder_lock(out_dir, "embedding job", join=join, hint="or run both with --join to share its parts") \
        if local else contextlib.nullcontext()
    with lock, _interruptible() as stop:
        job = manifest.check_manifest(out_dir, settings)  # the identity its parts' records name
        output.sweep_job(out_dir)
        barrier("pe_jax_embed_manifest")
        start, state = time.perf_counter(), JobState(stop=stop)
        _run(model, listing, out_dir, settings, options, state, mesh, job)
        barrier("pe_jax_embed_done")  # every process's parts are on disk before anyone counts them
        seconds = time.perf_counter() - start
        return manifest.finish(out_dir, settings, listing.count, {
            "embedded": state.embedded, "failed": state.failed, "seconds": round(seconds, 3),
            "items_per_second": round(state.embedded / seconds, 2) if seconds else None, "input": listing.note},
            fresh=state.written, job=job)


def _run(model, listing: Listing, out_dir: str, settings: Settings, options: EmbedOptions, state: JobState, mesh,
         job: str | None = None):
    """Embeds this process's unfinished parts (those it can lock) and writes each as soon as it is complete."""
    from tqdm import tqdm

    schema = output.metadata_schema(listing.first, settings.modality, listing.sidecars, listing.labels)
    files = output.part_files(out_dir, settings, listing.count)
    def mine(n):
        return n % jax.process_count() == jax.process_index()
    total = None if listing.part_size is None else sum(
        listing.size(n) for n in range(listing.count) if mine(n) and not output.part_done(out_dir, n, files))
    empty = empty_embeddings(model, settings)
    held = {}
    try:
        with tqdm(total=total, desc="embedding", unit="item", disable=not options.progress) as state.bar:
            claimed = _claimed(out_dir, listing, mine, state, held,
                               lambda n: output.write_part(out_dir, n, [], empty, [], schema, files, job), files)
            for n, items, embeddings, failures in encode_parts(model, claimed, settings, options, state, mesh,
                                                               listing.largest_part()):
                output.write_part(out_dir, n, items, embeddings, failures, schema, files, job)
                state.written.add(n)
                release(held.pop(n))
                state.embedded += len(items)
    finally:
        for fd in held.values():
            release(fd)
