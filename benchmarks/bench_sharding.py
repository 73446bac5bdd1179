"""Sharded vs single-device forward time on 8 fake CPU devices, so regressions show.

Throughput is not the point on CPU (the 8 "devices" share 2 cores); the ratio tracks the overhead of
the sharded program. Run: python benchmarks/bench_sharding.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_cpu_enable_async_dispatch", False)

import numpy as np  # noqa: E402
from timing import median_seconds  # noqa: E402

import pe_jax  # noqa: E402
from pe_jax import sharding  # noqa: E402

PRESET, OVERRIDES, BATCH = "PE-Core-B16-224", dict(layers=4), 16


def main():
    x = np.random.default_rng(0).standard_normal((BATCH, 224, 224, 3)).astype(np.float32)
    forward = jax.jit(lambda m, x: m(x))
    single = pe_jax.VisionTransformer.from_config(PRESET, **OVERRIDES)
    base = median_seconds(lambda: forward(single, x).block_until_ready(), 5, warmup=1)
    print(f"{PRESET} ({OVERRIDES}), batch {BATCH}, {jax.device_count()} fake CPU devices")
    print("| strategy | mesh | ms/batch | vs single device |")
    print("|---|---|---|---|")
    print(f"| single device | - | {base * 1e3:.0f} | 1.00x |")
    for strategy, axes in [("dp", "data=8"), ("fsdp", "fsdp=8"), ("fsdp_tp", "fsdp=4,model=2")]:
        mesh = sharding.make_mesh(axes)
        model = pe_jax.VisionTransformer.from_config(PRESET, mesh=mesh, strategy=strategy, **OVERRIDES)
        xs = jax.device_put(x, sharding.batch_sharding(mesh, 4))
        t = median_seconds(lambda m=model, xs=xs: forward(m, xs).block_until_ready(), 5, warmup=1)
        print(f"| {strategy} | {axes} | {t * 1e3:.0f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
