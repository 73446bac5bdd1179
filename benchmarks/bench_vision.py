"""pe_jax vs timm, B/16 at 224, fp32, on this machine's CPU, in one run.

Prints images/s for both and the ratio, and pe_jax's achieved FLOP/s as a fraction of the measured
peak of one large fp32 matmul in JAX. Run: python benchmarks/bench_vision.py [--batches 1 8] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from timing import median_seconds

import pe_jax
from pe_jax.memory_plan import vision_flops

PRESET, TIMM_NAME, SIZE = "PE-Core-B16-224", "vit_pe_core_base_patch16_224", 224


def matmul_peak(n: int = 4096, runs: int = 3) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / median_seconds(lambda: f(a).block_until_ready(), runs, warmup=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    peer = timm.create_model(TIMM_NAME, pretrained=False).eval()
    sd = {k: v.numpy() for k, v in peer.state_dict().items()}
    model = pe_jax.VisionTransformer.from_config(PRESET, checkpoint=sd)
    forward = jax.jit(lambda m, x: m(x))
    cfg = model.config
    flops = vision_flops(cfg)
    peak = matmul_peak()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}")
    print(f"jax fp32 matmul peak (4096^3): {peak / 1e9:.1f} GFLOP/s; B/16@224 forward: {flops / 1e9:.2f} GFLOP/image")
    print("| batch | timm img/s | pe_jax img/s | ratio | pe_jax GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        x = np.random.default_rng(0).standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        with torch.inference_mode():
            t_timm = median_seconds(lambda xt=xt: peer(xt), args.runs)
        xj = jnp.asarray(x)
        t_jax = median_seconds(lambda xj=xj: forward(model, xj).block_until_ready(), args.runs)
        achieved = flops * batch / t_jax
        print(f"| {batch} | {batch / t_timm:.2f} | {batch / t_jax:.2f} | {t_timm / t_jax:.2f}x | "
              f"{achieved / 1e9:.1f} | {achieved / peak:.0%} |")


if __name__ == "__main__":
    main()
