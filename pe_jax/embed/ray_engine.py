"""The embedding job on a Ray cluster (`pe-jax embed --engine ray`): the same parts, rows and output folder as
the local engine (`pe_jax.embed`), the work spread over a pool of actors on many hosts.

This process (the driver) lists the input, checks the manifest and hands every unfinished part to a Ray Data
pipeline: `from_items` of part descriptors, one block each (a tar shard's path, else the part's items) ->
`map_batches` over `actors` actors, each of which builds the model once (from the checkpoint as the driver
resolved it, on `accelerators_per_actor` GPUs or TPU chips, or on CPU) and embeds one part at a time with the
local engine's pipeline (`pe_jax.embed.pipeline`) -> back to the driver, which writes each part as it arrives
with the same `write_part`. Hence: rows identical to the local engine's, one writer (no locks needed, an
object-store output is safe), and an output the workers never touch; the inputs and the checkpoint must be
reachable from every worker (an object store or a shared file system).

Ray Data restarts an actor that dies and retries the parts it held (at most MAX_RESTARTS times: an actor killed
for memory was restarted forever), the driver writes each part once. A driver that dies, or a job stopped by
its actors' deaths, is a job that stopped: rerun it, finished parts are skipped (as for the local engine).

Memory: a folder's or list's descriptors are its items, pickled and compressed (about 8 bytes an item for a
list of paths with a URL column: 0.8 GB for 100 M rows, held by the driver and Ray's object store, which spills
to disk beyond its size); tar shards cost one path each, indexed by the actors.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import time
import zlib

import numpy as np

from pe_jax import storage
from pe_jax.data.sources import Source, classify
from pe_jax.embed import manifest, output
from pe_jax.embed.options import EmbedOptions
from pe_jax.embed.output import Settings
from pe_jax.embed.parts import Listing
from pe_jax.embed.pipeline import JobState, empty_embeddings, encode_parts, prepare
from pe_jax.errors import MissingDependency, PeJaxError, UsageError, install_hint
from pe_jax.storage.locks import folder_lock


def connect(address: str | None = None):
    """The `ray` module, connected: to `address` ("auto", "ray://HOST:PORT"), to the cluster this process already
    joined, or else to a new local cluster of this machine."""
    try:
        import ray
    except ImportError:
        raise MissingDependency(f"the Ray engine needs Ray Data: {install_hint('ray', 'ray[data]')}") from None
    if not ray.is_initialized():
        _check_answers(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as e:  # "auto" with no cluster running
            raise UsageError(f"--ray-address {address}: {e}") from None
    return ray


MAX_RESTARTS = 3  # restarts of each actor, and retries of the part it held (Ray Data's default: forever)


class RayJobError(PeJaxError, RuntimeError):
    """The Ray cluster stopped the job (its actors died more often than MAX_RESTARTS, a task failed)."""


def _check_answers(address: str | None):
    """UsageError unless the cluster `address` names (or RAY_ADDRESS, or the last `ray start` recorded in Ray's
    temporary folder) answers: ray.init retried a dead cluster's address without end. None (nothing recorded)
    and "local" start a new local cluster; a ray:// client address has its own timeout."""
    from pe_jax.storage.urls import net_timeout

    target = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS") or _recorded_cluster()
    if not target or target == "local" or "://" in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=net_timeout()).close()
    except (OSError, ValueError) as e:
        named = f"--ray-address {address}" if target == address else f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}" \
            if os.environ.get("RAY_ADDRESS") else "the cluster the last `ray start` recorded"
        raise UsageError(f"no Ray cluster answers at {target} ({named}; {e.strerror or e}): start it again, or "
                         "`ray stop` and pass --ray-address local for a new cluster on this machine") from None


def embed_ray(src: str | Source, out_dir: str, *, checkpoint: str, model: str | None = None,
              verify: bool | None = None, address: str | None = None, actors: int | None = None,
              accelerators_per_actor: int = 0, options: EmbedOptions | None = None, **kwargs) -> dict:
    """Embeds every input of `src` into `out_dir` on a Ray cluster; returns the summary (see the module).
    `options`: an `EmbedOptions`, or its fields as keywords (`pe_jax.embed.run`)."""
    from pe_jax.pretrained import resolve_model

    options = EmbedOptions.of(options, **kwargs)
    if actors is not None and actors < 1 or accelerators_per_actor < 0:
        raise UsageError(f"--actors must be >= 1 and --accelerators-per-actor >= 0, got {actors} and "
                         f"{accelerators_per_actor}")
    source = src if isinstance(src, Source) else classify(src, options.listed_as)
    # Resolved once, here: the actors get it as it is and never read the checkpoint's metadata again.
    resolved = resolve_model(checkpoint, model=model)
    skeleton = resolved.abstract()  # the checks and settings need no weights
    options = options.for_model(skeleton)
    listing, settings = prepare(out_dir, source, skeleton, options, preset=resolved.preset, checkpoint=resolved)
    lock = contextlib.nullcontext() if storage.is_url(out_dir) else folder_lock(out_dir, "embedding job")
    with lock:
        job = manifest.check_manifest(out_dir, settings)  # the identity its parts' records name
        output.sweep_job(out_dir)
        ray = connect(address)
        start = time.perf_counter()
        # Actors work in the driver's folder: a relative --input failed every item in theirs (and counted the
        # job complete), a relative --checkpoint raised; the rows keep the paths as given, as the local engine's.
        actor = dict(resolved=resolved, verify=verify, settings=settings, options=options,
                     accelerators=accelerators_per_actor, cwd=os.getcwd(), largest=listing.largest_part())
        stats = _drive(ray, listing, out_dir, settings, actor, actors, options.progress, job)
        seconds = time.perf_counter() - start
        return manifest.finish(out_dir, settings, listing.count, {
            "embedded": stats["embedded"], "failed": stats["failed"], "seconds": round(seconds, 3),
            "items_per_second": round(stats["embedded"] / seconds, 2) if seconds else None, "engine": "ray",
            "input": listing.note}, fresh=stats.get("written", ()), job=job)


def _drive(ray, listing: Listing, out_dir: str, settings: Settings, actor: dict, actors: int | None,
           progress: bool, job: str | None = None) -> dict:
    """Runs the unfinished parts through the actors and writes each part once, as it arrives."""
    from tqdm import tqdm

    stats = {"embedded": 0, "failed": 0, "written": set()}
    files = output.part_files(out_dir, settings, listing.count)
    todo = [n for n in range(listing.count) if not output.part_done(out_dir, n, files)]
    if not todo:
        return stats
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts parts
    k = actor["accelerators"]
    resources = ({"num_gpus": k} if ray.cluster_resources().get("GPU") else {"resources": {"TPU": k}}) if k \
        else {"num_cpus": 1}
    descriptors = list(_descriptors(listing, set(todo)))  # one part a block: an actor takes one at a time
    pipeline = ray.data.from_items(descriptors, override_num_blocks=len(descriptors)).map_batches(
        PartEmbedder, fn_constructor_kwargs=actor, batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors or _default_actors(ray, k)), max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS, **resources)
    schema = output.metadata_schema(listing.first, settings.modality, listing.sidecars, listing.labels)
    written = stats["written"]  # parts this run wrote: their bytes need no check in the summary
    with tqdm(total=len(todo), desc="embedding", unit="part", disable=not progress) as bar, _stopped(ray, written):
        for batch in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):
            for n, result in zip(batch["part"].to_pylist(), batch["result"].to_pylist(), strict=True):
                if n in written:  # a retried part that had already come back
                    continue
                embeddings, items, failures = pickle.loads(result)
                output.write_part(out_dir, n, items, embeddings, failures, schema, files, job)
                written.add(n)
                stats["embedded"] += len(items)
                stats["failed"] += len(failures)
                bar.update(1)
    return stats


@contextlib.contextmanager
def _stopped(ray, written: set):
    """The cluster's errors (an actor dead past its restarts, a lost object) as one line; a PeJaxError an actor
    raised (Ray's error is also an instance of its cause) passes unchanged."""
    try:
        yield
    except ray.exceptions.RayError as e:
        if isinstance(e, PeJaxError):
            raise
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RayJobError(f"the Ray job stopped after {len(written)} parts: {type(e).__name__}: {reason.strip()} "
                          f"(each actor is restarted at most {MAX_RESTARTS} times; one killed for memory needs fewer "
                          "--actors or a smaller --batch-size); rerun to resume, finished parts are kept") from None


def _recorded_cluster() -> str | None:
    """The address the last `ray start` on this machine recorded (Ray connects there when given none)."""
    folder = os.environ.get("RAY_TMPDIR") or "/tmp"  # Ray's temporary folder on Linux: /tmp/ray
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(os.path.join(folder, "ray", "ray_current_cluster"), encoding="utf-8") as f:
            return (f.read(4096).split() or [None])[0]
    return None


def _descriptors(listing: Listing, todo: set[int]):
    """{part, spec} for each part in `todo`: a tar shard's path (indexed by the actor), else the part's items,
    pickled and compressed (a list's paths share long prefixes: 14x smaller)."""
    if listing.shards is not None:
        specs = ((n, listing.shards[n]) for n in sorted(todo))
    else:
        specs = ((n, items_of()) for n, items_of in listing.parts() if n in todo)
    for n, spec in specs:
        yield {"part": n, "spec": zlib.compress(pickle.dumps(spec), 1)}


def _default_actors(ray, accelerators: int) -> int:
    """One actor per `accelerators` GPUs of the cluster, else one per node."""
    if accelerators:
        return max(1, int(ray.cluster_resources().get("GPU", 0)) // accelerators)
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


class PartEmbedder:
    """A Ray Data actor: the model, built once, and the local engine's pipeline, one part per row."""

    def __init__(self, resolved, verify: bool | None, settings: Settings, options: EmbedOptions | dict,
                 accelerators: int, cwd: str | None = None, largest: int | None = None):
        """`resolved`: the driver's `pe_jax.pretrained.ResolvedModel` (its checkpoint read there, once);
        `largest`: the most items of any part (the driver's `Listing.largest_part`): batches are no larger."""
        from pe_jax.sharding import make_mesh

        if cwd is not None:  # the driver's working folder: relative inputs and checkpoints name the same files
            try:
                os.chdir(cwd)
            except OSError as e:
                raise UsageError(f"a Ray actor cannot work in the driver's folder {cwd} ({e.strerror}): use absolute "
                                 "paths on a filesystem every host shares, or URLs") from None

        mesh = make_mesh(f"data={accelerators}") if accelerators > 1 else None
        self.model = resolved.load(mesh=mesh, verify=verify)
        if isinstance(options, dict):  # the form the actor took first: the pipeline's fields alone
            options = EmbedOptions(modality=settings.modality, **options)
        self.settings, self.options, self.mesh, self.largest = settings, options, mesh, largest
        self.empty = empty_embeddings(self.model, settings)

    def __call__(self, batch):
        import pyarrow as pa

        parts, results = batch["part"].to_pylist(), []
        for n, spec in zip(parts, batch["spec"].to_pylist(), strict=True):
            results.append(pickle.dumps(self.embed_part(n, pickle.loads(zlib.decompress(spec)))))
        return pa.table({"part": pa.array(parts, pa.int64()), "result": pa.array(results, pa.binary())})

    def embed_part(self, n: int, spec) -> tuple[np.ndarray, list, list[dict]]:
        """(embeddings, embedded items, failures) of part `n`."""
        from pe_jax.data.sources import list_tar

        items = list_tar(spec, self.settings.modality) if isinstance(spec, str) else spec
        if not items:  # a shard without images: an empty part
            return self.empty, [], []
        state = JobState()  # a part's own: the driver counts the parts as they come back
        state.claim(n, len(items))
        (_, embedded, embeddings, failures), = encode_parts(self.model, [(n, items)], self.settings, self.options,
                                                          state, self.mesh, self.largest)
        return embeddings, embedded, failures
