"""Will it fit? Compiles a model's forward pass for a mesh from abstract shapes and reads XLA's memory plan.

Nothing is allocated at full size: parameters and inputs are `ShapeDtypeStruct`s carrying their
shardings, so the full G/14 compiles for 8 devices on a laptop. Figures are per device and come from the
compiler of the platform it runs on (fake CPU devices from `pe-jax plan`): estimates, to be re-checked on
the real accelerator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.config import TEXT_PRESETS, VisionConfig, clip_config, vision_config
from pe_jax.modeling import CLIP, VisionTransformer

GiB = 1024**3


def vision_flops(cfg: VisionConfig, image_size: int | None = None) -> float:
    """Analytic forward FLOPs per image (matmuls and attention scores; norms and activations are noise)."""
    size = image_size or cfg.image_size
    patches = (size // cfg.patch_size) ** 2
    n, d, m = patches + int(cfg.use_cls_token), cfg.width, cfg.mlp_dim
    flops = cfg.layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d) + 2 * patches * 3 * cfg.patch_size**2 * d
    if cfg.pool_type == "attn":
        flops += 2 * (2 * n * d * d + 2 * d * d + 2 * d * cfg.attn_pooler_mlp_ratio * d) + 4 * n * d
    if cfg.output_dim:
        flops += 2 * d * cfg.output_dim
    return float(flops)


@dataclass(frozen=True)
class Plan:
    model: str
    mesh: dict
    strategy: str
    batch: int
    padded_batch: int
    dtype: str
    remat: str
    train: bool
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    flops_per_example: float
    lower_seconds: float
    compile_seconds: float

    @property
    def peak_gib(self) -> float:
        return self.argument_gib + self.output_gib - self.alias_gib + self.temp_gib

    def report(self) -> str:
        return "\n".join([
            f"model: {self.model}  mesh: {self.mesh}  strategy: {self.strategy}  global batch: {self.batch}"
            + (f" (padded to {self.padded_batch})" if self.padded_batch != self.batch else ""),
            f"compute dtype: {self.dtype}  remat: {self.remat}  pass: {'train step' if self.train else 'forward'}",
            f"analytic FLOPs per example: {self.flops_per_example / 1e12:.3f} TFLOP",
            f"trace+lower: {self.lower_seconds:.2f} s  compile: {self.compile_seconds:.2f} s",
            f"per device: arguments {self.argument_gib:.2f} GiB, outputs {self.output_gib:.2f} GiB, "
            f"aliased {self.alias_gib:.2f} GiB, temporaries {self.temp_gib:.2f} GiB",
            f"peak per device: {self.peak_gib:.2f} GiB",
        ])


def plan(model: str, mesh, batch: int, *, strategy: str = "fsdp", dtype: str = "bfloat16",
         remat: str = "nothing_saveable", train: bool = False, image_size: int | None = None) -> Plan:
    """Compiles preset `model` for `mesh` (a Mesh or "fsdp=8,model=2") at global `batch` and reads its memory.

    Forward: `encode_image` (and `encode_text` for CLIP presets) with parameters in `dtype`. Train: the
    finetuning step (fp32 master weights and AdamW state, `dtype` compute, `remat` policy, donated).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    mesh = sh.make_mesh(mesh) if not isinstance(mesh, jax.sharding.Mesh) else mesh
    sh.check_strategy(strategy)
    dp = sh.data_parallel_size(mesh)
    padded = -(-batch // dp) * dp  # as inference does: a partial batch is padded, not refused
    is_clip = model in TEXT_PRESETS
    # Train: fp32 master weights, `dtype` compute. Forward: weights stored in `dtype`.
    overrides = dict(dtype=dtype, remat_policy=remat, param_dtype="float32" if train else dtype)
    if image_size:
        overrides["vision_image_size" if is_clip else "image_size"] = image_size
    cfg = clip_config(model, **overrides) if is_clip else vision_config(model, **overrides)
    cls = CLIP if is_clip else VisionTransformer
    abstract_model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    vcfg = cfg.vision if is_clip else cfg
    size = vcfg.image_size
    images = jax.ShapeDtypeStruct((padded, size, size, 3), jnp.float32, sharding=sh.batch_sharding(mesh, 4))
    args = [images]
    flops = vision_flops(vcfg)
    if is_clip:
        ctx = cfg.text.context_length
        args.append(jax.ShapeDtypeStruct((padded, ctx), jnp.int32, sharding=sh.batch_sharding(mesh, 2)))
        t = cfg.text
        flops += t.layers * (2 * ctx * (4 * t.width**2 + 2 * t.width * t.mlp_dim) + 4 * ctx * ctx * t.width)

    if train:
        fn, fn_args = _train_step(cls, cfg, is_clip, images, args, padded, mesh, strategy)
        flops *= 3
    else:
        fn, fn_args = _forward(abstract_model, is_clip, args, mesh, strategy)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*fn_args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
    done = time.perf_counter()
    mem = compiled.memory_analysis()
    return Plan(model=model, mesh=dict(mesh.shape), strategy=strategy, batch=batch, padded_batch=padded,
                dtype=dtype, remat=remat, train=train, argument_gib=mem.argument_size_in_bytes / GiB,
                output_gib=mem.output_size_in_bytes / GiB,
                alias_gib=mem.alias_size_in_bytes / GiB, temp_gib=mem.temp_size_in_bytes / GiB,
                flops_per_example=flops, lower_seconds=lowered_at - start, compile_seconds=done - lowered_at)


def _train_step(cls, cfg, is_clip: bool, images, args, padded: int, mesh, strategy: str):
    """The finetuning step and its abstract (state, batch) arguments."""
    from pe_jax.train.step import abstract_train_state, make_train_step
    from pe_jax.train.tasks import Classifier, ContrastiveTask

    if is_clip:
        task = nnx.eval_shape(lambda: ContrastiveTask(cls(cfg, rngs=nnx.Rngs(0))))
        inputs = {"image": images, "tokens": args[1]}
    else:  # a vision tower alone: the classification recipe with 1000 classes
        task = nnx.eval_shape(lambda: Classifier(cls(cfg, rngs=nnx.Rngs(0)), 1000, rngs=nnx.Rngs(0)))
        inputs = {"image": images,
                  "label": jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=sh.batch_sharding(mesh, 1))}
    graphdef, state = abstract_train_state(task, mesh, strategy)
    return jax.jit(make_train_step(graphdef, mesh=mesh, strategy=strategy), donate_argnums=0), (state, inputs)


def _forward(abstract_model, is_clip: bool, args, mesh, strategy: str):
    """The forward pass (both encoders for a CLIP) and its abstract arguments."""
    graphdef, params = sh.abstract_sharded(abstract_model, mesh, strategy)

    def forward(params, *inputs):
        m = nnx.merge(graphdef, params)
        return (m.encode_image(inputs[0]), m.encode_text(inputs[1])) if is_clip else m(inputs[0])

    return jax.jit(forward), (params, *args)
