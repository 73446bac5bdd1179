"""End-to-end `pe-jax embed` throughput vs the model alone vs a PyTorch pipeline, same images, same run.

  * model only: pe_jax forward on already-decoded arrays, batch B;
  * pe_jax embed: the whole job (listing, decoding in threads, preprocessing, forward, writing parts);
  * PyTorch: open_clip PE-Core-B-16 + torch DataLoader (2 workers) with the reference preprocessing.
Random weights, fp32, B/16 at 224. Run: python benchmarks/bench_embed.py [--images 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

import pe_jax
from pe_jax.batching import run_batched
from pe_jax.embed import embed
from pe_jax.preprocess import get_image_transform

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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.mkdir(folder)
        make_images(folder, args.images)
        model = pe_jax.CLIP.from_config(PRESET)
        transform = get_image_transform(224)
        decoded = np.stack([transform(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))])
        encode = lambda m, x: m.encode_image(x, normalize=True)  # noqa: E731
        run_batched(encode, model, decoded[: args.batch], batch_size=args.batch)  # compile
        start = time.perf_counter()
        run_batched(encode, model, decoded, batch_size=args.batch)
        model_only = args.images / (time.perf_counter() - start)
        embed(model, folder, os.path.join(tmp, "warm"), batch_size=args.batch, part_size=args.batch, progress=False)
        start = time.perf_counter()
        summary = embed(model, folder, os.path.join(tmp, "out"), batch_size=args.batch, part_size=256,
                        progress=False)
        job = args.images / (time.perf_counter() - start)
        assert summary["embedded"] == args.images
        theirs = torch_pipeline(folder, args.batch)
    print(f"{args.images} JPEGs 320x240, {PRESET} fp32, batch {args.batch}, {os.cpu_count()} CPU cores")
    print("| pipeline | images/s | vs pe_jax model only |")
    print("|---|---|---|")
    print(f"| pe_jax model only (decoded arrays) | {model_only:.2f} | 1.00 |")
    print(f"| pe-jax embed (end to end) | {job:.2f} | {job / model_only:.2f} |")
    print(f"| open_clip + torch DataLoader (end to end) | {theirs:.2f} | {theirs / model_only:.2f} |")
    print(f"pe-jax embed vs PyTorch pipeline: {job / theirs:.2f}x")


if __name__ == "__main__":
    main()
