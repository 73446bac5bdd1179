"""The Ray engine's overhead: the same embedding job (same tar shards, checkpoint and settings) run by the local
engine and by Ray Data actors on a local Ray cluster of this machine, in one run.

Both jobs go through `pe_jax.embed.run`, so each wall time includes loading the checkpoint and compiling (once
for the local engine, once per actor for Ray); the Ray cluster's start (`ray.init`) is timed separately, since
a fleet pays it once for many jobs. One-block T/16 at --image-size px (the model is not what is measured).
Run: python benchmarks/bench_ray_engine.py [--shards 16] [--per-shard 200] [--actors 1 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from timing import random_jpegs

import pe_jax
from pe_jax.embed import read_embeddings, run


def write_shards(folder: str, shards: int, per_shard: int):
    jpegs = random_jpegs()
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:03d}.tar"), "w") as tar:
            for i in range(per_shard):
                info = tarfile.TarInfo(f"{s:03d}-{i:05d}.jpg")
                info.size = len(jpegs[(s + i) % 64])
                tar.addfile(info, io.BytesIO(jpegs[(s + i) % 64]))


def timed(**kwargs) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = run(**kwargs)
    assert summary["complete"] and summary["failed"] == 0, summary
    return time.perf_counter() - start, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(tmp, args.shards, args.per_shard)
        model = pe_jax.CLIP.from_config("PE-Core-T16-384", vision_layers=1, text_layers=1,
                                        vision_image_size=args.image_size)
        pe_jax.save(model, f"{tmp}/ckpt")
        src = f"{tmp}/{{000..{args.shards - 1:03d}}}.tar"
        job = dict(src=src, checkpoint=f"{tmp}/ckpt", batch_size=args.batch, progress=False)
        local, _ = timed(out_dir=f"{tmp}/local", **job)
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        rays = {}
        for actors in args.actors:
            rays[actors], _ = timed(out_dir=f"{tmp}/ray{actors}", engine="ray", actors=actors, **job)
            same = np.array_equal(read_embeddings(f"{tmp}/local")[0], read_embeddings(f"{tmp}/ray{actors}")[0])
            assert read_embeddings(f"{tmp}/local")[1] == read_embeddings(f"{tmp}/ray{actors}")[1]
            print(f"ray, {actors} actor(s): rows {'identical' if same else 'equal up to float rounding'}")
        ray.shutdown()
    n = args.shards * args.per_shard
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    print(f"{args.shards} tar shards x {args.per_shard} JPEGs 320x240 = {n} images at {args.image_size} px, "
          f"one-block T/16, batch {args.batch}, {cpu}, {os.cpu_count()} cores")
    print("| engine | wall s | images/s | vs local |\n|---|---|---|---|")
    print(f"| local | {local:.1f} | {n / local:.0f} | 1.00x |")
    for actors, seconds in rays.items():
        print(f"| ray, {actors} actor(s) | {seconds:.1f} | {n / seconds:.0f} | {seconds / local:.2f}x |")
    print(f"| ray.init (once per cluster) | {startup:.1f} | | |")


if __name__ == "__main__":
    main()
