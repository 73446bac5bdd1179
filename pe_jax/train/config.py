"""A finetuning job's typed, frozen config: recipes (`configs/NAME.py` with `get_config()`), `--set`
overrides parsed to each field's type, validation of every value, and the JSON form a workdir keeps."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import traceback
import typing
from dataclasses import dataclass, field

from pe_jax.config import parse_mesh
from pe_jax.errors import NotFound, UsageError, WrongType


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

    def __post_init__(self):
        _check(self.image_size is None or self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        _check(self.workers >= 1, f"data.workers must be >= 1, got {self.workers}")
        _check(self.eval_max_images is None or self.eval_max_images >= 1, "data.eval_max_images must be >= 1")
        _check(len(self.eval_templates) > 0 and all("{}" in t for t in self.eval_templates),
               "every data.eval_templates entry needs a '{}' placeholder for the class name")


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

    def __post_init__(self):
        _check(self.optimizer in ("adamw", "lamb"), f"unknown optim.optimizer {self.optimizer!r}: adamw or lamb")
        _check(self.learning_rate > 0, f"optim.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.end_lr_fraction <= 1, f"optim.end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm is None or self.clip_norm > 0,
               f"optim.clip_norm must be > 0 or None, got {self.clip_norm}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1,
               f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1,
               f"optim.layer_decay must be in (0, 1] or None, got {self.layer_decay}")


METRIC_LOSSES = ("supcon", "arcface", "cosface", "multi_similarity")  # pe_jax.train.metric_losses


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "contrastive"  # or "classification", or "retrieval" (metric learning on labelled images)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: str = "softmax"  # contrastive: "softmax" (CLIP) or "sigmoid" (SigLIP)
    freeze: str = "none"  # "text" / "vision" (a CLIP tower), "encoder" (linear probe)
    head: str = "linear"  # classification head: "linear" or "mlp"
    metric_loss: str = "supcon"  # retrieval: "supcon", "arcface", "cosface" or "multi_similarity"
    classes_per_batch: int | None = None  # retrieval: P classes x K = batch_size / P images (default K = 4)
    layer_idx: int | None = None  # classification / retrieval on features of this block instead of the embedding
    pooling: str | None = None  # of those features: attn, mean or cls (pe_jax.features; default as there)
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
        _check(self.task in ("contrastive", "classification", "retrieval"), f"unknown task {self.task!r}: "
               "contrastive, classification or retrieval")
        _check(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        _check(self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0,
               f"batch_size {self.batch_size} must be a multiple of grad_accum_steps {self.grad_accum_steps}")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1 (a run resumes from one), got "
               f"{self.keep_checkpoints}")
        _check(self.optim.warmup_steps <= self.steps, f"optim.warmup_steps {self.optim.warmup_steps} exceeds steps "
               f"{self.steps}")
        _check(self.loss in ("softmax", "sigmoid"), f"unknown loss {self.loss!r}: softmax or sigmoid")
        _check(self.head in ("linear", "mlp"), f"unknown head {self.head!r}: linear or mlp")
        _check(not self.best_metric or self.data.eval, "best_metric needs held-out data (data.eval)")
        _check(self.metric_loss in METRIC_LOSSES, f"unknown metric_loss {self.metric_loss!r}: one of {METRIC_LOSSES}")
        if self.mesh:
            parse_mesh(self.mesh)  # its syntax, before jax loads
        if self.task == "retrieval":
            p = self.batch_classes
            _check(p >= 2 and self.batch_size % p == 0, f"classes_per_batch {p} must be >= 2 and divide batch_size "
                   f"{self.batch_size} (a batch is P classes x K images)")

    @property
    def batch_classes(self) -> int:
        """P of a retrieval run's P x K batches."""
        return self.classes_per_batch or max(1, self.batch_size // 4)


# Fields that do not change the training trajectory: a resumed run may change them.
RESUMABLE_CHANGES = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "best_metric",
                     "async_checkpoints", "data.eval", "data.eval_templates", "data.eval_max_images",
                     "data.eval_classes", "data.workers")


def _check(ok: bool, message: str):
    if not ok:
        raise UsageError(message)


def load_config(spec: str) -> tuple[FinetuneConfig, object]:
    """(config, module) from a config file's `get_config()`, or from a config shipped with pe_jax by name
    (`demo_shapes`, `clip_contrastive`, `classification`, `linear_probe`, `retrieval`, `demo_retrieval`)."""
    if os.path.isfile(spec):
        name = os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(f"pe_jax_config_{name}", spec)
        module = importlib.util.module_from_spec(module_spec)
        _guarded(spec, "the config file failed to load", lambda: module_spec.loader.exec_module(module))
    else:
        name = os.path.splitext(os.path.basename(spec))[0]
        try:
            module = importlib.import_module(f"pe_jax.configs.{name}")
        except ModuleNotFoundError:
            raise NotFound(f"no config file {spec} (and no shipped config named {name!r})") from None
    if not hasattr(module, "get_config"):
        raise UsageError(f"{spec}: a config file defines get_config() -> FinetuneConfig")
    cfg = _guarded(spec, "get_config() raised", module.get_config)
    if not isinstance(cfg, FinetuneConfig):
        raise WrongType(f"{spec}: get_config() returned {type(cfg).__name__}, not a FinetuneConfig")
    return cfg, module


def _guarded(spec: str, what: str, call):
    """call(), with any error in a recipe's code as one line naming the file (and line, for a syntax error)."""
    try:
        return call()
    except SyntaxError as e:
        raise UsageError(f"{spec}, line {e.lineno}: {what}: SyntaxError: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 (a recipe is user code: whatever it raises is its error)
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if os.path.abspath(f.filename) == os.path.abspath(spec)), None)
        where = f"{spec}, line {line}" if line else spec
        raise UsageError(f"{where}: {what}: {type(e).__name__}: {e}") from None


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
    values = config_to_dict(cfg)
    for key, value in overrides.items():
        _set(values, type(cfg), key.split("."), value, key)
    return config_from_dict(values)  # validated once, with every override in place


def _set(values: dict, cls, path: list[str], value: str, full: str):
    """Puts the parsed `value` at `path` in `values`, the dict form of a `cls` instance."""
    hints = typing.get_type_hints(cls)
    head = path[0]
    if head not in hints:
        raise UsageError(f"unknown config key {full!r}: {cls.__name__} has {', '.join(sorted(hints))}")
    hint = hints[head]
    if len(path) == 1:
        values[head] = _parse(value, hint, full)
    elif dataclasses.is_dataclass(hint):
        _set(values[head], hint, path[1:], value, full)
    elif hint is dict and len(path) == 2:
        values[head] = {**values[head], path[1]: _literal(value)}
    else:
        raise UsageError(f"unknown config key {full!r}: {head} has no sub-keys")


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
    raise UsageError(f"config key {key!r} expects {getattr(base, '__name__', base)}, got {text!r}")


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> FinetuneConfig:
    d = dict(d)
    data = dict(d.pop("data"))
    data["eval_templates"] = tuple(data["eval_templates"])
    data["eval_classes"] = tuple(data["eval_classes"]) if data.get("eval_classes") else None
    return FinetuneConfig(model=ModelSpec(**d.pop("model")), data=DataSpec(**data), optim=OptimSpec(**d.pop("optim")),
                          **d)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
