"""Shared timing helper for the benchmark scripts."""

import statistics
import time


def median_seconds(fn, runs: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
