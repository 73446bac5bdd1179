"""Compile time of the scanned forward is flat in depth: 12 vs 50 layers, from abstract shapes only.

Run: python benchmarks/bench_compile.py
"""

import time

import jax
import jax.numpy as jnp
from flax import nnx

import pe_jax


def compile_seconds(preset: str, layers: int, batch: int = 1, train: bool = False) -> tuple[float, float]:
    cfg = pe_jax.vision_config(preset, layers=layers, remat_policy="nothing_saveable" if train else "none")
    abstract = nnx.eval_shape(lambda: pe_jax.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
    fn = (lambda m, x: nnx.grad(lambda m: jnp.sum(m(x)))(m)) if train else (lambda m, x: m(x))
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(abstract, x)
    traced = time.perf_counter() - start
    lowered.compile()
    return traced, time.perf_counter() - start - traced


def main():
    print("| model | pass | layers | trace+lower s | compile s |")
    print("|---|---|---|---|---|")
    compile_seconds("PE-Core-B16-224", 2)  # warm-up
    for preset in ("PE-Core-B16-224", "PE-Core-G14-448"):
        for train in (False, True):
            for layers in (12, 50):
                traced, compiled = compile_seconds(preset, layers, train=train)
                print(f"| {preset} | {'fwd+bwd, remat' if train else 'forward'} | {layers} | {traced:.2f} | "
                      f"{compiled:.2f} |")


if __name__ == "__main__":
    main()
