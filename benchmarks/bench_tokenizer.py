"""Strings per second of pe_jax's text tokenizer vs OpenCLIP's PE-Core tokenizer on generated captions.

Both tokenize the same 10k captions (mostly ASCII, ~6% with accents / emoji / HTML entities, ~16 tokens each) into
[N, 32] ids; the ids must be identical. Each tokenizer runs once to warm its BPE cache, then `--runs` timed runs.
`import open_clip` (like the reference tokenizer module) sets TOKENIZERS_PARALLELISM=false for the whole process,
which makes the Rust tokenizer single-threaded: pe_jax is timed both with the default (parallel) and so.
Run: python benchmarks/bench_tokenizer.py [--n 10000] [--runs 5] [--context-length 32]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np

from pe_jax.preprocess import get_text_tokenizer

OPEN_CLIP = {32: "PE-Core-B-16", 72: "PE-Core-bigG-14-448"}


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = "dog cat man woman child bird horse car train boat bicycle pizza cake flower tree house".split()
    adjectives = "small big red blue green old young happy wet wooden shiny colorful black white".split()
    places = "on the beach|in a park|on a city street|in the snow|at night|next to a river|in a kitchen".split("|")
    actions = "sitting|running|standing|playing with a ball|eating|looking at the camera|sleeping".split("|")
    extras = ["café", "naïve", "😀", "東京", "fish &amp; chips", "“quoted”", "R&D", "Zürich"]
    out = []
    for _ in range(n):
        s = (f"{rng.choice(['A', 'The', 'Two', 'A photo of a'])} {rng.choice(adjectives)} {rng.choice(subjects)} "
             f"{rng.choice(actions)} {rng.choice(places)}")
        if rng.random() < 0.06:
            s += " " + rng.choice(extras)
        out.append(s + rng.choice([".", "", "!"]))
    return out


def strings_per_second(fn, texts: list[str], runs: int) -> tuple[float, np.ndarray]:
    out = np.asarray(fn(texts))  # warm-up: fills the BPE caches
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(texts)
        times.append(time.perf_counter() - t0)
    return len(texts) / statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--context-length", type=int, default=32, choices=sorted(OPEN_CLIP))
    args = ap.parse_args()
    texts = captions(args.n)
    ours = get_text_tokenizer(args.context_length)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    import open_clip  # sets TOKENIZERS_PARALLELISM=false

    ref = open_clip.get_tokenizer(OPEN_CLIP[args.context_length])
    ref_sps, ref_ids = strings_per_second(lambda t: ref(t).numpy(), texts, args.runs)
    serial_sps, serial_ids = strings_per_second(ours, texts, args.runs)
    os.environ.pop("TOKENIZERS_PARALLELISM")
    if parallelism is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    our_sps, our_ids = strings_per_second(ours, texts, args.runs)
    differing = int(((our_ids != ref_ids) | (serial_ids != ref_ids)).any(axis=1).sum())
    print(f"{len(texts)} captions, context {args.context_length}, median of {args.runs} runs after a warm-up, "
          f"{os.cpu_count()} CPUs")
    print(f"open_clip SimpleTokenizer:           {ref_sps:10,.0f} strings/s")
    print(f"pe_jax TextTokenizer (default):      {our_sps:10,.0f} strings/s   {our_sps / ref_sps:.2f}x")
    print(f"pe_jax TextTokenizer (1 thread, as after `import open_clip`): "
          f"{serial_sps:,.0f} strings/s   {serial_sps / ref_sps:.2f}x")
    print(f"rows identical to open_clip in both pe_jax runs: {len(texts) - differing}/{len(texts)}")
    assert differing == 0, f"{differing} rows differ from open_clip"


if __name__ == "__main__":
    main()
