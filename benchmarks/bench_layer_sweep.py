"""The retrieval layer sweep (`pe-jax eval retrieval --queries`) against embedding each (layer, pooling) pair
in a pass of its own, and against one plain embedding pass, on the same decoded images in one run.

  * one embedding pass: `features(model, x)` (the model's head), the cost of `pe-jax embed`;
  * the sweep: `layer_features(model, x, pairs)`, every pair from one pass of the tower;
  * separately: one `features(model, x, layer_idx, pooling)` pass per pair.
Random weights, fp32. Target (issue 17): the sweep costs <= 1.3x one embedding pass.
Run: python benchmarks/bench_layer_sweep.py [--preset PE-Core-B16-224] [--batch 16]
"""

from __future__ import annotations

import argparse
import platform
import subprocess

import jax
import numpy as np
from timing import median_seconds

import pe_jax
from pe_jax.evals.layer_sweep import sweep_pairs
from pe_jax.features import features, layer_features


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="PE-Core-B16-224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", default="4,8,-1")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    model = pe_jax.VisionTransformer.from_config(args.preset)
    size = model.config.image_size
    x = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)
    pairs = sweep_pairs(model, [int(v) for v in args.layers.split(",")], ["attn", "mean", "cls"])

    one = jax.jit(lambda m, x: features(m, x))
    sweep = jax.jit(lambda m, x: layer_features(m, x, pairs))
    single = [jax.jit(lambda m, x, p=p: features(m, x, layer_idx=p[0], pooling=p[1])) for p in pairs]
    t_one = median_seconds(lambda: one(model, x).block_until_ready(), args.runs)
    t_sweep = median_seconds(lambda: jax.block_until_ready(sweep(model, x)), args.runs)
    t_single = median_seconds(lambda: [jax.block_until_ready(f(model, x)) for f in single], args.runs)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                platform.processor())
    print(f"{args.preset} @{size}, batch {args.batch}, {len(pairs)} pairs {pairs}; CPU: {name}, jax {jax.__version__}")
    print("| pass | s/batch | vs one embedding pass |\n|---|---|---|")
    for label, t in (("one embedding pass", t_one), ("sweep (every pair, one pass)", t_sweep),
                     (f"each pair separately ({len(pairs)} passes)", t_single)):
        print(f"| {label} | {t:.3f} | {t / t_one:.2f}x |")


if __name__ == "__main__":
    main()
