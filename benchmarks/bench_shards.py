"""Shard size and part size do not change the cost of an embedding job: per-image wall time of one
10,000-sample webdataset shard vs ten 1,000-sample shards (target <= 1.1x), and peak RSS at --part-size 100
vs 10000 on the same 10,000 images as a folder (target: within 300 MB). One-block T/16 (the model is not
what is measured) at --image-size px; each job runs in a fresh subprocess sampled every 20 ms.
Run: python benchmarks/bench_shards.py [--images 10000] [--image-size 224]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

from timing import random_jpegs

JOB = """
import sys, pe_jax
from pe_jax.embed import embed
model = pe_jax.CLIP.from_config("PE-Core-T16-384", vision_layers=1, text_layers=1,
                                vision_image_size=int(sys.argv[4]))
embed(model, sys.argv[1], sys.argv[2], batch_size=32, part_size=int(sys.argv[3]), progress=False)
"""


def run(src: str, out: str, part_size: int, image_size: int) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one job."""
    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen([sys.executable, "-c", JOB, src, out, str(part_size), str(image_size)])
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmRSS")])
        except OSError:
            pass
        time.sleep(0.02)
    assert proc.returncode == 0
    return time.perf_counter() - start, peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = random_jpegs()
        os.makedirs(f"{tmp}/folder")
        for i in range(n):
            with open(f"{tmp}/folder/{i:06d}.jpg", "wb") as f:
                f.write(jpegs[i % 64])

        def shard(path, lo, hi):
            with tarfile.open(path, "w") as tar:
                for i in range(lo, hi):
                    info = tarfile.TarInfo(f"{i:06d}.jpg")
                    info.size = len(jpegs[i % 64])
                    tar.addfile(info, io.BytesIO(jpegs[i % 64]))
                    caption = f"sample {i}".encode()
                    info = tarfile.TarInfo(f"{i:06d}.txt")
                    info.size = len(caption)
                    tar.addfile(info, io.BytesIO(caption))

        shard(f"{tmp}/big.tar", 0, n)
        os.makedirs(f"{tmp}/ten")
        for s in range(10):
            shard(f"{tmp}/ten/{s:02d}.tar", s * n // 10, (s + 1) * n // 10)
        size = args.image_size
        one, _ = run(f"{tmp}/big.tar", f"{tmp}/o1", 1000, size)
        ten, _ = run(f"{tmp}/ten/{{00..09}}.tar", f"{tmp}/o10", 1000, size)
        _, rss_small = run(f"{tmp}/folder", f"{tmp}/p100", 100, size)
        _, rss_large = run(f"{tmp}/folder", f"{tmp}/p10000", 10000, size)
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    print(f"{n} JPEGs 320x240 at {size} px, one-block T/16, batch 32, {cpu}, {os.cpu_count()} cores")
    print("| measurement | value |\n|---|---|")
    print(f"| one {n}-sample shard, ms per image | {1000 * one / n:.2f} |")
    print(f"| ten {n // 10}-sample shards, ms per image | {1000 * ten / n:.2f} |")
    print(f"| ratio (one / ten) | {one / ten:.2f}x |")
    print(f"| peak RSS, --part-size 100 | {rss_small:.0f} MB |")
    print(f"| peak RSS, --part-size 10000 | {rss_large:.0f} MB |")


if __name__ == "__main__":
    main()
