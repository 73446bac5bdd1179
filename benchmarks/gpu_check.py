#!/usr/bin/env python3
"""The prepared GPU check: pe_jax vs timm in bf16, attention backends, and device memory vs the planner.

On one NVIDIA GPU (the exact commands are in benchmarks/gpu_check.sh) it writes OUT/gpu_check.json after
every section and OUT/gpu_check.md, in about 8 minutes at most:

1. bf16 inference images/s of the PE-Core B/16 @224, L/14 @336 and G/14 @448 vision towers (random
   weights) at batch 256 / 128 / 32: pe_jax and timm side by side in one process (timm: bf16 autocast,
   SDPA; torch.compile when the section's time allows), the ratio, and MFU against a bf16 matmul measured
   in the same run;
2. pe_jax's attention backends `xla` and `cudnn` for each tower, and what `auto` picks;
3. the full G/14 CLIP forward at batch 64 on one device: peak device memory measured vs the planner;
4. one L/14 CLIP finetuning step (bf16 compute, fp32 master weights, AdamW, remat): step time and peak
   device memory vs the planner (`plan(..., train=True)`).

Each section runs in a child process of its own: a fresh peak-memory counter, a deadline after which it is
killed, and a try/except around every measurement that records the error in the JSON and goes on. A child
rewrites its results after every measurement, so a kill loses only the one in progress. The planner runs
twice for sections 3 and 4: as `pe-jax plan` does (the CPU compiler, in a background process) and with the
GPU's own compiler in the section's process.

`--smoke` runs the same code at tiny sizes on CPU in about a minute (tests/test_gpu_check.py); there the
cuDNN measurements are recorded as skipped and device memory as unavailable.

Imports: only jax, flax, optax, numpy, timm, torch and the pe_jax modules these need (the GPU machine has
no grain, ftfy or open_clip; each child records whether any of them got imported).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from types import SimpleNamespace

GiB = 1024**3
SCRIPT = os.path.abspath(__file__)
NOT_ON_GPU_MACHINE = ("grain", "ftfy", "open_clip", "av")  # packages absent there: nothing here may import them


def pe_parts() -> SimpleNamespace:
    """Every pe_jax name this script uses, imported in the child that needs them (none imports grain or ftfy)."""
    import pe_jax
    from pe_jax.attention import resolve_implementation
    from pe_jax.config import TEXT_PRESETS, VISION_PRESETS, clip_config, vision_config
    from pe_jax.memory_plan import plan, vision_flops
    from pe_jax.sharding import make_mesh
    from pe_jax.train.optim import make_optimizer
    from pe_jax.train.step import init_train_state, make_train_step
    from pe_jax.train.tasks import ContrastiveTask, trainable_filter

    return SimpleNamespace(
        CLIP=pe_jax.CLIP, VisionTransformer=pe_jax.VisionTransformer, VISION_PRESETS=VISION_PRESETS,
        TEXT_PRESETS=TEXT_PRESETS, vision_config=vision_config, clip_config=clip_config,
        resolve_implementation=resolve_implementation, make_mesh=make_mesh, plan=plan, vision_flops=vision_flops,
        ContrastiveTask=ContrastiveTask, trainable_filter=trainable_filter, make_optimizer=make_optimizer,
        init_train_state=init_train_state, make_train_step=make_train_step)


# ------------------------------------------------------------------------------------------ what is measured

TOWERS = {  # key: (pe_jax preset, timm model, batch on the GPU)
    "B16": ("PE-Core-B16-224", "vit_pe_core_base_patch16_224", 256),
    "L14": ("PE-Core-L14-336", "vit_pe_core_large_patch14_336", 128),
    "G14": ("PE-Core-G14-448", "vit_pe_core_gigantic_patch14_448", 32),
}
CLIP_FORWARD = ("G14", 64)  # section 3: the tower's CLIP preset, batch
TRAIN_STEP = ("L14", 64)  # section 4
# --smoke: the same presets shrunk (depth 2, narrow, a 2x2 patch grid), registered as PRESET + "-smoke".
SMOKE_VISION = {
    "B16": dict(layers=2, width=64, heads=4, mlp_dim=256, output_dim=64, image_size=32),
    "L14": dict(layers=2, width=64, heads=4, mlp_dim=256, output_dim=64, image_size=28),
    "G14": dict(layers=2, width=96, heads=4, mlp_dim=384, output_dim=64, image_size=28),
}
SMOKE_TEXT = dict(layers=2, width=64, heads=4, mlp_dim=256, output_dim=64, context_length=16)
SMOKE_BATCH = {"B16": 4, "L14": 4, "G14": 2, "clip": 4}

# (section, key, GPU budget in seconds, smoke budget). Deadlines roll: time a section leaves unused goes to the next.
SCHEDULE = [
    ("matmul_peak", "bf16", 20, 60),
    ("inference", "B16", 60, 90),
    ("inference", "L14", 85, 90),
    ("inference", "G14", 165, 90),  # timm's torch.compile of 50 blocks is the longest wait
    ("clip_forward_memory", "G14", 60, 90),
    ("train_step", "L14", 75, 120),
]
SECTIONS = ("matmul_peak", "inference", "attention", "clip_forward_memory", "train_step")


def tower(key: str, smoke: bool) -> tuple[str, str, int]:
    preset, timm_name, batch = TOWERS[key]
    return (preset + "-smoke", timm_name, SMOKE_BATCH[key]) if smoke else (preset, timm_name, batch)


def clip_job(section: str, smoke: bool) -> tuple[str, int]:
    key, batch = CLIP_FORWARD if section == "clip_forward_memory" else TRAIN_STEP
    preset = TOWERS[key][0]
    return (preset + "-smoke", SMOKE_BATCH["clip"]) if smoke else (preset, batch)


def register_smoke_presets(P):
    """The tiny presets, added to pe_jax's preset tables in this process only, so that the model builders and
    the planner take them by name exactly as they take the real ones."""
    for key, (preset, _, _) in TOWERS.items():
        P.VISION_PRESETS[preset + "-smoke"] = P.vision_config(preset, **SMOKE_VISION[key])
        if preset in P.TEXT_PRESETS:
            P.TEXT_PRESETS[preset + "-smoke"] = dataclasses.replace(P.TEXT_PRESETS[preset], **SMOKE_TEXT)


def timm_kwargs(cfg) -> dict:
    """timm Eva arguments for the geometry of a pe_jax VisionConfig (for the presets, timm's own values)."""
    grid = cfg.image_size // cfg.patch_size
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
                num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, class_token=cfg.use_cls_token,
                ref_feat_shape=(grid, grid), attn_pool_num_heads=cfg.attn_pooler_heads,
                num_classes=cfg.output_dim or 0)


def text_flops(t) -> float:
    """The planner's analytic text-tower FLOPs per sequence (matmuls and attention scores)."""
    ctx = t.context_length
    return float(t.layers * (2 * ctx * (4 * t.width**2 + 2 * t.width * t.mlp_dim) + 4 * ctx * ctx * t.width))


# ------------------------------------------------------------------------------------------ child helpers


class Record:
    """A child's results, rewritten to its file after every measurement."""

    def __init__(self, path: str, **fields):
        self.path, self.data = path, {"status": "running", **fields}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=_jsonable)
        os.replace(tmp, self.path)

    def attempt(self, target: dict, key: str, fn, label: str | None = None):
        """target[key] = fn() (a dict), or the error it raised; the step is named first so that a kill names it."""
        self.data["running"] = label or key
        self.save()
        print(f"[{self.data.get('section')}:{self.data.get('key')}] {label or key} ...", flush=True)
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # recorded, never fatal: the next measurement still runs
            out = {"error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-4000:]}
            print(out["traceback"], file=sys.stderr, flush=True)
        out = dict(out or {})
        out.setdefault("seconds", round(time.perf_counter() - start, 3))
        target[key] = out
        self.data.pop("running", None)
        self.save()
        print(f"[{self.data.get('section')}:{self.data.get('key')}] {label or key}: "
              f"{_short(out)}", flush=True)
        return out


def _short(d: dict) -> str:
    keys = ("error", "skipped", "same_as", "images_per_s", "tflops", "step_ms", "peak_gib", "ms")
    return ", ".join(f"{k}={d[k]:.4g}" if isinstance(d[k], float) else f"{k}={str(d[k])[:200]}"
                     for k in keys if k in d) or "done"


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def throughput(run, batch: int, seconds: float) -> dict:
    """Images/s of `run(n)` (n back-to-back batches, synchronized at the end): median of 3 trials."""
    run(1)  # one more warm-up after the compiling call
    start = time.perf_counter()
    run(1)
    once = time.perf_counter() - start
    iters = max(2, min(200, int(seconds / 3 / max(once, 1e-9))))
    trials = []
    for _ in range(3):
        start = time.perf_counter()
        run(iters)
        trials.append((time.perf_counter() - start) / iters)
    per = statistics.median(trials)
    return {"images_per_s": batch / per, "ms_per_batch": per * 1e3, "iters_per_trial": iters,
            "trial_ms": [round(t * 1e3, 3) for t in trials]}


def device_memory() -> dict | None:
    """The first device's allocator statistics in GiB, or None where the platform keeps none (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    get = lambda k: stats.get(k, 0) / GiB
    return {"peak_gib": get("peak_bytes_in_use"), "in_use_gib": get("bytes_in_use"), "limit_gib": get("bytes_limit")}


def analysis_record(compiled) -> dict:
    """XLA's memory plan of a compiled program, in GiB, with its peak by the planner's formula."""
    m = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp", "generated_code")
    rec = {f"{n}_gib": getattr(m, f"{n}_size_in_bytes") / GiB for n in names if hasattr(m, f"{n}_size_in_bytes")}
    rec["peak_gib"] = rec["argument_gib"] + rec["output_gib"] - rec["alias_gib"] + rec["temp_gib"]
    if getattr(m, "peak_memory_in_bytes", None):
        rec["xla_peak_memory_gib"] = m.peak_memory_in_bytes / GiB
    return rec


def plan_record(p) -> dict:
    rec = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(vars(p))
    rec["peak_gib"] = float(p.peak_gib)
    return rec


def one_device_mesh(P):
    import jax

    return P.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])


def environment(full: bool = True) -> dict:
    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
           "optax": optax.__version__, "numpy": np.__version__, "jax_backend": jax.default_backend(),
           "jax_devices": [d.device_kind for d in jax.devices()]}
    try:
        import timm
        import torch

        env.update(torch=torch.__version__, timm=timm.__version__, torch_cuda=torch.version.cuda,
                   torch_cudnn=torch.backends.cudnn.version(), torch_cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
    except Exception as e:
        env["torch_error"] = f"{type(e).__name__}: {e}"
    if full:
        try:
            env["jax_environment"] = jax.print_environment_info(return_string=True)
        except Exception:
            pass
        if jax.default_backend() == "gpu":
            env["gpu_target_config"] = gpu_target_config()
    return env


def gpu_target_config() -> str:
    """This GPU's own XLA target config (text proto): `write` saves it as gpu-target-<kind>.pbtxt, to be kept in
    pe_jax/assets so that `pe-jax plan --target` compiles for exactly this GPU."""
    try:
        import jax
        from jax._src.lib import xla_client

        return str(xla_client.get_topology_for_devices(jax.devices()).target_config)
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {e}"


def _save_target_configs(results: dict, out: str):
    env = results.get("environment", {})  # the matmul_peak section's (full) environment is merged here
    text = env.get("gpu_target_config", "")
    if text and not text.startswith("unavailable"):
        kind = (env.get("jax_devices") or ["gpu"])[0].lower().replace(" ", "-")
        with open(os.path.join(out, f"gpu-target-{kind}.pbtxt"), "w") as f:
            f.write(text)


def free_memory(holder: dict | None = None):
    """Drops the references a measurement held, then jax's compilation caches and torch's cached blocks."""
    import jax

    if holder is not None:
        holder.clear()
    gc.collect()
    jax.clear_caches()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the sections


def section_matmul_peak(args, rec: Record, P):
    """bf16 matmul throughput of jax (the MFU denominator) and of torch, same device, same run."""
    import jax
    import jax.numpy as jnp

    d = rec.data
    d["environment"] = environment()
    n = 512 if args.smoke else 8192
    d["n"] = n

    def jax_peak():
        a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
        f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()

        def run(k):
            for _ in range(k):
                c = f(a, b)
            c.block_until_ready()

        t = throughput(run, 1, args.measure_seconds)
        return {"tflops": 2 * n**3 / (t["ms_per_batch"] / 1e3) / 1e12, "ms": t["ms_per_batch"]}

    def torch_peak():
        import torch

        dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=dev) for _ in range(2))
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def run(k):
            for _ in range(k):
                a @ b
            sync()

        t = throughput(run, 1, args.measure_seconds)
        return {"tflops": 2 * n**3 / (t["ms_per_batch"] / 1e3) / 1e12, "ms": t["ms_per_batch"], "device": dev}

    rec.attempt(d, "jax", jax_peak, "jax bf16 matmul")
    rec.attempt(d, "torch", torch_peak, "torch bf16 matmul")


def section_inference(args, rec: Record, P):
    """Sections 1 and 2 for one tower: pe_jax with each attention backend, then timm eager and compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    preset, timm_name, batch = tower(rec.data["key"], args.smoke)
    cfg = P.vision_config(preset, dtype="bfloat16", param_dtype="bfloat16")
    size = cfg.image_size
    heads = {"blocks": cfg.head_dim}
    if cfg.pool_type == "attn":
        heads["pooler"] = cfg.width // cfg.attn_pooler_heads
    picks = {part: P.resolve_implementation("auto", jnp.bfloat16, hd) for part, hd in heads.items()}
    on_gpu = jax.default_backend() == "gpu"
    d = rec.data
    d["environment"] = environment(full=False)
    d.update(preset=preset, timm_model=timm_name, batch=batch, image_size=size, layers=cfg.layers, width=cfg.width,
             flops_per_image=P.vision_flops(cfg), head_dim=heads, auto_picks=picks, jax_backend=jax.default_backend(),
             pe_jax={}, timm={})
    rec.save()
    held: dict = {}

    def init_pe_jax():
        model = P.VisionTransformer.from_config(preset, dtype="bfloat16", param_dtype="bfloat16", attention="xla")
        params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        held["state"] = nnx.state(model)
        del model
        held["x"] = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
        jax.block_until_ready((held["state"], held["x"]))
        return {"params": params, "dtype": "bfloat16 compute, bfloat16 weights"}

    def measure_pe_jax(impl):
        def measure():
            cfg_impl = dataclasses.replace(cfg, attention=impl)
            graphdef = nnx.split(nnx.eval_shape(lambda: P.VisionTransformer(cfg_impl, rngs=nnx.Rngs(0))))[0]
            state, x = held["state"], held["x"]
            start = time.perf_counter()
            compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
            compile_s = time.perf_counter() - start
            y = np.asarray(compiled(state, x).astype(jnp.float32))

            def run(k):
                for _ in range(k):
                    out = compiled(state, x)
                jax.block_until_ready(out)

            res = throughput(run, batch, args.measure_seconds)
            res.update(compile_s=compile_s, finite=bool(np.isfinite(y).all()))
            if impl == "xla":
                held["reference"] = y
            elif "reference" in held:
                res["rel_l2_vs_xla"] = float(np.linalg.norm(y - held["reference"]) / np.linalg.norm(held["reference"]))
            return res

        return measure

    pe = d["pe_jax"]
    if "error" not in rec.attempt(d, "pe_jax_init", init_pe_jax, "pe_jax init"):
        rec.attempt(pe, "xla", measure_pe_jax("xla"), "pe_jax xla")
        if on_gpu:
            rec.attempt(pe, "cudnn", measure_pe_jax("cudnn"), "pe_jax cudnn")
        else:
            pe["cudnn"] = {"skipped": f"cudnn attention needs an NVIDIA GPU (jax backend: {jax.default_backend()})"}
        resolved = set(picks.values())
        # timm's eager run and torch.compile come first: auto differs from cudnn in the pooling head only
        keep = args.min_optional_seconds + (0 if args.no_torch_compile else args.min_compile_seconds)
        if len(resolved) == 1:  # auto is one of the programs above
            pe["auto"] = {"same_as": resolved.pop(), "note": "auto picks this backend for every attention in the tower"}
        elif time_left(args) > args.min_optional_seconds + keep:
            rec.attempt(pe, "auto", measure_pe_jax("auto"), "pe_jax auto")
        else:
            pe["auto"] = {"skipped": f"{time_left(args):.0f} s left in the section's budget"}
        rec.save()
    free_memory(held)

    try:
        import timm
        import torch
    except Exception as e:
        d["timm"] = {"error": f"{type(e).__name__}: {e}"}
        return
    dev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def init_timm():
        torch.manual_seed(0)
        try:  # allocate and initialize on the device directly (a 1.8B-parameter init on the host is slow)
            with torch.device(dev):
                model = timm.create_model(timm_name, pretrained=False, **timm_kwargs(cfg))
        except Exception:
            model = timm.create_model(timm_name, pretrained=False, **timm_kwargs(cfg)).to(dev)
        held["model"] = model.eval().requires_grad_(False)
        held["x"] = torch.randn(batch, 3, size, size, device=dev)
        attn = getattr(model.blocks[0], "attn", None)
        return {"params": sum(p.numel() for p in model.parameters()), "device": dev,
                "sdpa": bool(getattr(attn, "fused_attn", False)), "dtype": "bfloat16 autocast, float32 weights"}

    def measure_timm(compiled: bool):
        def run_with(model):
            def run(k):
                with torch.inference_mode():
                    for _ in range(k):
                        with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                            model(held["x"])
                sync()

            return run

        def measure():
            model = held["model"]
            res = {}
            if compiled:
                model = torch.compile(model, backend=args.torch_compile_backend)
                start = time.perf_counter()
                run_with(model)(1)
                res.update(compile_s=time.perf_counter() - start, backend=args.torch_compile_backend)
            res.update(throughput(run_with(model), batch, args.measure_seconds))
            return res

        return measure

    tm = d["timm"]
    if "error" not in rec.attempt(d, "timm_init", init_timm, "timm init"):
        rec.attempt(tm, "eager", measure_timm(False), "timm eager")
        if args.no_torch_compile:
            tm["compiled"] = {"skipped": "--no-torch-compile"}
        elif time_left(args) < args.min_compile_seconds:
            tm["compiled"] = {"skipped": f"only {time_left(args):.0f} s left in the section's budget"}
        else:
            rec.attempt(tm, "compiled", measure_timm(True), "timm torch.compile")
    free_memory(held)


def section_clip_forward(args, rec: Record, P):
    """Section 3: the full CLIP forward (encode_image + encode_text) on one device, as the planner compiles it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    preset, batch = clip_job("clip_forward_memory", args.smoke)
    overrides = dict(dtype="bfloat16", param_dtype="bfloat16", remat_policy="nothing_saveable")  # the planner's
    d = rec.data
    d.update(preset=preset, batch=batch, overrides=overrides,
             planner_command=f"pe-jax plan --model {preset} --mesh fsdp=1 --batch {batch} --dtype bfloat16")
    mesh = one_device_mesh(P)
    held: dict = {}

    def measure():
        res = {"memory_before": device_memory()}
        model = P.CLIP.from_config(preset, mesh=mesh, strategy="fsdp", **overrides)
        cfg = model.config
        graphdef, held["state"] = nnx.split(model)
        del model
        size, ctx = cfg.vision.image_size, cfg.text.context_length
        held["images"] = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
        tokens = jax.random.randint(jax.random.key(1), (batch, ctx), 1, 49406, jnp.int32)
        held["tokens"] = tokens.at[:, -1].set(49407)  # end of text, the largest id, where the text tower pools
        jax.block_until_ready(held)
        res["memory_after_init"] = device_memory()

        def forward(state, images, tokens):
            m = nnx.merge(graphdef, state)
            return m.encode_image(images), m.encode_text(tokens)

        args_ = (held["state"], held["images"], held["tokens"])
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            compiled = jax.jit(forward).lower(*args_).compile()
            res["compile_s"] = time.perf_counter() - start
            res["compiled_memory"] = analysis_record(compiled)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args_))
                times.append(time.perf_counter() - start)
        res["forward_ms"] = min(times) * 1e3
        res["flops_per_example"] = P.vision_flops(cfg.vision) + text_flops(cfg.text)
        after = device_memory()
        if after is None:
            res["measured"] = {"skipped": f"device memory_stats() is unavailable on {jax.default_backend()}"}
        else:
            res["measured"] = after
            init_peak = (res["memory_after_init"] or {}).get("peak_gib", 0.0)
            res["measured"]["init_dominates_peak"] = init_peak >= after["peak_gib"]
        return res

    rec.attempt(d, "run", measure, "G/14 CLIP forward")
    free_memory(held)
    device_planner(args, rec, P, preset, batch, mesh, train=False)


def section_train_step(args, rec: Record, P):
    """Section 4: one CLIP finetuning step as `pe-jax finetune` runs it and `plan(..., train=True)` compiles it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    preset, batch = clip_job("train_step", args.smoke)
    overrides = dict(dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable")  # the planner's
    d = rec.data
    d.update(preset=preset, batch=batch, overrides=overrides, optimizer="AdamW (make_optimizer defaults)",
             planner_command=f"pe-jax plan --model {preset} --mesh fsdp=1 --batch {batch} --dtype bfloat16 --train")
    mesh = one_device_mesh(P)
    held: dict = {}

    def measure():
        res = {"memory_before": device_memory()}
        clip = P.CLIP.from_config(preset, mesh=mesh, strategy="fsdp", **overrides)
        cfg = clip.config
        trainable = P.trainable_filter("none")
        graphdef, state = P.init_train_state(P.ContrastiveTask(clip), P.make_optimizer(), trainable,
                                             mesh=mesh, strategy="fsdp")
        del clip
        gc.collect()
        size, ctx = cfg.vision.image_size, cfg.text.context_length
        images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
        tokens = jax.random.randint(jax.random.key(1), (batch, ctx), 1, 49406, jnp.int32).at[:, -1].set(49407)
        held.update(state=state, batch={"image": images, "tokens": tokens})
        del state
        jax.block_until_ready(held)
        res["memory_after_init"] = device_memory()
        step = P.make_train_step(graphdef, trainable=trainable, mesh=mesh, strategy="fsdp")
        losses, times = [], []
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=0).lower(held["state"], held["batch"]).compile()
            res["compile_s"] = time.perf_counter() - start
            res["compiled_memory"] = analysis_record(compiled)
            for _ in range(2 if args.smoke else 5):
                start = time.perf_counter()
                held["state"], metrics = compiled(held["state"], held["batch"])
                losses.append(float(metrics["loss"]))  # waits for the step
                times.append(time.perf_counter() - start)
        res.update(losses=losses, finite=bool(np.isfinite(losses).all()), first_step_ms=times[0] * 1e3,
                   step_ms=statistics.median(times[1:]) * 1e3)
        res["examples_per_s"] = batch / (res["step_ms"] / 1e3)
        res["flops_per_example"] = 3 * (P.vision_flops(cfg.vision) + text_flops(cfg.text))  # model FLOPs, no remat
        after = device_memory()
        if after is None:
            res["measured"] = {"skipped": f"device memory_stats() is unavailable on {jax.default_backend()}"}
        else:
            res["measured"] = after
            init_peak = (res["memory_after_init"] or {}).get("peak_gib", 0.0)
            res["measured"]["init_dominates_peak"] = init_peak >= after["peak_gib"]
        return res

    rec.attempt(d, "run", measure, "L/14 CLIP train step")
    free_memory(held)
    device_planner(args, rec, P, preset, batch, mesh, train=True)


def device_planner(args, rec: Record, P, preset: str, batch: int, mesh, *, train: bool):
    """The planner with this device's compiler (the CPU compiler's figures come from a background process)."""
    import jax

    d = rec.data
    if jax.default_backend() == "cpu":
        d["planner_device"] = {"skipped": "on CPU this device's compiler is planner_cpu's"}
        rec.save()
        return
    if time_left(args) < args.min_optional_seconds:
        d["planner_device"] = {"skipped": f"only {time_left(args):.0f} s left in the section's budget"}
        rec.save()
        return
    rec.attempt(d, "planner_device", lambda: plan_record(P.plan(
        preset, mesh, batch, strategy="fsdp", dtype="bfloat16", remat="nothing_saveable", train=train)),
        "planner on this device")


def section_planner(args, rec: Record, P):
    """`pe-jax plan` for a section's configuration, on the CPU compiler (run with JAX_PLATFORMS=cpu)."""
    import jax

    section = rec.data["key"]
    preset, batch = clip_job(section, args.smoke)
    rec.data.update(preset=preset, batch=batch, jax_backend=jax.default_backend())
    rec.attempt(rec.data, "plan", lambda: plan_record(P.plan(
        preset, one_device_mesh(P), batch, strategy="fsdp", dtype="bfloat16", remat="nothing_saveable",
        train=section == "train_step")), f"planner (cpu) for {section}")


CHILDREN = {"matmul_peak": section_matmul_peak, "inference": section_inference,
            "clip_forward_memory": section_clip_forward, "train_step": section_train_step,
            "planner": section_planner}


def time_left(args) -> float:
    return args.deadline - time.time()


def child_main(args):
    rec = Record(args.part, section=args.child, key=args.key, pid=os.getpid())
    rec.save()
    try:
        P = pe_parts()
        if args.smoke:
            register_smoke_presets(P)
        CHILDREN[args.child](args, rec, P)
        rec.data["status"] = "ok"
    except Exception as e:
        rec.data.update(status="error", error=f"{type(e).__name__}: {e}"[:3000],
                        traceback=traceback.format_exc()[-4000:])
        print(rec.data["traceback"], file=sys.stderr, flush=True)
    rec.data.pop("running", None)
    rec.data["imported_unavailable"] = [m for m in NOT_ON_GPU_MACHINE if m in sys.modules]
    rec.save()


# ------------------------------------------------------------------------------------------ the parent


def child_env(smoke: bool, cpu: bool) -> dict:
    env = dict(os.environ)
    # The test suite's fake CPU devices would give the one-device mesh eight devices.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.pop("XLA_FLAGS", None)
    if smoke:  # XLA:CPU's LLVM optimizations cost most of a tiny model's compile (random init: 12 s -> 3 s)
        flags.append("--xla_backend_optimization_level=0")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # jax and torch share the GPU in the inference sections
    env["PYTHONUNBUFFERED"] = "1"
    if smoke or cpu:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def child_command(args, section: str, key: str, part: str, deadline: float) -> list[str]:
    cmd = [sys.executable, SCRIPT, "--child", section, "--key", key, "--part", part, "--deadline", f"{deadline:.3f}",
           "--measure-seconds", str(args.measure_seconds), "--min-compile-seconds", str(args.min_compile_seconds),
           "--min-optional-seconds", str(args.min_optional_seconds),
           "--torch-compile-backend", args.torch_compile_backend]
    return cmd + (["--smoke"] if args.smoke else []) + (["--no-torch-compile"] if args.no_torch_compile else [])


def run_child(args, section, key, part, deadline, env) -> dict:
    """Runs one section in a child, its output streamed through ours; kills it (and its process group:
    torch.compile's workers) at its deadline; returns what it recorded."""
    start = time.time()
    tail = collections.deque(maxlen=60)
    proc = subprocess.Popen(child_command(args, section, key, part, deadline), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            tail.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    outcome = None
    try:
        proc.wait(timeout=max(1.0, deadline + args.grace_seconds - time.time()))
    except subprocess.TimeoutExpired:
        outcome = "timeout"
    except BaseException:  # the parent is being stopped: end the child, keep what it recorded
        outcome = "interrupted"
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        reader.join(timeout=5)
        rec = _read_part(part)
        rec["wall_s"] = round(time.time() - start, 2)
        rec["budget_s"] = round(deadline - start, 2)
        if outcome or rec.get("status") != "ok":
            running = rec.get("running") or ("startup" if len(rec) <= 6 else "between measurements")
            if outcome == "timeout":
                rec.update(status="timeout", error=f"killed at its deadline ({rec['budget_s']:.0f} s) while: {running}")
            elif outcome == "interrupted":
                rec.update(status="interrupted", error=f"the check was stopped while: {running}")
            elif rec.get("status") != "error":
                rec.update(status="error", error=f"child exited with code {proc.returncode} while: {running}")
            rec["log_tail"] = "".join(tail)[-3000:]
        _last_child[:] = [section, key, rec]
    return rec


_last_child: list = []


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_part(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def start_planner(args, section: str, tmp: str):
    """`pe-jax plan`'s figures for a section, computed on the CPU in the background while the GPU works."""
    part = os.path.join(tmp, f"planner-{section}.json")
    log = open(os.path.join(tmp, f"planner-{section}.log"), "w")
    deadline = time.time() + args.planner_seconds
    proc = subprocess.Popen(["nice", "-n", "10", *child_command(args, "planner", section, part, deadline)],
                            env=child_env(args.smoke, cpu=True), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return SimpleNamespace(proc=proc, part=part, log=log, deadline=deadline, section=section)


def collect_planner(args, job, deadline: float) -> dict:
    try:
        job.proc.wait(timeout=max(1.0, min(deadline, job.deadline + args.grace_seconds) - time.time()))
    except subprocess.TimeoutExpired:
        pass
    timed_out = job.proc.poll() is None
    if timed_out:
        _kill_group(job.proc)
    job.log.close()
    rec = _read_part(job.part)
    with open(job.log.name, errors="replace") as f:
        log = f.read()
    print(f"---- planner (cpu) for {job.section}\n{log[-4000:]}", flush=True)
    plan = rec.get("plan")
    if isinstance(plan, dict) and rec.get("status") == "ok":
        return plan
    error = plan.get("error") if isinstance(plan, dict) else None
    return {"error": error or ("timed out" if timed_out else rec.get("error", f"exit code {job.proc.returncode}")),
            "log_tail": log[-3000:]}


def store(results: dict, section: str, key: str, rec: dict):
    s = results["sections"]
    if section == "matmul_peak":
        s["matmul_peak"] = rec
        if isinstance(rec.get("environment"), dict):
            results["environment"].update(rec["environment"])
    elif section == "inference":
        s.setdefault("inference", {})[key] = rec
        if isinstance(rec.get("environment"), dict):  # when matmul_peak did not run
            for k, v in rec["environment"].items():
                results["environment"].setdefault(k, v)
    else:
        s[section] = rec


def derive(results: dict):
    """Ratios, MFU, the attention view and the list of errors, recomputed from the raw records."""
    s = results["sections"]
    peak = _num(s.get("matmul_peak", {}).get("jax", {}).get("tflops"))
    s["matmul_peak"] = s.get("matmul_peak", {"status": "not run"})
    s["matmul_peak"]["jax_bf16_tflops"] = peak
    attention = {}
    for key, rec in s.get("inference", {}).items():
        pe, tm = rec.get("pe_jax", {}), rec.get("timm", {})
        flops = _num(rec.get("flops_per_image"))
        ips = {f"pe_jax_{b}": _num(pe.get(b, {}).get("images_per_s")) for b in ("xla", "cudnn", "auto")}
        ips.update({f"timm_{m}": _num(tm.get(m, {}).get("images_per_s")) for m in ("eager", "compiled")})
        measured = {b: v for b, v in ips.items() if b.startswith("pe_jax") and v}
        best = max(measured, key=measured.get) if measured else None
        rec["pe_jax_best"] = {"backend": best[len("pe_jax_"):], "images_per_s": measured[best]} if best else None
        for m in ("eager", "compiled"):
            theirs = ips[f"timm_{m}"]
            rec[f"ratio_vs_timm_{m}"] = measured[best] / theirs if best and theirs else None
        rec["mfu"] = {name: v * flops / (peak * 1e12) if v and flops and peak else None for name, v in ips.items()}
        missing = ({"skipped": rec["skipped"]} if "skipped" in rec else
                   {"error": rec.get("error") or rec.get("pe_jax_init", {}).get("error") or "not run"})
        attention[key] = {"preset": rec.get("preset", key), "head_dim": rec.get("head_dim"),
                          "auto_picks": rec.get("auto_picks"),
                          **{b: pe.get(b, missing) for b in ("xla", "cudnn", "auto")}}
    if attention:
        s["attention"] = attention
    for section in ("clip_forward_memory", "train_step"):
        rec = s.get(section)
        if not rec:
            continue
        run = rec.get("run", {})
        measured = _num(run.get("measured", {}).get("peak_gib")) if isinstance(run.get("measured"), dict) else None
        for name in ("planner_cpu", "planner_device"):
            planned = _num(rec.get(name, {}).get("peak_gib"))
            rec[f"{name}_over_measured"] = planned / measured if planned and measured else None
        compiled = _num(run.get("compiled_memory", {}).get("peak_gib"))
        rec["compiled_over_measured"] = compiled / measured if compiled and measured else None
        if section == "train_step" and peak and _num(run.get("examples_per_s")):
            rec["mfu"] = run["examples_per_s"] * run["flops_per_example"] / (peak * 1e12)
    results["errors"] = sorted(set(_errors(s)))


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _errors(node, path=""):
    if isinstance(node, dict):
        if "error" in node and isinstance(node["error"], str):
            yield f"{path or '/'}: {node['error'].splitlines()[0][:300]}"
        for k, v in node.items():
            if k not in ("error", "traceback", "log_tail"):
                yield from _errors(v, f"{path}/{k}")


# ------------------------------------------------------------------------------------------ the tables


def _f(v, digits=3, unit=""):
    v = _num(v)
    if v is None:
        return "–"
    return f"{v:.{digits}g}{unit}" if abs(v) < 10 ** digits else f"{v:,.0f}{unit}"


def _cell(rec: dict | None, field="images_per_s", digits=4):
    """A measured number, or why there is none."""
    if not isinstance(rec, dict):
        return "–"
    if _num(rec.get(field)) is not None:
        return _f(rec[field], digits)
    for why in ("skipped", "error"):
        if why in rec:
            return f"{why}: {str(rec[why]).splitlines()[0][:60]}"
    if "same_as" in rec:
        return f"= {rec['same_as']}"
    return "–"


def _pct(v):
    v = _num(v)
    return "–" if v is None else f"{v:.0%}"


def _x(v):
    v = _num(v)
    return "–" if v is None else f"{v:.2f}x"


def markdown(results: dict) -> str:
    s, env = results["sections"], results["environment"]
    peak = s.get("matmul_peak", {})
    lines = [
        f"# pe-jax GPU check{' (smoke: tiny sizes on CPU)' if results['smoke'] else ''}", "",
        f"device: {env.get('torch_device') or ', '.join(env.get('jax_devices', [])) or '?'} · "
        f"jax {env.get('jax', '?')} ({env.get('jax_backend', '?')}), flax {env.get('flax', '?')}, "
        f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('torch_cudnn')}), "
        f"timm {env.get('timm', '?')} · started {results['started']}, {_f(results.get('wall_s'), 3)} s", "",
        f"bf16 matmul {peak.get('n', '?')}³: jax {_f(peak.get('jax_bf16_tflops'))} TFLOP/s "
        f"(the MFU denominator), torch {_f(peak.get('torch', {}).get('tflops'))} TFLOP/s", "",
        "## 1. bf16 inference, vision towers, random weights (images/s)", "",
        "| tower | batch | GFLOP/img | timm eager | timm compiled | pe_jax xla | pe_jax cudnn | pe_jax auto "
        "| pe_jax best / timm eager | / timm compiled | MFU pe_jax best | MFU timm compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rec in s.get("inference", {}).items():
        pe, tm, mfu = rec.get("pe_jax", {}), rec.get("timm", {}), rec.get("mfu", {})
        best = rec.get("pe_jax_best") or {}
        status = "" if rec.get("status") == "ok" else f" ({rec.get('status')})"
        lines.append(
            f"| {rec.get('preset', key)} @{rec.get('image_size', '?')}{status} | {rec.get('batch', '?')} "
            f"| {_f((rec.get('flops_per_image') or 0) / 1e9)} | {_cell(tm.get('eager'))} | {_cell(tm.get('compiled'))} "
            f"| {_cell(pe.get('xla'))} | {_cell(pe.get('cudnn'))} | {_cell(pe.get('auto'))} "
            f"| {_x(rec.get('ratio_vs_timm_eager'))} | {_x(rec.get('ratio_vs_timm_compiled'))} "
            f"| {_pct(mfu.get('pe_jax_' + best['backend']) if best else None)} | {_pct(mfu.get('timm_compiled'))} |")
    lines += ["", "## 2. pe_jax attention backends", "",
              "| tower | head dim (blocks / pooler) | auto picks (blocks / pooler) | xla img/s | cudnn img/s "
              "| cudnn vs xla (rel. L2) | auto img/s | compile s (xla / cudnn) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, rec in s.get("attention", {}).items():
        hd, picks = rec.get("head_dim") or {}, rec.get("auto_picks") or {}
        xla, cudnn = rec.get("xla", {}), rec.get("cudnn", {})
        lines.append(
            f"| {rec.get('preset', key)} | {hd.get('blocks', '?')} / {hd.get('pooler', '-')} "
            f"| {picks.get('blocks', '?')} / {picks.get('pooler', '-')} | {_cell(xla)} | {_cell(cudnn)} "
            f"| {_f(cudnn.get('rel_l2_vs_xla'), 2)} | {_cell(rec.get('auto'))} "
            f"| {_f(xla.get('compile_s'))} / {_f(cudnn.get('compile_s'))} |")
    lines += ["", "## 3-4. Device memory vs the planner (one device, GiB)", "",
              "| configuration | measured peak | planner, CPU compiler (`pe-jax plan`) "
              "| planner, this device's compiler | this program's memory_analysis | planner CPU / measured | time |",
              "|---|---|---|---|---|---|---|"]
    for section, title in (("clip_forward_memory", "CLIP forward, bf16 weights"),
                           ("train_step", "CLIP train step: fp32 weights + AdamW, bf16 compute, remat")):
        rec = s.get(section)
        if not rec:
            continue
        run = rec.get("run", {})
        timing = (f"{_f(run.get('forward_ms'))} ms/forward" if section == "clip_forward_memory" else
                  f"{_f(run.get('step_ms'))} ms/step, {_f(run.get('examples_per_s'))} ex/s, MFU {_pct(rec.get('mfu'))}")
        status = "" if rec.get("status") == "ok" else f" ({rec.get('status')})"
        lines.append(
            f"| {rec.get('preset', '?')} {title}, batch {rec.get('batch', '?')}{status} "
            f"| {_cell(run.get('measured'), 'peak_gib', 3)} | {_cell(rec.get('planner_cpu'), 'peak_gib', 3)} "
            f"| {_cell(rec.get('planner_device'), 'peak_gib', 3)} | {_cell(run.get('compiled_memory'), 'peak_gib', 3)} "
            f"| {_x(rec.get('planner_cpu_over_measured'))} | {timing} |")
    lines += ["", "Targets (issue 16): pe_jax >= 1.2x timm eager and >= 1.0x timm compiled; >= 50% MFU for L/14 and "
              "G/14; the planner within 15% of measured memory.", ""]
    if results.get("errors"):
        lines += ["## Errors", ""] + [f"- `{e}`" for e in results["errors"]] + [""]
    return "\n".join(lines)


def write(results: dict, out: str):
    results["wall_s"] = round(time.time() - results["_start"], 1)
    derive(results)
    for name, text in (("gpu_check.json", json.dumps({k: v for k, v in results.items() if k != "_start"}, indent=1,
                                                     default=_jsonable)),
                       ("gpu_check.md", markdown(results))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    _save_target_configs(results, out)


def parent_main(args):
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    results = {"schema": 1, "smoke": args.smoke, "argv": sys.argv[1:], "_start": start,
               "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "total_budget_s": args.total_seconds,
               "environment": {"python": sys.version.split()[0], "host": platform.node(), "cpu_count": os.cpu_count()},
               "sections": {}, "errors": []}
    selected = set(args.sections)
    if "attention" in selected:
        selected.add("inference")  # the backends are measured in the inference children
    schedule = [(sec, key, smoke if args.smoke else gpu) for sec, key, gpu, smoke in SCHEDULE
                if sec in selected and (sec != "inference" or key in args.models)]
    total = sum(b for *_, b in schedule) or 1.0
    scale = min(1.0, args.total_seconds / total)  # a shorter --total-seconds shrinks every budget alike
    end = start + args.total_seconds
    tmp = tempfile.mkdtemp(prefix="gpu_check_")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    planners = {sec: start_planner(args, sec, tmp) for sec in ("clip_forward_memory", "train_step") if sec in selected}
    env = child_env(args.smoke, cpu=False)
    cumulative = 0.0
    try:
        for section, key, budget in schedule:
            cumulative += budget * scale
            deadline = min(start + cumulative, end)
            if deadline - time.time() < 5:
                store(results, section, key, {"status": "skipped", "skipped": "no time left in the total budget"})
            else:
                print(f"==== {section}:{key} (until +{deadline - start:.0f} s)", flush=True)
                part = os.path.join(tmp, f"{section}-{key}.json")
                rec = run_child(args, section, key, part, deadline, env)
                store(results, section, key, rec)
                print(f"==== {section}:{key}: {rec.get('status')} in {rec.get('wall_s')} s", flush=True)
            if section in planners:
                results["sections"][section]["planner_cpu"] = collect_planner(args, planners.pop(section), end)
            write(results, args.out)
    except KeyboardInterrupt as e:
        print(f"stopped ({e}); writing what was measured", flush=True)
        if _last_child:
            store(results, *_last_child)
    finally:
        for job in planners.values():
            if job.proc.poll() is None:
                _kill_group(job.proc)
        write(results, args.out)
    print(markdown(results), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md in {results['wall_s']} s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the same code paths in about a minute")
    p.add_argument("--total-seconds", type=float, default=None,
                   help="budget of the whole check (default: 465 on a GPU, 600 with --smoke)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="sections to run")
    p.add_argument("--models", nargs="+", default=list(TOWERS), choices=list(TOWERS), help="towers for sections 1-2")
    p.add_argument("--measure-seconds", type=float, default=None,
                   help="timed seconds per throughput figure (default 4 on a GPU, 0.15 with --smoke)")
    p.add_argument("--no-torch-compile", action="store_true", help="timm eager only")
    p.add_argument("--torch-compile-backend", default=None,
                   help="torch.compile backend (default inductor; 'eager' with --smoke: dynamo without codegen)")
    p.add_argument("--min-compile-seconds", type=float, default=None,
                   help="start torch.compile only with this much of the section's budget left (default 40 / 5)")
    p.add_argument("--min-optional-seconds", type=float, default=None,
                   help="run an optional measurement only with this much left (default 15 / 2)")
    p.add_argument("--planner-seconds", type=float, default=240, help="limit of each background CPU planner")
    p.add_argument("--grace-seconds", type=float, default=5, help="a child's time past its deadline before the kill")
    # internal: a child process runs one section
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(total_seconds=600 if smoke else 465, measure_seconds=0.15 if smoke else 4.0,
                    torch_compile_backend="eager" if smoke else "inductor",
                    min_compile_seconds=5 if smoke else 40, min_optional_seconds=2 if smoke else 15)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
