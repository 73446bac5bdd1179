"""Training throughput as a user reads it: steps after compilation, the compile time apart."""

from __future__ import annotations

import time

import jax


class StepRate:
    """Examples per second of the steps after the first one of a call: the first step's time is compilation
    (reported as `compile_seconds`), and folding it into the rate would understate it for most of a short run."""

    def __init__(self, batch_size: int):
        self.batch_size, self.begin, self.compile_seconds, self.since = batch_size, time.perf_counter(), None, None

    def stepped(self, steps: int, metrics, bar):
        if steps == 1:
            jax.block_until_ready(metrics)
            self.since = time.perf_counter()
            self.compile_seconds = round(self.since - self.begin, 2)
            bar.set_description("finetune")

    def rate(self, steps: int) -> float | None:
        elapsed = time.perf_counter() - self.since
        return round((steps - 1) * self.batch_size / elapsed, 2) if steps > 1 and elapsed > 0 else None
