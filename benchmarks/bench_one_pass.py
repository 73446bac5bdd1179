"""One pass over image-text shards vs two jobs: `pe-jax embed --modality image,text` against `--modality image`
plus `--modality text` on the same webdataset shards (KEY.jpg + KEY.txt + KEY.json, img2dataset's layout),
target <= 0.7x the time of the two. Timed two ways, alternating the order of the jobs each repeat:

* end to end: each job a fresh `pe-jax embed` process, as a user runs them (start, checkpoint load, compile,
  listing, decoding, encoding, writing);
* in process: `pe_jax.embed.embed` with the model already built and compiled (the jobs' own work alone).

The model is a random PE-Core-T16-384 (its vision and text towers at full depth unless --layers) saved as a
pe_jax checkpoint, at --image-size px. Run: python benchmarks/bench_one_pass.py [--shards 4 --per-shard 250]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from timing import random_jpegs


def write_shards(root: str, shards: int, per_shard: int) -> str:
    """`shards` tar shards of `per_shard` samples (a 320x240 JPEG, a caption, a json) under root/shards."""
    jpegs = random_jpegs()
    os.makedirs(f"{root}/shards")
    for s in range(shards):
        with tarfile.open(f"{root}/shards/{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"a photo of item {key}, a {['red', 'green', 'blue'][i % 3]} thing on a table"
                for ext, data in (("jpg", jpegs[(s * per_shard + i) % len(jpegs)]), ("txt", caption.encode()),
                                  ("json", json.dumps({"url": f"http://example.com/{key}.jpg"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/shards/{{{0:05d}..{shards - 1:05d}}}.tar"


def cli_job(ckpt: str, src: str, out: str, modality: str, batch: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pe_jax.cli", "embed", "--checkpoint", ckpt, "--input", src, "--output",
                    out, "--modality", modality, "--batch-size", str(batch), "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def api_job(model, src: str, out: str, modality: str, batch: int) -> float:
    from pe_jax.embed import embed

    start = time.perf_counter()
    embed(model, src, out, modality=modality, batch_size=batch, progress=False)
    return time.perf_counter() - start


def compare(job, root: str, repeats: int) -> dict:
    """Median seconds of the one-pass job and of the two jobs together, alternating which goes first."""
    one, two = [], []
    for r in range(repeats):
        def run_one(r=r):
            return job(f"{root}/one-{r}", "image,text")

        def run_two(r=r):
            return job(f"{root}/image-{r}", "image") + job(f"{root}/text-{r}", "text")

        if r % 2:
            two.append(run_two())
            one.append(run_one())
        else:
            one.append(run_one())
            two.append(run_two())
        print(f"  repeat {r}: one pass {one[-1]:.1f} s, two jobs {two[-1]:.1f} s ({one[-1] / two[-1]:.2f}x)",
              flush=True)
    return {"one": statistics.median(one), "two": statistics.median(two)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", type=int, default=None, help="blocks per tower (default: the preset's 12)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    import pe_jax

    depth = {} if args.layers is None else {"vision_layers": args.layers, "text_layers": args.layers}
    model = pe_jax.CLIP.from_config("PE-Core-T16-384", vision_image_size=args.image_size, **depth)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_shards(tmp, args.shards, args.per_shard)
        pe_jax.save(model, f"{tmp}/ckpt", preset="PE-Core-T16-384")
        n = args.shards * args.per_shard
        print(f"{n} samples in {args.shards} shards, T/16 at {args.image_size} px, "
              f"{args.layers or 12} blocks a tower, batch {args.batch_size}")
        for modality in ("image,text", "image", "text"):  # compile every program once before timing
            api_job(model, src, f"{tmp}/warm-{modality}", modality, args.batch_size)
        results = {"in process": compare(lambda out, m: api_job(model, src, out, m, args.batch_size), f"{tmp}/api",
                                         args.repeats)}
        if not args.skip_cli:
            results["end to end (CLI)"] = compare(
                lambda out, m: cli_job(f"{tmp}/ckpt", src, out, m, args.batch_size), f"{tmp}/cli", args.repeats)
    for name, r in results.items():
        print(f"{name}: one pass {r['one']:.1f} s ({n / r['one']:.1f} samples/s), image + text jobs {r['two']:.1f} s"
              f" -> {r['one'] / r['two']:.2f}x")


if __name__ == "__main__":
    main()
