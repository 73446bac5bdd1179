"""Shared helpers for the benchmark scripts: timing, test images."""

import io
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


def random_jpegs(n: int = 64) -> list[bytes]:
    """`n` distinct 320x240 JPEGs of random pixels (quality 90), the same on every run."""
    import numpy as np
    from PIL import Image

    rng, jpegs = np.random.default_rng(0), []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs
