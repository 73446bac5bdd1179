"""A finetuning workdir: config.json (a rerun with another config is refused while checkpoints exist),
weights.json (the starting weights' content hash: a resume from other weights is refused), metrics.jsonl,
failures.jsonl (the training samples left out, and those that failed to decode during training)."""

from __future__ import annotations

import json
import os
import sys

import jax

from pe_jax.errors import UsageError
from pe_jax.storage.atomic import shared_temporary_name, write_json, write_text
from pe_jax.storage.files import read_capped
from pe_jax.train.config import RESUMABLE_CHANGES, FinetuneConfig, config_to_dict, flatten


def prepare_workdir(cfg: FinetuneConfig, workdir: str) -> bool:
    """Writes config.json; returns whether checkpoints of this same run exist (resume). Refuses another run's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    has_checkpoints = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    if has_checkpoints:
        if not os.path.exists(path):
            raise UsageError(f"{workdir} holds checkpoints but no config.json: not a pe-jax finetune workdir; "
                             "use another --workdir")
        differ = config_differences(read_json(path, "a finetuning config"), cfg)
        if differ:
            lines = [f"  {k}: {a!r} in the workdir, {b!r} now" for k, a, b in differ]
            raise UsageError(f"{workdir} holds checkpoints of another run; refusing to mix them (use another "
                             "--workdir, or the same config to resume):\n" + "\n".join(lines))
    weights = check_weights(cfg, workdir, has_checkpoints)
    if jax.process_index() == 0:
        write_json(path, config_to_dict(cfg), indent=1)
        write_json(os.path.join(workdir, "weights.json"), weights, indent=1)
    return has_checkpoints


def check_weights(cfg: FinetuneConfig, workdir: str, resume: bool) -> dict:
    """The starting weights' identity ({"checkpoint", "content_hash"}); a resume from other weights behind the
    same path is refused, naming both hashes."""
    from pe_jax.checkpoints.orbax import is_pe_jax_checkpoint, read_metadata
    from pe_jax.checkpoints.verify import content_hash
    from pe_jax.config import config_digest
    from pe_jax.pretrained import checkpoint_config

    checkpoint = cfg.model.checkpoint
    weights = {"checkpoint": checkpoint,
               "content_hash": content_hash(checkpoint) if checkpoint else f"random-init (seed {cfg.seed})"}
    if checkpoint and is_pe_jax_checkpoint(checkpoint):  # its pe_jax.json is the model: not in the content hash
        weights["model_config"] = config_digest(checkpoint_config(read_metadata(checkpoint)))
    path = os.path.join(workdir, "weights.json")
    if resume and os.path.exists(path):
        before = read_json(path, "a pe-jax weights record")
        for key in ("content_hash", "model_config"):
            if key in before and before[key] != weights.get(key):
                raise UsageError(f"{workdir} was trained from other weights ({key} {before[key]} there, "
                                 f"{weights.get(key)} now, at {checkpoint}); use another --workdir")
    return weights


def read_json(path: str, what: str) -> dict:
    """A JSON object pe-jax wrote (a size-capped read of a regular file); one line naming `path` otherwise."""
    try:
        obj = json.loads(read_capped(path))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{path}: not {what} ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not {what} (a JSON {type(obj).__name__}, not an object)")
    return obj


def config_differences(old: dict, cfg: FinetuneConfig) -> list[tuple[str, object, object]]:
    """(key, old value, value now) of each setting other than RESUMABLE_CHANGES where `old` (a config dict)
    differs from `cfg`."""
    old, new = flatten(old), flatten(config_to_dict(cfg))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]


FAILURES = "failures.jsonl"  # the training data's samples left out or not decoded: {"key", "source", "error"} rows


def record_failures(workdir: str, src: str, failures: list[dict], used: int, *, resume: bool = False) -> set[str]:
    """Writes `WORKDIR/failures.jsonl` (each run: empty when nothing was left out) and says in one line on
    stderr how many samples of `src` were left out, with the first reason. A failures.jsonl whose rows are not
    pe-jax's (a user's file in a project folder) is refused in one line, never replaced. On a `resume`, the
    rows an earlier session recorded for samples that failed to decode are kept (`append_failures`).

    Args:
        workdir: the run's folder; src: the training data; failures: the failure rows; used: the samples kept.
        resume: whether the run resumes (the file's other rows are this run's too).

    Returns:
        The sources the file now names (to deduplicate later rows by).

    Example:
        >>> failed = [{"key": "a", "source": "shards/0.tar::a.txt", "error": "no image member"}]
        >>> seen = record_failures("runs/demo", "shards/{0..9}.tar", failed, used=99)  # doctest: +SKIP
    """
    path = os.path.join(workdir, FAILURES)
    if jax.process_index() != 0:
        return {f["source"] for f in failures}
    # a link is replaced by the write, never followed
    earlier = _failure_rows(path) if os.path.lexists(path) and not os.path.islink(path) else []
    rows = list(failures)
    if resume:  # the decode failures an earlier session recorded: each is listed once, never again per epoch
        seen = {f["source"] for f in failures}
        rows += _unseen(earlier, seen)
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    if failures:
        print(f"pe-jax finetune: {len(failures)} of the {len(failures) + used} training samples of {src} cannot be "
              f"used and are left out (the first: {failures[0]['error']}); they are listed in {path}",
              file=sys.stderr, flush=True)
    return {r["source"] for r in rows}


def _failure_rows(path: str) -> list[dict]:
    rows = []
    for i, line in enumerate(read_capped(path, limit=1 << 30).decode("utf-8", "replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not {"key", "source", "error"} <= set(row):
            raise UsageError(f"{path}, line {i}: not a pe-jax failure row (key, source, error); not this "
                             "workdir's file? use another --workdir")
        rows.append(row)
    return rows


def append_failures(workdir: str, rows: list[dict], seen: set[str]) -> int:
    """Appends to `WORKDIR/failures.jsonl` the rows of samples that failed to decode during training, each
    source once (`seen`: the sources already there, updated); process 0 only, as metrics.jsonl. Returns how
    many were new.

    Args:
        workdir: the run's folder; rows: {"key", "source", "error"} rows; seen: the sources already recorded.

    Example:
        >>> seen = record_failures("runs/demo", "data.jsonl", [], used=42)  # doctest: +SKIP
        >>> append_failures("runs/demo", batches.failed, seen)  # doctest: +SKIP
    """
    new = _unseen(rows, seen)
    if new and jax.process_index() == 0:
        append_text(os.path.join(workdir, FAILURES), "".join(json.dumps(r) + "\n" for r in new))
    return len(new)


def _unseen(rows: list[dict], seen: set[str]) -> list[dict]:
    """The rows whose source is not in `seen` yet, each source once; `seen` gains them."""
    new = []
    for r in rows:
        if r["source"] not in seen:
            seen.add(r["source"])
            new.append(r)
    return new


def append_text(path: str, text: str):
    """Appends whole lines to a workdir record (metrics.jsonl, failures.jsonl): created if absent, never through
    a link (O_NOFOLLOW), one write per call."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(text)


# the result; where it is written before the rename (its processes share it: a shared temporary)
MODEL, PARTIAL_MODEL = "model", shared_temporary_name("model")


def final_model(cfg: FinetuneConfig, workdir: str) -> bool:
    """Whether `WORKDIR/model` holds this run's finished model (True) or is absent (False). Anything else there
    (a user's folder, a model of another config) is refused in one line: pe-jax never replaces what it did not
    write for this run."""
    path = os.path.join(workdir, MODEL)
    if not os.path.lexists(path):
        return False
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            raise UsageError("not a folder")
        meta = read_json(os.path.join(path, "pe_jax.json"), "a pe-jax model's metadata")
        if not isinstance(meta.get("finetune"), dict):
            raise UsageError("its pe_jax.json is not a pe-jax finetune's")
        differ = config_differences(meta["finetune"], cfg)
        if differ:
            raise UsageError("trained with other settings: " + "; ".join(f"{k}: {a!r} there, {b!r} now"
                                                                         for k, a, b in differ[:3]))
    except (ValueError, OSError) as e:
        reason = "no pe_jax.json: pe-jax did not write it" if isinstance(e, FileNotFoundError) else str(e)
        raise UsageError(f"{path} exists and is not this run's model ({reason}); pe-jax never replaces it: move "
                         "it away or use another --workdir") from None
    return True


def metrics_rows(path: str) -> list[dict]:
    """metrics.jsonl's rows. A torn last line (a run killed mid-append: no newline) is dropped; any other line
    that is not a row with an integer `step` is refused in one line naming the file and line."""
    if os.path.islink(path):  # appended to by the run: never through a link
        raise UsageError(f"{path}: is a symbolic link; pe-jax never writes through links: remove it or use another "
                         "--workdir")
    if not os.path.exists(path):
        return []
    lines = read_capped(path, limit=1 << 30).decode("utf-8", "replace").split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):  # the last line without its newline: torn by a kill, logged again after resume
                break
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UsageError(f"{path}, line {i}: not a pe-jax metrics row (a JSON object with an integer step); "
                             "not this workdir's file? use another --workdir")
        rows.append(row)
    return rows


def truncate_metrics(path: str, step: int):
    """Drops rows logged after `step` (by a run killed after its last checkpoint): they are logged again."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows = [r for r in metrics_rows(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------- the run
