"""Will it fit? Compiles a model's forward pass or finetuning step for a mesh from abstract shapes and reads the
compiler's memory plan.

Nothing is allocated at full size: parameters and inputs are `ShapeDtypeStruct`s carrying their shardings,
so the full G/14 compiles for 8 devices on a laptop. With a `target` (`pe_jax.targets`: "v5e-8", "h100",
...) the program is compiled by that accelerator's own compiler for compile-only devices (libtpu, the CUDA
plugin), and its per-chip memory is checked against the chip's HBM. Without one, XLA:CPU compiles it for
fake CPU devices: another compiler with XLA attention, whose peak for L/14 and G/14 measured 0.68-1.01x the
TPU compiler's (splash pads tokens to 128) and 1.10-1.51x the CUDA compiler's, more at larger batches
(benchmarks/RESULTS.md): an estimate, neither a bound nor a fixed ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from pe_jax import sharding as sh
from pe_jax.attention import compiling_for, resolve_implementation
from pe_jax.config import VisionConfig
from pe_jax.errors import UsageError
from pe_jax.pretrained import resolve_model
from pe_jax.targets import Target

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
    attention: str = "xla"
    target: Target | None = None
    compiler_flops: float | None = None  # per device, from cost_analysis() (a scanned layer counted once)
    compiler_bytes: float | None = None
    weight_bytes_per_device: float = 0.0  # what each device reads of the (gathered) weights in one pass
    error: str | None = None  # the compiler's refusal (e.g. out of HBM)

    @property
    def peak_gib(self) -> float:
        return self.argument_gib + self.output_gib - self.alias_gib + self.temp_gib

    @property
    def fits(self) -> bool | None:
        """Whether the program fits the target's HBM (None without a target)."""
        if self.target is None:
            return None
        return self.error is None and self.peak_gib * GiB <= self.target.hbm_bytes

    def images_per_second(self) -> tuple[float, float]:
        """Roofline estimate (per chip, per slice): the step takes the longer of its FLOPs at the chip's peak
        and its weight reads at the chip's HBM bandwidth. Real runs reach a fraction of it."""
        chip, devices = self.target.chip, self.target.devices_total
        step_flops = self.flops_per_example * self.padded_batch / devices
        seconds = max(step_flops / chip.peak_bf16_flops, self.weight_bytes_per_device / chip.hbm_bytes_per_s)
        per_chip = self.padded_batch / devices / seconds
        return per_chip, per_chip * self.target.chips

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
            *self._target_lines(),
        ])

    def _target_lines(self) -> list[str]:
        if self.target is None:
            return ["compiler: XLA:CPU on fake devices, an estimate: for L/14 and G/14 its peak measured 0.68-1.01x "
                    "the TPU compiler's and 1.10-1.51x the CUDA compiler's; name a --target to ask the real one"]
        hbm = self.target.hbm_bytes / GiB
        lines = [f"target: {self.target.describe()}", f"attention: {self.attention}"]
        if self.error:
            return [*lines, f"does not fit: the {self.target.platform.upper()} compiler refused it: {self.error}"]
        free = hbm - self.peak_gib
        lines.append(f"fits, {free:.2f} GiB free of {hbm:.2f} GiB HBM per chip" if free >= 0 else
                     f"does not fit by {-free:.2f} GiB ({hbm:.2f} GiB HBM per chip)")
        if self.compiler_flops is not None:
            lines.append(f"compiler cost analysis per device: {self.compiler_flops / 1e12:.3f} TFLOP, "
                         f"{(self.compiler_bytes or 0) / GiB:.2f} GiB accessed (a scanned layer counted once)")
        per_chip, per_slice = self.images_per_second()
        unit = "steps' examples" if self.train else "images"
        lines.append(f"roofline estimate: {per_chip:,.0f} {unit}/s per chip, {per_slice:,.0f} per slice "
                     f"(peak FLOP/s and HBM bandwidth; real runs reach a fraction)")
        return lines


def plan(model: str, mesh, batch: int, *, strategy: str = "fsdp", dtype: str = "bfloat16",
         remat: str = "nothing_saveable", train: bool = False, image_size: int | None = None,
         target: Target | None = None, attention: str = "auto") -> Plan:
    """Compiles preset `model` for `mesh` at global `batch` and reads its memory (per device).

    Forward: `encode_image` (and `encode_text` for CLIP presets) with parameters in `dtype`. Train: the
    finetuning step (fp32 master weights and AdamW state, `dtype` compute, `remat` policy, donated).

    Args:
        model: a preset name, e.g. "PE-Core-G14-448".
        mesh: a Mesh, or axis sizes "fsdp=8,model=2" (over `target`'s chips, or this process's devices).
        batch: the global batch (padded up to a multiple of the data-parallel size, as inference does).
        strategy: sharding rules ("dp", "fsdp", "fsdp_tp").
        target: a `pe_jax.targets.Target`: compile with that accelerator's compiler and check its HBM.
        attention: the attention backend; "auto" resolves for the target's platform (splash on TPU).

    Example:
        >>> from pe_jax.targets import get_target
        >>> p = plan("PE-Core-G14-448", "fsdp=4", 64, target=get_target("v5p-8"))  # doctest: +SKIP
        >>> p.fits, p.peak_gib  # doctest: +SKIP
    """
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    if target is not None and not isinstance(mesh, jax.sharding.Mesh):
        from pe_jax.targets import make_mesh
        mesh = make_mesh(target, mesh)
    mesh = sh.make_mesh(mesh) if not isinstance(mesh, jax.sharding.Mesh) else mesh
    sh.check_strategy(strategy)
    dp = sh.data_parallel_size(mesh)
    padded = -(-batch // dp) * dp  # as inference does: a partial batch is padded, not refused
    platform = target.platform if target is not None else mesh.devices.flat[0].platform
    resolved = _resolve(model, dtype, remat, train, image_size, attention)
    cfg = resolved.config
    fn, fn_args, flops, weight_bytes = _program(resolved, mesh, strategy, padded, train)
    fields = dict(model=model, mesh=dict(mesh.shape), strategy=strategy, batch=batch, padded_batch=padded,
                  dtype=dtype, remat=remat, train=train, flops_per_example=flops, target=target,
                  weight_bytes_per_device=weight_bytes,
                  attention=_backends(cfg.vision if hasattr(cfg, "vision") else cfg, platform))
    start = time.perf_counter()
    # The program as it runs on the accelerator: "auto" attention as there; Mosaic kernels (splash) cannot
    # take a global "highest" precision with half-precision operands, and it changes no buffer sizes.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"), compiling_for(platform):
        lowered = fn.lower(*fn_args)
        lowered_at = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program over HBM at compile time
            if target is None or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return Plan(**fields, argument_gib=0, output_gib=0, alias_gib=0, temp_gib=0, lower_seconds=lowered_at
                        - start, compile_seconds=time.perf_counter() - lowered_at, error=_first_line(e))
    done = time.perf_counter()
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    return Plan(**fields, argument_gib=mem.argument_size_in_bytes / GiB, output_gib=mem.output_size_in_bytes / GiB,
                alias_gib=mem.alias_size_in_bytes / GiB, temp_gib=mem.temp_size_in_bytes / GiB,
                lower_seconds=lowered_at - start, compile_seconds=done - lowered_at,
                compiler_flops=cost.get("flops"), compiler_bytes=cost.get("bytes accessed"))


def _resolve(model: str, dtype: str, remat: str, train: bool, image_size, attention: str):
    """The preset as the plan compiles it (`pe_jax.pretrained.resolve_model`)."""
    resolved = resolve_model(model=model)
    # Train: fp32 master weights, `dtype` compute. Forward: weights stored in `dtype`.
    overrides = dict(dtype=dtype, remat_policy=remat, param_dtype="float32" if train else dtype, attention=attention)
    if image_size:
        overrides["vision_image_size" if hasattr(resolved.config, "text") else "image_size"] = image_size
    return resolved.override(**overrides)


def _backends(vcfg, platform: str) -> str:
    """What "auto" (or the named backend) runs for the blocks and for the pooling head, e.g. "cudnn (pooling
    head: xla)": "auto" decides call by call, from each attention's dtype and head size."""
    blocks = resolve_implementation(vcfg.attention, vcfg.dtype, vcfg.width // vcfg.heads, platform)
    if vcfg.pool_type != "attn":
        return blocks
    head = resolve_implementation(vcfg.attention, vcfg.dtype, vcfg.width // vcfg.attn_pooler_heads, platform)
    return blocks if head == blocks else f"{blocks} (pooling head: {head})"


def _program(resolved, mesh, strategy: str, padded: int, train: bool):
    """(jitted function, abstract arguments, analytic FLOPs per example, weight bytes each device reads)."""
    cfg, cls = resolved.config, resolved.model_class
    is_clip = hasattr(cfg, "text")
    abstract_model = resolved.abstract()
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
    # Each device reads the gathered weights once a pass (a tensor-parallel axis splits them), in `dtype`.
    params = sum(v.size for v in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))
    weight_bytes = params * jnp.dtype(vcfg.param_dtype).itemsize / mesh.shape["model"]
    if train:
        fn, fn_args = _train_step(cls, cfg, is_clip, images, args, padded, mesh, strategy)
        return fn, fn_args, 3 * flops, 3 * weight_bytes  # backward: twice the forward's FLOPs and reads
    fn, fn_args = _forward(abstract_model, is_clip, args, mesh, strategy)
    return fn, fn_args, flops, weight_bytes


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some compile-only backends have none
        return {}
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return dict(cost or {})


def _first_line(error: Exception) -> str:
    text = str(error)
    for marker in ("Ran out of memory", "RESOURCE_EXHAUSTED"):
        if marker in text:
            return text[text.index(marker):].splitlines()[0][:300]
    return text.splitlines()[0][:300]


def max_batch(model: str, mesh, *, target: Target, start: int = 64, max_compiles: int = 6,
              progress=None, **options) -> tuple[int, dict[int, Plan]]:
    """The largest global batch whose program fits `target`'s HBM, from a few compiles.

    Memory is close to linear in the batch, so the first compile at `start` predicts where the limit lies;
    each next compile (at a multiple of the data-parallel size, on a coarse grid of 1/16 of the guess)
    narrows the bracket [largest that fits, smallest that does not], interpolating while both ends are
    known. Returns (batch, {batch: Plan} of every compile), batch 0 if even one example per device does not fit.

    Example:
        >>> best, plans = max_batch("PE-Core-L14-336", "fsdp=4", target=get_target("v5e-4"))  # doctest: +SKIP
    """
    plans: dict[int, Plan] = {}

    def compile_at(b: int) -> Plan:
        if b not in plans:
            plans[b] = plan(model, mesh, b, target=target, **options)
            if progress:
                progress(plans[b])
        return plans[b]

    first = compile_at(start)
    dp = _data_parallel(first)
    fits, fails = (first.padded_batch, None) if first.fits else (0, first.padded_batch)
    for _ in range(max_compiles - 1):
        guess = _next_guess(plans, fits, fails, target.hbm_bytes / GiB, dp)
        if guess is None:
            break
        p = compile_at(guess)
        if p.fits:
            fits = max(fits, guess)
        else:
            fails = guess if fails is None else min(fails, guess)
    return fits, plans


def _data_parallel(p: Plan) -> int:
    return p.mesh.get("data", 1) * p.mesh.get("fsdp", 1)


def _next_guess(plans: dict[int, Plan], fits: int, fails: int | None, hbm_gib: float, dp: int) -> int | None:
    """The next batch to compile: the linear prediction from the two largest compiled points, on a grid of
    1/16 of it, kept strictly inside the bracket (fits, fails); None once the bracket is one grid step."""
    ok = sorted((p for p in plans.values() if p.error is None), key=lambda p: p.padded_batch)
    if not ok:  # every compile so far refused: halve
        half = (fails // 2) // dp * dp
        return half if half >= dp and half not in plans else None
    a, b = (ok[-2], ok[-1]) if len(ok) >= 2 else (None, ok[-1])
    per_example = ((b.peak_gib - a.peak_gib) / (b.padded_batch - a.padded_batch) if a
                   else b.temp_gib / b.padded_batch)
    # At most 8x the largest compiled batch a step: one point's temporaries can say little (TPUs report none
    # for small programs), and a huge abstract batch costs a long compile.
    predicted = min(b.padded_batch + (hbm_gib - b.peak_gib) / max(per_example, 1e-12), 8 * b.padded_batch)
    step = max(dp, int(predicted / 16) // dp * dp)
    hi = fails if fails is not None else float("inf")
    if hi - fits <= step:
        return None
    guess = min(max(int(predicted) // step * step, fits + step), hi - step)
    return None if guess in plans else int(guess)


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
