"""Conversion time and peak anonymous memory (RssAnon) of `pe-jax convert`, against `cp` of the same file.

Generates a random checkpoint of a full preset on disk (streamed: never held in memory), converts it in
a subprocess while sampling its RssAnon, and copies it with cp. Not a test: it writes GBs.
Run: python benchmarks/bench_convert.py --model PE-Core-L14-336 [--model PE-Core-G14-448] [--dir DIR] [--repeat N]
     [--source-sha256] (also hash the source, as `pe-jax convert --source-sha256` does)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from flax import nnx

import pe_jax
from pe_jax.checkpoints.naming import slot_shape, slots
from pe_jax.checkpoints.params import param_shapes


def torch_shapes(preset: str, naming: str = "original") -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: pe_jax.CLIP(pe_jax.clip_config(preset), rngs=nnx.Rngs(0)))
    shapes = param_shapes(model)
    return {s.torch_key: tuple(s.transform.torch_shape(slot_shape(shapes[s.path].shape, s.index)))
            for s in slots(model.config, naming, shapes)}


def write_random_safetensors(path: str, shapes: dict[str, tuple], seed: int = 0):
    """A safetensors file of random float32 tensors, written tensor by tensor."""
    header, start = {}, 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for shape in shapes.values():
            n = math.prod(shape)
            for lo in range(0, n, 1 << 24):
                f.write(rng.standard_normal(min(1 << 24, n - lo), dtype=np.float32).tobytes())


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_anon_mb(cmd: list[str]) -> tuple[float, float, int, float]:
    """(peak RssAnon MB, wall seconds, return code, CPU seconds) of a subprocess, RssAnon sampled every 20 ms.
    CPU seconds (user + system, all threads) say more than wall time when other work shares the machine."""
    cpu = _children_cpu_s()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = [0]

    def sample():
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    t.join()
    return peak[0] / 1024, wall, rc, _children_cpu_s() - cpu


def convert_vs_cp(src: str, scratch: str, repeat: int, check=None, flags: tuple[str, ...] = ()) -> list[tuple]:
    """(ratio, convert s, cp s, peak RssAnon MB, convert CPU s) of `repeat` pairs, cp and `pe-jax convert`
    alternating, each after a sync, so both see the same machine state. `check(dst)` inspects each output."""
    runs = []
    for _ in range(repeat):
        os.sync()
        start = time.perf_counter()
        subprocess.run(["cp", src, os.path.join(scratch, "copy.safetensors")], check=True)
        cp_s = time.perf_counter() - start
        os.remove(os.path.join(scratch, "copy.safetensors"))
        os.sync()
        dst = os.path.join(scratch, "ckpt")
        cmd = [sys.executable, "-m", "pe_jax.cli", "convert", src, dst, "--quiet", *flags]
        peak, conv_s, rc, cpu_s = peak_rss_anon_mb(cmd)
        assert rc == 0, f"conversion failed ({rc})"
        if check:
            check(dst)
        shutil.rmtree(dst)
        runs.append((conv_s / cp_s, conv_s, cp_s, peak, cpu_s))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=5, help="cp / convert pairs per preset (median reported)")
    parser.add_argument("--source-sha256", action="store_true", help="convert with --source-sha256")
    args = parser.parse_args()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    print("| preset | file GB | convert s | cp s | ratio | peak RssAnon MB | convert CPU s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.model or ["PE-Core-L14-336"]:
        scratch = tempfile.mkdtemp(dir=args.dir)
        try:
            src = os.path.join(scratch, f"{preset}.safetensors")
            write_random_safetensors(src, torch_shapes(preset))
            subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # same page-cache state for both
            runs = convert_vs_cp(src, scratch, args.repeat, flags=("--source-sha256",) if args.source_sha256 else ())
            gb = os.path.getsize(src) / 1e9
            for ratio, conv_s, cp_s, peak, cpu_s in sorted(runs):
                print(f"| {preset} | {gb:.2f} | {conv_s:.1f} | {cp_s:.1f} | {ratio:.1f}x | {peak:.0f} | {cpu_s:.1f} |",
                      flush=True)
            print(f"median ratio {preset}: {sorted(runs)[len(runs) // 2][0]:.2f}x", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
