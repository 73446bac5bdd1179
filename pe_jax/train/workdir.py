"""A finetuning workdir: config.json (a rerun with another config is refused while checkpoints exist),
weights.json (the starting weights' content hash: a resume from other weights is refused), metrics.jsonl."""

from __future__ import annotations

import json
import os

import jax

from pe_jax.jobs import write_text
from pe_jax.train.config import RESUMABLE_CHANGES, FinetuneConfig, config_to_dict, flatten


def prepare_workdir(cfg: FinetuneConfig, workdir: str) -> bool:
    """Writes config.json; returns whether checkpoints of this same run exist (resume). Refuses another run's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    has_checkpoints = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    if has_checkpoints:
        if not os.path.exists(path):
            raise ValueError(f"{workdir} holds checkpoints but no config.json: not a pe-jax finetune workdir; "
                             "use another --workdir")
        with open(path) as f:
            old = flatten(json.load(f))
        new = flatten(config_to_dict(cfg))
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if differ:
            lines = [f"  {k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now" for k in differ]
            raise ValueError(f"{workdir} holds checkpoints of another run; refusing to mix them (use another "
                             "--workdir, or the same config to resume):\n" + "\n".join(lines))
    weights = check_weights(cfg, workdir, has_checkpoints)
    if jax.process_index() == 0:
        write_json(path, config_to_dict(cfg))
        write_json(os.path.join(workdir, "weights.json"), weights)
    return has_checkpoints


def check_weights(cfg: FinetuneConfig, workdir: str, resume: bool) -> dict:
    """The starting weights' identity ({"checkpoint", "content_hash"}); a resume from other weights behind the
    same path is refused, naming both hashes."""
    from pe_jax.checkpoints.verify import content_hash

    checkpoint = cfg.model.checkpoint
    weights = {"checkpoint": checkpoint,
               "content_hash": content_hash(checkpoint) if checkpoint else f"random-init (seed {cfg.seed})"}
    path = os.path.join(workdir, "weights.json")
    if resume and os.path.exists(path):
        with open(path) as f:
            before = json.load(f).get("content_hash")
        if before != weights["content_hash"]:
            raise ValueError(f"{workdir} was trained from other weights ({before} there, {weights['content_hash']} "
                             f"now, at {checkpoint}); use another --workdir")
    return weights


def write_json(path: str, obj):
    """`obj` as JSON at `path`, atomically through a new pe-jax temporary (never written through a link)."""
    write_text(path, json.dumps(obj, indent=1))


def metrics_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, step: int):
    """Drops rows logged after `step` (by a run killed after its last checkpoint): they are logged again."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows = [r for r in metrics_rows(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------- the run
