"""Finetuning jobs: a typed config, a workdir, and a loop that resumes exactly.

`finetune(config, workdir)` builds the task (contrastive CLIP or classifier) from a preset and optional
checkpoint, shards it over a mesh by the rules of `pe_jax.sharding`, and trains with the jitted step of
`pe_jax.training`. The workdir holds:

  config.json      the run's config; a rerun with another config is refused while checkpoints exist
  checkpoints/     Orbax CheckpointManager steps: (task, optimizer) state and the data iterator's state
  metrics.jsonl    one row per logged step and per evaluation
  model/           the final weights, a pe_jax checkpoint (`pe-jax export` turns it into PyTorch files)

Killed at any point (even SIGKILL), the same command resumes from the latest checkpoint and continues the
identical loss trajectory: same parameters, optimizer state, data order and augmentation; rows that the
killed run logged after that checkpoint are dropped from metrics.jsonl and logged again.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import time
import typing
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

import pe_jax
from pe_jax import sharding as sh

# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelSpec:
    preset: str = "PE-Core-B16-224"
    checkpoint: str | None = None  # a pe_jax checkpoint or PyTorch file; None trains from scratch
    overrides: dict = field(default_factory=dict)  # `from_config` overrides: vision_layers=2, dtype="bfloat16", ...


@dataclass(frozen=True)
class DataSpec:
    train: str = ""  # pairs: JSONL/CSV of (path, caption) or 'shards/{000..099}.tar'; labels: folder or CSV
    eval: str | None = None  # held-out labelled images (folder per class or CSV of path,label)
    image_size: int | None = None  # default: the preset's
    augment: bool = False  # random resized crop + horizontal flip
    workers: int = 4  # decoding threads
    eval_templates: tuple[str, ...] = ("a photo of a {}.",)  # zero-shot prompts (contrastive)
    eval_max_images: int | None = 5000
    eval_classes: tuple[str, ...] | None = None  # classes to choose among (default: the eval data's labels)


@dataclass(frozen=True)
class OptimSpec:
    optimizer: str = "adamw"  # or "lamb"
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0  # cosine decays to this fraction of the peak
    weight_decay: float = 0.05
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.98
    layer_decay: float | None = None  # layer-wise learning-rate decay, e.g. 0.75


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "contrastive"  # or "classification"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: str = "softmax"  # contrastive: "softmax" (CLIP) or "sigmoid" (SigLIP)
    freeze: str = "none"  # "text" / "vision" (a CLIP tower), "encoder" (linear probe)
    head: str = "linear"  # classification head: "linear" or "mlp"
    layer_idx: int | None = None  # classification on the mean tokens of this block instead of the embedding
    batch_size: int = 32  # global, over all hosts
    grad_accum_steps: int = 1
    steps: int = 1000
    seed: int = 0
    mesh: str | None = None  # e.g. "fsdp=8" or "fsdp=4,model=2"; None: one device
    strategy: str = "fsdp"
    log_every: int = 10
    eval_every: int = 0  # 0: at the end only
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    best_metric: str | None = None  # also keep the best checkpoint by this evaluation metric
    async_checkpoints: bool = True

    def __post_init__(self):
        _check(self.task in ("contrastive", "classification"), f"unknown task {self.task!r}")
        _check(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        _check(self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0,
               f"batch_size {self.batch_size} must be a multiple of grad_accum_steps {self.grad_accum_steps}")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        _check(not self.best_metric or self.data.eval, "best_metric needs held-out data (data.eval)")


# Fields that do not change the training trajectory: a resumed run may change them.
RESUMABLE_CHANGES = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "best_metric",
                     "async_checkpoints", "data.eval", "data.eval_templates", "data.eval_max_images",
                     "data.eval_classes", "data.workers")


def _check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def load_config(spec: str) -> tuple[FinetuneConfig, object]:
    """(config, module) from a config file's `get_config()`, or from a config shipped with pe_jax by name
    (`demo_shapes`, `clip_contrastive`, `classification`, `linear_probe`)."""
    if os.path.isfile(spec):
        name = os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(f"pe_jax_config_{name}", spec)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        name = os.path.splitext(os.path.basename(spec))[0]
        try:
            module = importlib.import_module(f"pe_jax.configs.{name}")
        except ModuleNotFoundError:
            raise FileNotFoundError(f"no config file {spec} (and no shipped config named {name!r})") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"{spec}: a config file defines get_config() -> FinetuneConfig")
    cfg = module.get_config()
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"{spec}: get_config() returned {type(cfg).__name__}, not a FinetuneConfig")
    return cfg, module


def apply_overrides(cfg, overrides: dict[str, str] | list[str]):
    """`cfg` with 'section.field=value' overrides applied; values are parsed to the field's type.

    Dict fields take sub-keys (`model.overrides.vision_layers=2`). An unknown key names the valid ones.
    """
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            key, eq, value = item.partition("=")
            _check(bool(eq), f"--set expects key=value, got {item!r}")
            pairs[key.strip()] = value
        overrides = pairs
    for key, value in overrides.items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, path: list[str], value: str, full: str):
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ValueError(f"unknown config key {full!r}: {type(obj).__name__} has {', '.join(sorted(names))}")
    current = getattr(obj, head)
    hint = typing.get_type_hints(type(obj))[head]
    if len(path) == 1:
        new = _parse(value, hint, full)
    elif dataclasses.is_dataclass(current):
        new = _set(current, path[1:], value, full)
    elif isinstance(current, dict) and len(path) == 2:
        new = {**current, path[1]: _literal(value)}
    else:
        raise ValueError(f"unknown config key {full!r}: {head} has no sub-keys")
    return dataclasses.replace(obj, **{head: new})


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _parse(text: str, hint, key: str):
    args = typing.get_args(hint)
    if text in ("None", "none", "null") and type(None) in args:
        return None
    is_union = args and typing.get_origin(hint) is not tuple
    base = next((a for a in args if a is not type(None)), hint) if is_union else hint
    if base is str:
        return text
    value = _literal(text)
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = (value,)
        if isinstance(value, list | tuple):
            return tuple(value)
    elif base is bool and isinstance(value, bool):
        return value
    elif base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif base is dict and isinstance(value, dict):
        return value
    raise ValueError(f"config key {key!r} expects {getattr(base, '__name__', base)}, got {text!r}")


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> FinetuneConfig:
    d = dict(d)
    data = dict(d.pop("data"))
    data["eval_templates"] = tuple(data["eval_templates"])
    data["eval_classes"] = tuple(data["eval_classes"]) if data.get("eval_classes") else None
    return FinetuneConfig(model=ModelSpec(**d.pop("model")), data=DataSpec(**data), optim=OptimSpec(**d.pop("optim")),
                          **d)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------------- building


def _holds_clip(checkpoint: str) -> bool:
    from pe_jax.checkpoint import is_pe_jax_checkpoint, read_metadata

    if is_pe_jax_checkpoint(checkpoint):
        return read_metadata(checkpoint)["config"]["type"] == "CLIPConfig"
    from pe_jax.convert.readers import open_state_dict
    from pe_jax.weights import detect_naming

    return detect_naming(open_state_dict(checkpoint).keys()) != "timm"


def build_task(cfg: FinetuneConfig, num_classes: int | None = None, mesh=None):
    """The task module of `cfg`: ContrastiveTask(CLIP) or Classifier(vision tower), weights loaded."""
    from pe_jax.config import EXECUTION_FIELDS, TEXT_PRESETS
    from pe_jax.training import Classifier, ContrastiveTask

    m = cfg.model
    load = dict(checkpoint=m.checkpoint, seed=cfg.seed, mesh=mesh, strategy=cfg.strategy)
    image_size = cfg.data.image_size
    if cfg.task == "contrastive":
        if m.preset not in TEXT_PRESETS:
            raise ValueError(f"contrastive finetuning needs a PE-Core CLIP preset, not {m.preset!r}")
        overrides = dict(m.overrides, **({"vision_image_size": image_size} if image_size else {}))
        return ContrastiveTask(pe_jax.CLIP.from_config(m.preset, **load, **overrides), cfg.loss)
    overrides = dict(m.overrides, **({"image_size": image_size} if image_size else {}))
    if m.checkpoint is not None and m.preset in TEXT_PRESETS and _holds_clip(m.checkpoint):
        clip_overrides = {k if k in EXECUTION_FIELDS else f"vision_{k}": v for k, v in overrides.items()}
        encoder = pe_jax.CLIP.from_config(m.preset, **load, **clip_overrides).visual
    else:
        encoder = pe_jax.VisionTransformer.from_config(m.preset, **load, **overrides)
    return Classifier(encoder, num_classes, head=cfg.head, layer_idx=cfg.layer_idx, rngs=nnx.Rngs(cfg.seed + 1))


def _image_size(task) -> int:
    return task.model.config.vision.image_size if hasattr(task.model.config, "vision") else task.model.config.image_size


# ---------------------------------------------------------------------------------------------------- workdir


def _prepare_workdir(cfg: FinetuneConfig, workdir: str) -> bool:
    """Writes config.json; returns whether checkpoints of this same run exist (resume). Refuses another run's."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    has_checkpoints = any(n.isdigit() for n in _listdir(os.path.join(workdir, "checkpoints")))
    if has_checkpoints:
        if not os.path.exists(path):
            raise ValueError(f"{workdir} holds checkpoints but no config.json: not a pe-jax finetune workdir; "
                             "use another --workdir")
        with open(path) as f:
            old = _flatten(json.load(f))
        new = _flatten(config_to_dict(cfg))
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if differ:
            lines = [f"  {k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now" for k in differ]
            raise ValueError(f"{workdir} holds checkpoints of another run; refusing to mix them (use another "
                             "--workdir, or the same config to resume):\n" + "\n".join(lines))
    if jax.process_index() == 0:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(config_to_dict(cfg), f, indent=1)
        os.replace(tmp, path)
    return has_checkpoints


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _truncate_metrics(path: str, step: int):
    """Drops rows logged after `step` (by a run killed after its last checkpoint): they are logged again."""
    if not os.path.exists(path) or jax.process_index() != 0:
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(rows)
    os.replace(f"{path}.tmp", path)


def checkpoint_manager(directory: str, cfg: FinetuneConfig):
    import orbax.checkpoint as ocp

    best = cfg.best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints,
        best_fn=(lambda metrics: metrics[best]) if best else None, best_mode="max",
        keep_checkpoints_without_metrics=False if best else True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


# ---------------------------------------------------------------------------------------------------- evaluation


def _encode_image(model, images):
    return model.encode_image(images, normalize=True)


def _encode_text(model, tokens):
    return model.encode_text(tokens, normalize=True)


def _classify(task, images):
    return task(images)


class Evaluator:
    """Held-out accuracy: zero-shot for a CLIP (class names x templates), the head's for a classifier.

    The images are decoded once; the jitted encoders compile once per shape.
    """

    def __init__(self, cfg: FinetuneConfig, image_size: int, context_length: int | None, mesh=None):
        from pe_jax.data import load_eval_images

        self.cfg, self.mesh = cfg, mesh
        self.images, self.labels, self.classnames, self.failures = load_eval_images(
            cfg.data.eval, image_size, max_images=cfg.data.eval_max_images, classnames=cfg.data.eval_classes)
        if cfg.task == "contrastive":
            from pe_jax.transforms import get_text_tokenizer

            prompts = [t.format(c) for c in self.classnames for t in cfg.data.eval_templates]
            self.prompts = get_text_tokenizer(context_length)(prompts)

    def logits(self, task) -> np.ndarray:
        """[images, classes]: zero-shot (100 x cosine to the template-averaged class embeddings) or the head's."""
        from pe_jax.inference import run_batched

        batch = min(64, max(8, self.cfg.batch_size))
        if self.cfg.task != "contrastive":
            return run_batched(_classify, task, self.images, batch_size=batch, mesh=self.mesh)
        text = run_batched(_encode_text, task.model, self.prompts, batch_size=256, mesh=self.mesh)
        images = run_batched(_encode_image, task.model, self.images, batch_size=batch, mesh=self.mesh)
        return self.zero_shot_logits(images, text)

    def zero_shot_logits(self, image_features, prompt_features) -> np.ndarray:
        from pe_jax.zero_shot import classify

        per_class = prompt_features.reshape(len(self.classnames), len(self.cfg.data.eval_templates), -1).mean(axis=1)
        per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
        return classify(image_features, per_class)

    def __call__(self, task) -> dict:
        from pe_jax.zero_shot import accuracy_metrics

        m = accuracy_metrics(np.asarray(self.logits(task), np.float32), self.labels, len(self.classnames))
        return {"eval_top1": m["top1"], "eval_top5": m["top5"],
                "eval_mean_per_class_recall": m["mean_per_class_recall"], "eval_images": m["num_images"]}


# ---------------------------------------------------------------------------------------------------- the job


def finetune(cfg: FinetuneConfig, workdir: str, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Trains `cfg` in `workdir` (resuming when it holds this run's checkpoints); returns a summary.

    `stop_after` ends the process's work after that many steps of this call (for tests and time limits),
    checkpointing first; the next call resumes.
    """
    import grain
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from pe_jax import distributed
    from pe_jax.data import Batches, StateSnapshot, list_labelled, list_pairs
    from pe_jax.training import init_train_state, make_optimizer, make_train_step, trainable_filter, warmup_cosine

    distributed.initialize()
    resume = _prepare_workdir(cfg, workdir)
    mesh = sh.make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        sh.check_strategy(cfg.strategy)
        dp = sh.data_parallel_size(mesh) * cfg.grad_accum_steps
        _check(cfg.batch_size % dp == 0, f"batch_size {cfg.batch_size} must be a multiple of the data-parallel size "
               f"x grad_accum_steps ({dp})")
    nproc = jax.process_count()
    _check(cfg.batch_size % nproc == 0, f"batch_size {cfg.batch_size} must be a multiple of the {nproc} processes")

    classnames = None
    if cfg.task == "contrastive":
        records = list_pairs(cfg.data.train)
    else:
        records, classnames = list_labelled(cfg.data.train)
    if not records:
        raise ValueError(f"{cfg.data.train}: the training dataset is empty")

    task = build_task(cfg, len(classnames) if classnames else None, mesh)
    image_size = _image_size(task)
    context = task.model.config.text.context_length if cfg.task == "contrastive" else None
    tokenizer = None
    if context:
        from pe_jax.transforms import get_text_tokenizer

        tokenizer = get_text_tokenizer(context)
    batches = Batches(records, cfg.batch_size // nproc, image_size=image_size, tokenizer=tokenizer,
                      augment=cfg.data.augment, seed=cfg.seed, workers=cfg.data.workers,
                      process_index=jax.process_index(), process_count=nproc)
    evaluator = Evaluator(cfg, image_size, context, mesh) if cfg.data.eval else None

    o = cfg.optim
    schedule = warmup_cosine(o.learning_rate, cfg.steps, o.warmup_steps, o.end_lr_fraction)
    tx = make_optimizer(schedule, o.weight_decay, o.clip_norm, optimizer=o.optimizer, b1=o.b1, b2=o.b2,
                        layer_decay_rate=o.layer_decay)
    trainable = trainable_filter(cfg.freeze)
    graphdef, state = init_train_state(task, tx, trainable, mesh, cfg.strategy)
    del task
    step_fn = jax.jit(make_train_step(graphdef, trainable=trainable, mesh=mesh, strategy=cfg.strategy,
                                      accum_steps=cfg.grad_accum_steps), donate_argnums=0)

    manager = checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    step = 0
    if resume and manager.latest_step() is not None:
        step = manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(batches)))
        state = restored["state"]
        _truncate_metrics(metrics_path, step)
    elif jax.process_index() == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run: nothing of an earlier, checkpoint-less attempt counts

    def log(row):
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def place(batch):
        if mesh is None:
            return batch
        return {k: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}

    def evaluate():
        task_now, _ = nnx.merge(graphdef, state)
        return evaluator(task_now)

    def save(metrics=None):
        # The data state is captured now; an async write happens while training goes on.
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(StateSnapshot(batches))),
                     metrics=metrics)

    start_step, start_time, last = step, time.perf_counter(), {}
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx, tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step", disable=not progress) as bar:
        while step < cfg.steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            state, metrics = step_fn(state, place(next(batches)))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - start_time
                last = {k: float(v) for k, v in metrics.items()}
                row = {"step": step, **last, "learning_rate": float(schedule(step - 1)),
                       "examples_per_second": round((step - start_step) * cfg.batch_size / elapsed, 2),
                       "skipped_samples": batches.skipped}
                log(row)
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=row["examples_per_second"])
            checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps or (
                stop_after is not None and step - start_step >= stop_after)
            eval_metrics = None
            # With best_metric every checkpoint is evaluated: one saved without the metric would be dropped.
            if evaluator is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
                                          or (checkpoint_now and cfg.best_metric)):
                eval_metrics = evaluate()
                log({"step": step, **eval_metrics})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()
                                                      if isinstance(v, float)))
            if checkpoint_now:
                save(eval_metrics if cfg.best_metric else None)
            bar.update(1)
    manager.wait_until_finished()
    manager.close()

    summary = {"step": step, "steps": cfg.steps, "complete": step >= cfg.steps, "skipped_samples": batches.skipped,
               "last_errors": batches.errors[-3:], **last}
    if step >= cfg.steps:
        final = os.path.join(workdir, "model")
        if not os.path.exists(final):
            task_now, _ = nnx.merge(graphdef, state)
            _save_final(task_now, final, cfg, classnames)
        if evaluator is not None:
            summary.update(_last_eval(metrics_path))
        summary["model"] = final
    return summary


def _last_eval(path: str) -> dict:
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    evals = [r for r in rows if "eval_top1" in r]
    return {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}


def _save_final(task, path: str, cfg: FinetuneConfig, classnames):
    """The trained model as a pe_jax checkpoint (written beside, then renamed); a classifier's head too."""
    tmp = f"{path}.tmp"  # the same name in every process of a multi-host job
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pe_jax.save(task.model, tmp, preset=cfg.model.preset, extra={"finetune": config_to_dict(cfg)})
        if classnames is not None and jax.process_index() == 0:
            head = {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
                    for p, v in nnx.to_flat_state(nnx.state(task, nnx.Param)) if p[0] in ("hidden", "out")}
            np.savez(os.path.join(tmp, "head.npz"), **head)
            with open(os.path.join(tmp, "classes.json"), "w") as f:
                json.dump({"classnames": classnames, "head": cfg.head, "layer_idx": cfg.layer_idx}, f)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
