"""Multi-host setup: a thin wrapper over `jax.distributed.initialize` that every job entry point calls."""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> bool:
    """Joins the processes of a multi-host job; a no-op for a single process. Returns whether it joined.

    Arguments default to the standard variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. With none of them set, managed clusters (TPU pods, SLURM, ...) that JAX detects by
    itself are joined when PE_JAX_DISTRIBUTED=1.
    """
    global _initialized
    if _initialized:
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    auto = env.get("PE_JAX_DISTRIBUTED") == "1"
    if not auto and (num_processes in (None, 1) or coordinator_address is None):
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    _initialized = True
    return True


def barrier(name: str):
    """All processes of a multi-host job meet here (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
