"""Finetuning jobs: a workdir and a loop that resumes exactly.

`finetune(config, workdir)` builds the task (contrastive CLIP or classifier), shards it over a mesh by the
rules of `pe_jax.sharding`, and trains with the jitted step of `pe_jax.train.step`. The model comes from
`model.checkpoint` when given: a pe_jax checkpoint brings its own config (the recipe's preset is not used;
`model.overrides` may only change execution fields such as dtype or remat), a PyTorch file is read as the
recipe's preset. The workdir holds:

  config.json      the run's config; a rerun with another config is refused while checkpoints exist
  weights.json     the starting weights' content hash; a resume from other weights is refused
  checkpoints/     Orbax CheckpointManager steps: (task, optimizer) state and the data iterator's state
  metrics.jsonl    one row per logged step and per evaluation
  failures.jsonl   the training samples left out by the listing or failing to decode, each once ({"key", "source",
                   "error"}, as embed records them)
  model/           the final weights, a pe_jax checkpoint (`pe-jax export` turns it into PyTorch files)

Killed at any point (even SIGKILL), the same command resumes from the latest checkpoint and continues the
identical loss trajectory: same parameters, optimizer state, data order and augmentation; rows that the
killed run logged after that checkpoint are dropped from metrics.jsonl and logged again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.distributed import barrier
from pe_jax.errors import UsageError
from pe_jax.storage.atomic import rename_noreplace, storage_error, write_json
from pe_jax.storage.files import check_outside
from pe_jax.storage.locks import folder_lock
from pe_jax.train.checkpointing import checkpoint_manager, finite, guarded, restore_newest, write_step_checksums
from pe_jax.train.config import FinetuneConfig, config_to_dict
from pe_jax.train.rate import StepRate
from pe_jax.train.workdir import (
    MODEL,
    PARTIAL_MODEL,
    append_failures,
    append_text,
    final_model,
    metrics_rows,
    prepare_workdir,
    record_failures,
)

# ---------------------------------------------------------------------------------------------------- building


def build_model(cfg: FinetuneConfig, mesh=None):
    """The CLIP or vision tower the run starts from (see the module docstring for which config wins)."""
    return resolve_start(cfg).load(mesh=mesh, strategy=cfg.strategy, seed=cfg.seed)


def resolve_start(cfg: FinetuneConfig):
    """The run's starting model (`pe_jax.pretrained.ResolvedModel`): a pe_jax checkpoint's own config (only its
    execution fields overridden), else the recipe's preset, as a CLIP when the file (its keys) holds one.

    Args:
        cfg: the run's config.

    Example:
        >>> resolve_start(load_config("demo_shapes")[0]).model_class.__name__  # doctest: +SKIP
        'CLIP'
    """
    from pe_jax.config import EXECUTION_FIELDS, TEXT_PRESETS
    from pe_jax.pretrained import PE_JAX, resolve_model

    m, image_size = cfg.model, cfg.data.image_size
    resolved = resolve_model(m.checkpoint, default_model=m.preset)  # a pe_jax checkpoint names its own model
    if resolved.naming == PE_JAX:
        return resolved.override(**m.overrides)
    if cfg.task == "contrastive" and m.preset not in TEXT_PRESETS:
        raise UsageError(f"contrastive finetuning needs a PE-Core CLIP preset, not {m.preset!r}")
    if hasattr(resolved.config, "text"):
        overrides = dict(m.overrides, **({"vision_image_size": image_size} if image_size else {}))
        if cfg.task != "contrastive":  # a classifier from a CLIP file: tower fields name the vision tower
            overrides = {k if k in EXECUTION_FIELDS or k.startswith(("vision_", "text_")) else f"vision_{k}": v
                         for k, v in overrides.items()}
        return resolved.override(**overrides)
    return resolved.override(**dict(m.overrides, **({"image_size": image_size} if image_size else {})))


def build_task(cfg: FinetuneConfig, num_classes: int | None = None, mesh=None):
    """The task module of `cfg`: ContrastiveTask(CLIP), Classifier or RetrievalTask (a vision tower), weights
    loaded."""
    from pe_jax.features import vision_tower
    from pe_jax.train.tasks import Classifier, ContrastiveTask, RetrievalTask

    model = build_model(cfg, mesh)
    if cfg.task == "contrastive":
        if not hasattr(model, "text"):
            raise UsageError(f"{cfg.model.checkpoint} holds a vision tower alone; contrastive finetuning needs a CLIP")
        return ContrastiveTask(model, cfg.loss)
    encoder = vision_tower(model)
    if cfg.task == "retrieval":
        return RetrievalTask(encoder, num_classes, loss=cfg.metric_loss, layer_idx=cfg.layer_idx, pooling=cfg.pooling,
                             rngs=nnx.Rngs(cfg.seed + 1))
    return Classifier(encoder, num_classes, head=cfg.head, layer_idx=cfg.layer_idx, pooling=cfg.pooling,
                      rngs=nnx.Rngs(cfg.seed + 1))


def _image_size(cfg: FinetuneConfig, task) -> int:
    config = task.model.config
    return cfg.data.image_size or (config.vision.image_size if hasattr(config, "vision") else config.image_size)


# ---------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything a training loop holds: built once by `_start`, advanced by `_train`."""

    cfg: FinetuneConfig
    workdir: str
    mesh: object
    batches: object
    evaluator: object
    schedule: object
    graphdef: object
    state: object
    step_fn: object
    manager: object
    classnames: list[str] | None
    step: int = 0
    saving: int | None = None  # the step of the latest save started
    failed: set[str] = dataclasses.field(default_factory=set)  # sources in WORKDIR/failures.jsonl

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def task(self):
        return nnx.merge(self.graphdef, self.state)[0]

    def log(self, row: dict):
        if jax.process_index() == 0:  # appended, never through a link (checked at the start too)
            append_text(self.metrics_path, json.dumps(row) + "\n")

    def place(self, batch):
        if self.mesh is None:
            return batch
        return {k: jax.make_array_from_process_local_data(sh.batch_sharding(self.mesh, v.ndim), v)
                for k, v in batch.items()}

    def save(self, metrics=None):
        import grain
        import orbax.checkpoint as ocp

        from pe_jax.train.pipeline import StateSnapshot

        # The data state is captured now; an async write happens while training goes on. The previous step's
        # write is waited for first (as Orbax's save does anyway), and its checksums recorded.
        self.manager.wait_until_finished()
        write_step_checksums(os.path.join(self.workdir, "checkpoints"), self.manager.all_steps())
        self.saving = self.step
        self.manager.save(self.step, metrics=metrics, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=grain.checkpoint.CheckpointSave(StateSnapshot(self.batches))))


def _check_held_out_classes(train_classes: list[str], eval_src: str):
    from pe_jax.data.sources import list_labelled

    shared = sorted(set(train_classes) & set(list_labelled(eval_src)[1]))
    if shared:
        raise UsageError(f"data.eval shares {len(shared)} classes with data.train ({', '.join(shared[:5])}"
                         f"{', ...' if len(shared) > 5 else ''}): held-out retrieval needs classes never trained on")


def _check_batching(cfg: FinetuneConfig, mesh):
    nproc = jax.process_count()
    if mesh is not None:
        sh.check_strategy(cfg.strategy)
        dp = sh.data_parallel_size(mesh) * cfg.grad_accum_steps
        if cfg.batch_size % dp:
            raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of the data-parallel size x "
                             f"grad_accum_steps ({dp})")
    if cfg.batch_size % nproc:
        raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of the {nproc} processes")


def _batches(cfg: FinetuneConfig, items, labels, image_size: int, context: int | None):
    """This process's training batches: shuffled records, or P x K class-balanced ones for retrieval."""
    from pe_jax.preprocess import get_text_tokenizer
    from pe_jax.train.pipeline import BalancedBatches, Batches
    from pe_jax.train.sampler import ClassBalancedSampler

    nproc, rank = jax.process_count(), jax.process_index()
    if cfg.task == "retrieval":
        p = cfg.batch_classes
        sampler = ClassBalancedSampler(labels, p, cfg.batch_size // p, seed=cfg.seed, process_index=rank,
                                       process_count=nproc)
        return BalancedBatches(items, labels, sampler, image_size=image_size, augment=cfg.data.augment,
                               seed=cfg.seed, workers=cfg.data.workers)
    return Batches(items, cfg.batch_size // nproc, labels=labels, image_size=image_size,
                   tokenizer=get_text_tokenizer(context) if context else None, augment=cfg.data.augment,
                   seed=cfg.seed, workers=cfg.data.workers, process_index=rank, process_count=nproc)


def _start(cfg: FinetuneConfig, workdir: str) -> Run:
    """Builds the run: data, task, optimizer, jitted step, checkpoint manager; restores the latest checkpoint."""
    from pe_jax.train.evaluate import Evaluator
    from pe_jax.train.optim import make_optimizer, warmup_cosine
    from pe_jax.train.pipeline import training_items
    from pe_jax.train.step import init_train_state, make_train_step
    from pe_jax.train.tasks import trainable_filter

    resume = prepare_workdir(cfg, workdir)
    final_model(cfg, workdir)  # a model/ that is not this run's: refused before any training
    metrics_rows(os.path.join(workdir, "metrics.jsonl"))  # a user's metrics.jsonl too (it would be rewritten)
    mesh = sh.make_mesh(cfg.mesh) if cfg.mesh else None
    _check_batching(cfg, mesh)
    items, labels, classnames, failures = training_items(cfg)
    failed = record_failures(workdir, cfg.data.train, failures, len(items), resume=resume)
    if cfg.task == "retrieval" and cfg.data.eval:  # before anything is built
        _check_held_out_classes(classnames, cfg.data.eval)
    task = build_task(cfg, len(classnames) if classnames else None, mesh)
    image_size = _image_size(cfg, task)
    context = task.model.config.text.context_length if cfg.task == "contrastive" else None
    batches = _batches(cfg, items, labels, image_size, context)
    evaluator = Evaluator(cfg, image_size, context, mesh) if cfg.data.eval else None
    o = cfg.optim
    schedule = warmup_cosine(o.learning_rate, cfg.steps, o.warmup_steps, o.end_lr_fraction)
    tx = make_optimizer(schedule, o.weight_decay, o.clip_norm, optimizer=o.optimizer, b1=o.b1, b2=o.b2,
                        layer_decay_rate=o.layer_decay)
    trainable = trainable_filter(cfg.freeze)
    graphdef, state = init_train_state(task, tx, trainable, mesh, cfg.strategy)
    step_fn = jax.jit(make_train_step(graphdef, trainable=trainable, mesh=mesh, strategy=cfg.strategy,
                                      accum_steps=cfg.grad_accum_steps), donate_argnums=0)
    run = Run(cfg, workdir, mesh, batches, evaluator, schedule, graphdef, state, step_fn,
              checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg), classnames, failed=failed)
    if resume and run.manager.latest_step() is not None:
        restore_newest(run)
    elif jax.process_index() == 0 and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)  # a fresh run: nothing of an earlier, checkpoint-less attempt counts
    return run


def _train(run: Run, bar, stop_after: int | None) -> dict:
    """Steps until the end (or `stop_after` steps of this call); logs, evaluates and checkpoints on schedule."""
    cfg, start_step, last = run.cfg, run.step, {}
    clock = StepRate(cfg.batch_size)
    while run.step < cfg.steps and (stop_after is None or run.step - start_step < stop_after):
        run.state, metrics = run.step_fn(run.state, run.place(next(run.batches)))
        append_failures(run.workdir, run.batches.failed, run.failed)  # each failed sample once, across resumes
        run.batches.failed.clear()
        run.step += 1
        clock.stepped(run.step - start_step, metrics, bar)
        stopping = stop_after is not None and run.step - start_step >= stop_after
        checkpoint_now = run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps or stopping
        if checkpoint_now:  # nothing non-finite is ever checkpointed (logged steps are checked below)
            _check_finite(run, float(metrics["loss"]), finite(run.state))
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            last = {k: float(v) for k, v in metrics.items()}
            _check_finite(run, last["loss"])
            rate = clock.rate(run.step - start_step)
            run.log({"step": run.step, **last, "learning_rate": float(run.schedule(run.step - 1)),
                     "examples_per_second": rate, "compile_seconds": clock.compile_seconds,
                     "skipped_samples": run.batches.skipped})
            bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=rate)
        eval_metrics = None
        # With best_metric every checkpoint is evaluated: one saved without the metric would be dropped.
        if run.evaluator is not None and ((cfg.eval_every and run.step % cfg.eval_every == 0)
                                          or run.step == cfg.steps or (checkpoint_now and cfg.best_metric)):
            eval_metrics = run.evaluator(run.task())
            run.log({"step": run.step, **eval_metrics})
            bar.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()
                                                      if isinstance(v, float)))
        if checkpoint_now:
            run.save(eval_metrics if cfg.best_metric else None)
        bar.update(1)
    return last


def _check_finite(run: Run, loss: float, state_finite: bool = True):
    """Stops the run at a NaN or Inf loss or state: it is not checkpointed, and no model is saved from it."""
    if not np.isfinite(loss) or not state_finite:
        kept, what = run.manager.latest_step(), f"loss is {loss}" if not np.isfinite(loss) else "weights hold NaN/Inf"
        raise UsageError(f"the training {what} at step {run.step}: the run stops and saves nothing from this "
                         f"state ({f'checkpoint {kept} is kept' if kept is not None else 'no checkpoint was kept'}"
                         f"); lower optim.learning_rate, set optim.clip_norm, or check the data")


def finetune(cfg: FinetuneConfig, workdir: str, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Trains `cfg` in `workdir` (resuming when it holds this run's checkpoints); returns a summary.

    The workdir's lock (`WORKDIR/job.lock`, `pe_jax.storage.locks`) is held for the whole run: a second run
    into the same workdir is refused, naming the holder. `stop_after` ends the process's work after that many
    steps of this call (for tests and time limits), checkpointing first; the next call resumes.

    Args:
        cfg: the run (`pe_jax.train.config.load_config(recipe)`, `apply_overrides`); workdir: its folder.
        progress: show a bar; stop_after: steps of this call at most.

    Example:
        >>> summary = finetune(load_config("demo_shapes")[0], "runs/demo")  # doctest: +SKIP
    """
    from pe_jax import distributed

    distributed.initialize()
    for src in (cfg.data.train, cfg.data.eval):
        if src:
            check_outside(workdir, src, what="workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise storage_error(e, workdir, "create the folder") from None
    lock = folder_lock(workdir, "finetuning run") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:  # a multi-host job's processes share it
        return _finetune(cfg, workdir, progress, stop_after)


def _finetune(cfg: FinetuneConfig, workdir: str, progress: bool, stop_after: int | None) -> dict:
    from tqdm import tqdm

    # The bar shows from the first second: loading and compiling take tens of seconds before any step.
    bar = tqdm(total=cfg.steps, desc="finetune: loading the model and data", unit="step", disable=not progress)
    with bar:
        run = _start(cfg, workdir)
        bar.update(run.step)
        bar.set_description("finetune: compiling the step")
        ctx = jax.set_mesh(run.mesh) if run.mesh is not None else contextlib.nullcontext()
        with guarded(run.manager, os.path.join(workdir, "checkpoints"), step=lambda: run.saving):
            with ctx:
                _train(run, bar, stop_after)
            run.manager.wait_until_finished()
            write_step_checksums(os.path.join(workdir, "checkpoints"), run.manager.all_steps())
            run.manager.close()
    summary = {"step": run.step, "steps": cfg.steps, "complete": run.step >= cfg.steps,
               "skipped_samples": run.batches.skipped, "failed_samples": len(run.failed),
               "last_errors": run.batches.errors[-3:]}
    summary.update(_last_rows(run.metrics_path, run.step))  # this run's figures, or a finished run's
    if run.step >= cfg.steps:
        if not final_model(cfg, workdir):  # this run's model when there: a rerun of a finished run
            _save_final(run)
        summary["model"] = os.path.join(workdir, MODEL)
    return summary


def _last_rows(path: str, step: int) -> dict:
    """The last training row (loss, ...) and the last evaluation row logged up to `step`."""
    rows = [r for r in metrics_rows(path) if r["step"] <= step]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    return {k: v for r in (train[-1:] + evals[-1:]) for k, v in r.items() if k != "step"}


def _save_final(run: Run):
    """The trained model as `WORKDIR/model`, a pe_jax checkpoint (written into `model.pe_jax-tmp-shared`, then
    renamed: nothing else is ever removed or replaced); a classifier's head too. A model with NaN or Inf
    weights is never saved.

    Every process of a multi-host job writes its shards into the same temporary folder; process 0 alone
    prepares it, writes the metadata and the head, and renames it, between barriers."""
    from pe_jax.checkpoints.orbax import save

    task, workdir, cfg, classnames = run.task(), run.workdir, run.cfg, run.classnames
    if not finite(run.state):  # the program of the checkpoints' check: nothing compiled here
        bad = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(task, nnx.Param))
               if not bool(jax.numpy.isfinite(v.get_value()).all())]
        raise UsageError(f"the trained weights hold NaN or Inf ({', '.join(bad[:3]) or 'the optimizer state'}); "
                         "no model is saved")
    path, tmp, lead = os.path.join(workdir, MODEL), os.path.join(workdir, PARTIAL_MODEL), jax.process_index() == 0
    if lead:  # pe-jax's own name: a killed save's leftover; a link or file planted there is removed, never followed
        if os.path.islink(tmp) or os.path.isfile(tmp):
            os.unlink(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier("pe_jax_final_model_prepare")
    try:
        save(task.model, tmp, preset=cfg.model.preset, extra={"finetune": config_to_dict(cfg)})
        barrier("pe_jax_final_model_saved")
        if lead:
            if cfg.task == "classification":
                head = {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
                        for p, v in nnx.to_flat_state(nnx.state(task, nnx.Param)) if p[0] in ("hidden", "out")}
                np.savez(os.path.join(tmp, "head.npz"), **head)
                write_json(os.path.join(tmp, "classes.json"),
                           {"classnames": classnames, "head": cfg.head, "layer_idx": cfg.layer_idx,
                            "pooling": cfg.pooling}, indent=1)
            rename_noreplace(tmp, path)  # a model/ that appeared meanwhile is never replaced
        barrier("pe_jax_final_model_renamed")
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
