"""Time to the first embedded part and the RSS it adds of `embed` over a 1,000,000-row list file, or a folder
of --folder N files (issue: lists of 100 M rows and folders of millions of images must stream). The inputs
are 64 small JPEGs named over and over (the folder: hard links, 1,000 per subfolder); the model is a one-block
T/16 at 32 px, so listing, not the model, is what is measured. The job runs in a subprocess, sampled every
20 ms, and is stopped once its first part (one batch) is on disk.
Run: python benchmarks/bench_listing.py [--rows 1000000] [--folder 1000000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

JOB = """
import sys, pe_jax
from pe_jax.embed import embed
model = pe_jax.CLIP.from_config("PE-Core-T16-384", vision_layers=1, text_layers=1, vision_image_size=32)
import jax; jax.block_until_ready(model.encode_image(jax.numpy.zeros((8, 32, 32, 3))))  # compiled
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0], flush=True)  # RSS before the job, kB
embed(model, sys.argv[1], sys.argv[2], batch_size=8, part_size=8, progress=False)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--folder", type=int, default=0, help="embed a folder of this many files instead of a list")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(64):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(f"{tmp}/{i}.jpg")
        if args.folder:
            listing = os.path.join(tmp, "folder")
            for r in range(args.folder):
                sub = os.path.join(listing, f"{r // 1000:06d}")
                if not r % 1000:
                    os.makedirs(sub)
                os.link(f"{tmp}/{r % 64}.jpg", os.path.join(sub, f"{r:09d}.jpg"))
        else:
            listing = os.path.join(tmp, "list.jsonl")
            with open(listing, "w") as f:
                for r in range(args.rows):
                    f.write(json.dumps({"path": f"{r % 64}.jpg", "key": f"row{r:09d}", "caption": "a photo"}) + "\n")
        out = os.path.join(tmp, "out")
        proc = subprocess.Popen([sys.executable, "-c", JOB, listing, out], stdout=subprocess.PIPE, text=True)
        before = int(proc.stdout.readline())  # the model is built and compiled: the job starts now
        start = time.perf_counter()
        peak, first = 0, None
        while proc.poll() is None and time.perf_counter() - start < 300:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmRSS")])
            if glob.glob(os.path.join(out, "embeddings", "part-*.npy")):
                first = time.perf_counter() - start
                break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    what = f"a folder of {args.folder} files" if args.folder else f"{args.rows} rows"
    print(f"{what}, {cpu}, {os.cpu_count()} cores: first part {first:.2f} s after embed() was called "
          f"(listing, first batch: its program compiles once per batch shape); RSS {before / 1024:.0f} MB with the "
          f"model built, peak {peak / 1024:.0f} MB (+{(peak - before) / 1024:.0f} MB) until the first part")


if __name__ == "__main__":
    main()
