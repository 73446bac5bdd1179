"""One process of the two-process test: joins via pe_jax.distributed, restores a checkpoint sharded over all
8 devices of both processes, embeds a batch and (process 0) saves the result."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4") \
    if "device_count=8" in os.environ.get("XLA_FLAGS", "") else "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_enable_async_dispatch", False)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import pe_jax  # noqa: E402
from pe_jax import distributed, sharding  # noqa: E402
from pe_jax.batching import run_batched  # noqa: E402


def main(port: str, process_id: str, checkpoint: str, images: str, out: str):
    assert distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = sharding.make_mesh("fsdp=8")
    model = pe_jax.CLIP.from_config("PE-Core-T16-384", checkpoint=checkpoint, mesh=mesh, vision_layers=1,
                                    text_layers=1, vision_image_size=32)
    result = run_batched(lambda m, x: m.encode_image(x), model, np.load(images), batch_size=8, mesh=mesh)
    if jax.process_index() == 0:
        np.save(out, result)


if __name__ == "__main__":
    main(*sys.argv[1:])
