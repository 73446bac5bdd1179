"""An embedding job's `manifest.json`: the settings a folder's job pins (a rerun with others is refused, naming
what differs) and, when a run ends, the counts from the parts on disk. Written by process 0 under
`locks/manifest.lock`, so joined processes never interleave there."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

from pe_jax import storage
from pe_jax.embed import output
from pe_jax.embed.output import Settings, empty_marker, part_files, part_path, read_metadata_file
from pe_jax.embed.part_checksums import PART_RECORDS, empty_problem, job_identity, job_of, part_problem, rows_of
from pe_jax.errors import InputError
from pe_jax.storage.locks import locked


def _manifest_lock(out_dir: str):
    """The manifest's lock; an object store has none (see `pe_jax.embed`: one driver writes a URL output)."""
    if storage.is_url(out_dir):
        return contextlib.nullcontext()
    return locked(os.path.join(out_dir, "locks", "manifest.lock"))


def _differences(previous: dict, settings: Settings) -> str:
    now = asdict(settings)
    diff = sorted(k for k in now if previous.get(k) != now[k])
    if "weights" in diff:  # the same metadata can hide other weights: name both
        return (f"other weights ({previous.get('weights')} there, {now['weights']} now)"
                + (f" and other settings ({', '.join(k for k in diff if k != 'weights')})" if len(diff) > 1 else ""))
    listing = {"inputs", "listing_sha256", "input_versions"}
    if not listing & set(diff) or previous.get("input") != now["input"]:
        return f"other settings ({', '.join(diff)})"
    before, count = previous.get("inputs"), now["inputs"]
    counts = f"{before} items before, {count} now" if before != count else f"{count} items before and now"
    what = "the folder's files changed since the job started" if storage.isdir(now["input"]) else \
        "the input changed since the job started"
    if set(diff) & listing == {"input_versions"}:  # the same names, other files
        what = "its files were replaced or rewritten since the job started (sizes, modification times or inodes)"
    others = sorted(set(diff) - listing)
    return (f"other inputs: the input listing changed: {counts}; {what}"
            + (f"; other settings too ({', '.join(others)})" if others else ""))


def check_manifest(out_dir: str, settings: Settings) -> str | None:
    """Refuses a folder that holds another job (naming what differs); starts the manifest of a new one. The
    check and the first write happen under `locks/manifest.lock`, so two jobs cannot interleave there. Returns
    the job's identity, which its parts' records name (`pe_jax.embed.part_checksums.job_identity`: a new job's
    manifest says so, "part_records"), or None for a job started before records named it."""
    path = storage.join(out_dir, "manifest.json")
    with _manifest_lock(out_dir):
        if storage.exists(path):
            try:
                previous = json.loads(read_metadata_file(path))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise InputError(f"{path}: not a manifest ({e}); use another output folder") from None
            if not isinstance(previous, dict) or not isinstance(previous.get("settings"), dict):
                raise InputError(f"{path}: not a pe-jax embed manifest (no settings object); use another output "
                                 "folder")
            # a job from before layouts, the config digest, tiling or the input versions: what it did then
            for key, then in {"layout": "pe-jax", "model_config": settings.model_config, "tiles": 0,
                              "tile_features": False, "input_versions": settings.input_versions}.items():
                previous["settings"].setdefault(key, then)
            if previous["settings"] != asdict(settings):
                raise InputError(f"{out_dir} holds a job with {_differences(previous['settings'], settings)}; "
                                 "use another output folder")
            return job_of(previous)
        else:
            stray = part_files(out_dir, settings).on_disk()
            if stray:  # a foreign part, or a job whose manifest was lost: its rows would mix with this job's
                raise InputError(f"{out_dir} holds part files ({stray[0][0]}) but no manifest.json: they are not "
                                 "known to be this job's; use another output folder, or move them away")
            job = job_identity(asdict(settings))  # every process of the job computes the same
            if _lead():
                output.write_file(path, json.dumps({"settings": asdict(settings), **_named(job),
                                                    "complete": False}).encode())
            return job


def _named(job: str | None) -> dict:
    """The manifest's fields saying its parts carry records naming the job `job` (none for an older job)."""
    return {"part_records": PART_RECORDS, "job": job} if job is not None else {}


def _lead() -> bool:
    """Whether this is process 0 of the job (jax imported here, not above: reading a job's output needs no jax)."""
    import jax

    return jax.process_index() == 0


def finish(out_dir: str, settings: Settings, n_parts: int, run: dict, fresh=frozenset(), job: str | None = None) \
        -> dict:
    """Counts from the parts on disk (each checked: `part_problem`, its record and bytes too unless this run wrote
    it, in `fresh`; an empty part's marker: `empty_problem`), `job` the job's identity (`check_manifest`);
    failures.jsonl gathered from the per-part files. Under the manifest lock, so that of several joined
    processes the last to finish writes the final counts."""
    files = part_files(out_dir, settings, n_parts)
    with _manifest_lock(out_dir):
        full = [n for n in range(n_parts) if files.done(n)]
        problems = {n: part_problem(out_dir, files, n, sums=n not in fresh, tiles=settings.tile_features, job=job)
                    for n in full}
        empty = [n for n in range(n_parts) if n not in problems and storage.exists(empty_marker(out_dir, n))]
        problems.update({n: empty_problem(out_dir, n, job) for n in empty if n not in fresh})
        damaged = sorted(n for n, problem in problems.items() if problem)
        full, empty = ([n for n in ns if n not in damaged] for ns in (full, empty))
        finished = sorted(full + empty)
        failures = []
        rows = sum(rows_of(files.embeddings(n)) for n in full)
        for n in finished:
            with storage.open_file(part_path(out_dir, "failures", n, "jsonl"), "r") as f:
                failures += f.readlines()
        items = settings.inputs if settings.inputs is not None else rows + len(failures)  # tar: all indexed
        summary = {"items": items, "embedded": rows, "failed": len(failures), "parts": n_parts,
                   "parts_finished": len(finished), "empty_parts": empty, "complete": len(finished) == n_parts,
                   **({"damaged_parts": {n: problems[n] for n in damaged}} if damaged else {}),
                   "this_run": run}
        if _lead():
            output.write_file(storage.join(out_dir, "failures.jsonl"), "".join(failures).encode())
            manifest = {"settings": asdict(settings), **_named(job),
                        **{k: v for k, v in summary.items() if k != "this_run"}}
            output.write_file(storage.join(out_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return summary
