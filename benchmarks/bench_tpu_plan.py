"""Full-size plans by the accelerators' own compilers on this CPU host, next to the CPU planner's figure.

For each (preset, pass, batch, target): peak GiB per chip from the TPU compiler (libtpu) or the CUDA compiler
(compile-only devices), the CPU planner's peak for the same mesh on fake CPU devices, their ratio, the
roofline images/s estimate, and optionally `--max-batch`. One JSON line a row goes to --out as it finishes
(rerun with the same --out to skip finished rows: TPU compiles of G/14 take minutes on 2 cores).

    JAX_PLATFORMS=cpu python benchmarks/bench_tpu_plan.py --rows quick --out plans.jsonl

Needs `pip install "jax[tpu]" "jax[cuda12]"` (one environment; pip picks a jax that matches libtpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# (preset, train, global batch, target, mesh): forward on one chip at 32/64/256, the finetuning step sharded.
QUICK = [
    ("PE-Core-L14-336", False, 64, "v5e-1", "data=1"),
    ("PE-Core-L14-336", False, 64, "h100", "data=1"),
    ("PE-Core-G14-448", False, 64, "v5e-1", "data=1"),
    ("PE-Core-G14-448", False, 64, "h100", "data=1"),
    ("PE-Core-G14-448", True, 64, "h100-8", "fsdp=8"),
    ("PE-Core-G14-448", True, 64, "v5p-8", "fsdp=4"),
]
# The rest of the matrix, cheapest first (a CUDA compile takes ~1 min here, a TPU one 3-4, a TPU train step ~10):
# forward of the CLIP (both towers) and of a vision tower alone at batch 32 / 64 / 256, then training steps.
FULL = QUICK + [
    (m, False, b, t, "data=1") for t in ("h200", "h100", "v5e-1", "v6e-1", "v5p-8")
    for m in ("PE-Core-G14-448", "PE-Spatial-G14-448", "PE-Core-L14-336") for b in (32, 64, 256)
] + [("PE-Core-G14-448", True, 64, t, mesh) for t, mesh in (("h200-8", "fsdp=8"), ("v6e-8", "fsdp=8"),
                                                            ("v5e-8", "fsdp=8"))]
# Rows whose largest batch is also searched with --max-batch (a few more compiles each).
MAX_BATCH = {("PE-Core-G14-448", False, 32, t, "data=1") for t in ("h100", "h200", "v5e-1")} | {
    ("PE-Core-L14-336", False, 32, t, "data=1") for t in ("h100", "v5e-1")}
_CPU: dict = {}  # one CPU plan serves every target of the same program and mesh


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def run_row(row, max_batch_too: bool) -> dict:
    import jax

    from pe_jax import sharding as sh
    from pe_jax.memory_plan import max_batch, plan
    from pe_jax.targets import get_target

    model, train, batch, target_name, mesh = row
    target = get_target(target_name)
    options = dict(train=train, strategy="fsdp")
    start = time.perf_counter()
    real = plan(model, mesh, batch, target=target, **options)
    out = dict(model=model, train=train, batch=batch, target=target_name, mesh=mesh, platform=target.platform,
               peak_gib=round(real.peak_gib, 3), fits=real.fits, error=real.error, attention=real.attention,
               compile_s=round(real.compile_seconds, 1), hbm_gib=round(target.hbm_bytes / 2**30, 2))
    if real.error is None:
        out["roofline_per_chip"], out["roofline_per_slice"] = (round(x, 1) for x in real.images_per_second())
    devices = jax.devices("cpu")[: real.mesh["data"] * real.mesh["fsdp"] * real.mesh["model"]]
    key = (model, train, batch, mesh)
    if key not in _CPU:
        _CPU[key] = plan(model, sh.make_mesh(mesh, devices=devices), batch, attention="xla", **options)
    cpu = _CPU[key]
    out.update(cpu_peak_gib=round(cpu.peak_gib, 3), cpu_compile_s=round(cpu.compile_seconds, 1))
    if real.error is None:
        out["cpu_over_real"] = round(cpu.peak_gib / real.peak_gib, 3)
    if max_batch_too or row in MAX_BATCH:
        best, plans = max_batch(model, mesh, target=target, start=batch, **options)
        out.update(max_batch=best, max_batch_compiles=len(plans))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", choices=["quick", "full"], default="quick")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest batch of every row (some rows"
                        " always get it)")
    parser.add_argument("--out", default="tpu_plans.jsonl")
    args = parser.parse_args()
    done = set()
    if os.path.exists(args.out):
        done = {(r["model"], r["train"], r["batch"], r["target"], r["mesh"]) for r in map(json.loads, open(args.out))}
    print(f"host CPU: {cpu_model()}, {os.cpu_count()} cores", flush=True)
    for row in QUICK if args.rows == "quick" else FULL:
        if row in done:
            continue
        result = run_row(row, args.max_batch)
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
