"""What webdataset's grouping rules cost at scale (issue 30): one 10,000-sample webdataset shard (small random
JPEGs, each with a .txt caption and a .json of img2dataset's fields) listed and grouped by
`pe_jax.data.sources.list_tar`, timed (median of --repeats, each in a fresh subprocess, the listers alternating)
with the subprocess's peak RSS, for this tree and, with --before DIR, for another source tree (the code before
the rules:
`mkdir /tmp/before && git archive ba6c7e3 | tar -x -C /tmp/before`). The peer: webdataset's own iteration of
the same shard (`webdataset.WebDataset`, no decoding), which also reads every member's bytes.
Run: python benchmarks/bench_grouping.py [--samples 10000] [--repeats 5] [--before /tmp/before]
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

import numpy as np
from PIL import Image

LIST = """
import resource, sys, time
from pe_jax.data.sources import list_tar
start = time.perf_counter()
items = list_tar(sys.argv[1])
seconds = time.perf_counter() - start
print(len(items), seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
PEER = """
import resource, sys, time
import webdataset as wds
start = time.perf_counter()
n = sum(1 for _ in wds.WebDataset(sys.argv[1], shardshuffle=False, empty_check=False))
seconds = time.perf_counter() - start
print(n, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write_shard(path: str, n: int):
    rng, jpegs = np.random.default_rng(0), []
    for _ in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            meta = json.dumps({"url": f"http://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success",
                               "width": 64, "height": 64, "exif": {"Make": "x"}}).encode()
            for ext, data in (("jpg", jpegs[i % 64]), ("txt", f"a photo number {i}".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def measure(listers: list[tuple[str, str, str | None]], shard: str, repeats: int) -> list[tuple[int, float, float]]:
    """(samples, median seconds, max peak RSS MB) of each (name, code, source tree) over `shard`: each run a
    fresh process, the listers alternating round by round so a busy machine weighs on all alike."""
    runs = [[] for _ in listers]
    for _ in range(repeats):
        for i, (_, code, tree) in enumerate(listers):
            env = dict(os.environ, **({"PYTHONPATH": tree} if tree else {}))
            out = subprocess.run([sys.executable, "-c", code, shard], capture_output=True, text=True, env=env,
                                 check=True)
            n, seconds, rss = out.stdout.split()
            runs[i].append((int(n), float(seconds), float(rss)))
    return [(r[0][0], statistics.median(x[1] for x in r), max(x[2] for x in r)) for r in runs]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", help="another source tree to list with (PYTHONPATH)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "shard.tar")
        write_shard(shard, args.samples)
        size = os.path.getsize(shard) / 1e6
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        listers = [("pe-jax (this tree)", LIST, here)]
        if args.before:
            listers.append((f"pe-jax ({args.before})", LIST, args.before))
        listers.append(("webdataset.WebDataset (peer)", PEER, None))
        rows = list(zip([name for name, _, _ in listers], measure(listers, shard, args.repeats), strict=True))
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    print(f"one {args.samples}-sample shard ({size:.0f} MB: .jpg 64x64 + .txt + .json), median of {args.repeats} "
          f"fresh processes, {cpu}, {os.cpu_count()} cores")
    print("| lister | samples | seconds | us per sample | peak RSS MB | time vs this tree |\n|---|---|---|---|---|---|")
    base = rows[0][1][1]
    for name, (n, seconds, rss) in rows:
        print(f"| {name} | {n} | {seconds:.3f} | {1e6 * seconds / args.samples:.1f} | {rss:.0f} | "
              f"{seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
