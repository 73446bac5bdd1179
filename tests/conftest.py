import os

# Eight fake CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

# Interleaved sharded programs deadlock XLA:CPU's collectives on 2 cores when dispatched asynchronously.
jax.config.update("jax_cpu_enable_async_dispatch", False)
# Parity is measured in true float32, not XLA:CPU's default reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
