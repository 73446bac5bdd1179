"""End-to-end `pe-jax embed` throughput vs the model alone vs a PyTorch pipeline, same images, same run.

  * decoding only: the job's own decoding stage (JPEG decode + resize + normalize) on 1 and 2 threads, and the
    same decoding through grain (the finetuning pipeline's library) on 1 and 2 threads or worker processes,
    the choice the job's thread pool was measured against;
  * model only: pe_jax forward on already-decoded arrays, batch B;
  * pe_jax embed: the whole job (listing, decoding in threads, preprocessing, forward, writing parts), from a
    folder and from a webdataset tar shard of the same JPEGs;
  * PyTorch: open_clip PE-Core-B-16 + torch DataLoader (2 workers) with the reference preprocessing.
Random weights, fp32, B/16 at 224. Run: python benchmarks/bench_embed.py [--images 256] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time

import numpy as np
from PIL import Image

import pe_jax
from pe_jax.batching import run_batched
from pe_jax.data.sources import list_folder
from pe_jax.embed import decode_ahead, embed, item_loader
from pe_jax.preprocess import get_image_transform
from pe_jax.preprocess.image import decode_image, reuse_freed_images

PRESET = "PE-Core-B16-224"


def make_images(folder: str, n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                                           quality=90)


def torch_pipeline(folder: str, batch: int) -> float:
    import open_clip
    import torch

    torch.set_num_threads(os.cpu_count())
    model = open_clip.create_model("PE-Core-B-16", pretrained=None).eval()
    transform = get_image_transform(224)  # identical to open_clip's `meta` transform (tests: max diff 0)
    files = sorted(os.listdir(folder))

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return torch.from_numpy(transform(Image.open(os.path.join(folder, files[i]))).transpose(2, 0, 1).copy())

    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch, num_workers=2)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            model.encode_image(x, normalize=True)
    return len(files) / (time.perf_counter() - start)


def decode_only(folder: str, workers: int) -> float:
    """Images/s of the embedding job's decoding stage alone (what feeds the model)."""
    stop = threading.Event()
    load = item_loader("image", get_image_transform(224), 8, stop)
    items = list_folder(folder)
    start = time.perf_counter()
    n = sum(error is None for *_, error in decode_ahead([(0, items)], load, workers, 64, stop))
    assert n == len(items)
    return n / (time.perf_counter() - start)


class _Decode:
    """The job's per-image decoding as a picklable callable, for grain's worker processes."""

    def __init__(self):
        self.transform = get_image_transform(224)

    def __call__(self, item):
        return self.transform(decode_image(item.data))


def grain_decode(folder: str, workers: int, processes: bool) -> float:
    """Images/s of the same decoding through grain: `workers` threads, or as many worker processes (each
    decoding batches of 16, so the pixels cross between processes as one array a batch)."""
    import grain
    from absl import flags

    items = list_folder(folder)
    dataset = grain.MapDataset.source(items).map(_Decode())
    if processes:  # timed from the first batch on: the workers' start (~2 s) is a one-off cost
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
        batches = iter(dataset.batch(16).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
                       .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)))
        first = len(next(batches))
        start = time.perf_counter()
        n = sum(len(b) for b in batches)
        assert first + n == len(items)
        return n / (time.perf_counter() - start)
    reuse_freed_images(workers)
    start = time.perf_counter()
    n = sum(1 for _ in dataset.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=64)))
    assert n == len(items)
    return n / (time.perf_counter() - start)


def median_rates(rate, repeat: int = 5) -> dict[int, float]:
    """{workers: median images/s} for 1 and 2 workers, alternating: a decoding pass is short (~0.3 s) and the
    VM noisy."""
    runs = [(rate(1), rate(2)) for _ in range(repeat)]
    return {1: statistics.median(r[0] for r in runs), 2: statistics.median(r[1] for r in runs)}


def job(model, src: str, out: str, batch: int) -> float:
    start = time.perf_counter()
    summary = embed(model, src, out, batch_size=batch, part_size=256, progress=False)
    assert summary["failed"] == 0, summary
    return summary["embedded"] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.mkdir(folder)
        make_images(folder, args.images)
        shard = os.path.join(tmp, "shard-000000.tar")
        with tarfile.open(shard, "w") as tar:
            for f in sorted(os.listdir(folder)):
                tar.add(os.path.join(folder, f), arcname=f)
        decode_only(folder, 2)  # warm the page cache and the decoders
        decode = median_rates(lambda w: decode_only(folder, w))
        grain_threads = median_rates(lambda w: grain_decode(folder, w, processes=False))
        grain_processes = {w: grain_decode(folder, w, processes=True) for w in (1, 2)}
        model = pe_jax.CLIP.from_config(PRESET)
        transform = get_image_transform(224)
        decoded = np.stack([transform(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))])
        encode = lambda m, x: m.encode_image(x, normalize=True)  # noqa: E731
        run_batched(encode, model, decoded[: args.batch], batch_size=args.batch)  # compile
        start = time.perf_counter()
        run_batched(encode, model, decoded, batch_size=args.batch)
        model_only = args.images / (time.perf_counter() - start)
        embed(model, folder, os.path.join(tmp, "warm"), batch_size=args.batch, part_size=args.batch, progress=False)
        from_folder = job(model, folder, os.path.join(tmp, "out"), args.batch)
        from_tar = job(model, shard, os.path.join(tmp, "out-tar"), args.batch)
        theirs = torch_pipeline(folder, args.batch)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    cores = os.cpu_count()
    print(f"{args.images} JPEGs 320x240, {PRESET} fp32, batch {args.batch}; {name}, {cores} CPU cores")
    print(f"decoding only (decode + resize to 224 + normalize): 1 thread {decode[1]:.1f} images/s, 2 threads "
          f"{decode[2]:.1f} ({decode[2] / decode[1]:.2f}x; {decode[2] / min(2, cores):.1f} images/s per core)")
    print("| decoding alone | 1 worker images/s | 2 workers images/s | scaling |")
    print("|---|---|---|---|")
    for name, rates in (("pe_jax.embed.decode_ahead (the job's thread pool)", decode),
                        ("grain, threads", grain_threads),
                        ("grain, worker processes (batches of 16; from the first batch)", grain_processes)):
        print(f"| {name} | {rates[1]:.1f} | {rates[2]:.1f} | {rates[2] / rates[1]:.2f}x |")
    print("| pipeline | images/s | vs pe_jax model only |")
    print("|---|---|---|")
    print(f"| pe_jax model only (decoded arrays) | {model_only:.2f} | 1.00 |")
    print(f"| pe-jax embed, folder (end to end) | {from_folder:.2f} | {from_folder / model_only:.2f} |")
    print(f"| pe-jax embed, tar shard (end to end) | {from_tar:.2f} | {from_tar / model_only:.2f} |")
    print(f"| open_clip + torch DataLoader (end to end) | {theirs:.2f} | {theirs / model_only:.2f} |")
    print(f"pe-jax embed vs PyTorch pipeline: {from_folder / theirs:.2f}x (folder), {from_tar / theirs:.2f}x (tar)")


if __name__ == "__main__":
    main()
