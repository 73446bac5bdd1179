"""The full shapes demo, timed: `pe-jax demo` end to end (dataset generation, training from scratch,
zero-shot on the held-out colour x shape combinations, export to open_clip and the same predictions there).

Run: python benchmarks/bench_demo.py [--workdir DIR]   (a fresh temporary folder by default)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or os.path.join(tempfile.mkdtemp(prefix="pe-jax-demo-"), "run")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pe_jax.cli", "demo", "--workdir", workdir, "--quiet"],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(out.stderr)
    print(out.stdout.strip())
    top1 = float(re.search(r"zero-shot top-1: ([\d.]+)%", out.stdout).group(1))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in rows if "loss" in r]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; steps {train[-1]['step']}, "
          f"loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, {train[-1]['examples_per_second']} examples/s")
    print(f"pe-jax demo wall time: {seconds / 60:.1f} min (target <= 10 min); zero-shot top-1 {top1:.1f}% "
          f"(target >= 90%)")


if __name__ == "__main__":
    main()
