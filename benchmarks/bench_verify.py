"""What checksums cost: an L/14 CLIP checkpoint's load time with and without verification, the time of
verification alone, and the converter (which now checksums every chunk as it writes it) against `cp`.

Makes a random-weight original-naming safetensors file with numpy (as bench_convert does), converts it,
then loads it in fresh processes (median of --repeat after one untimed pair, page cache warm: every file is read
once first).
Not a test: it writes GBs.
Run: python benchmarks/bench_verify.py [--model PE-Core-L14-336] [--dir DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import convert_vs_cp, torch_shapes, write_random_safetensors  # noqa: E402

LOAD = """
import json, sys, time
import jax
from flax import nnx
from pe_jax.pretrained import load_model
verify = sys.argv[2] == "1"
start = time.perf_counter()
model = load_model(sys.argv[1], verify=verify)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
print(json.dumps({"load_s": time.perf_counter() - start}))
"""

VERIFY = """
import json, sys, time
from pe_jax.checkpoints.verify import verify
start = time.perf_counter()
report = verify(sys.argv[1])
assert report.ok, report.summary()
print(json.dumps({"verify_s": time.perf_counter() - start, "gb": report.bytes / 1e9}))
"""


def _run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _warm(path: str):
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def bench_load(ckpt: str, repeat: int) -> dict:
    _warm(ckpt)
    for verify in ("0", "1"):  # not timed: the first load of a run was up to 2x slower
        _run(LOAD, ckpt, verify)
    on, off, alone = [], [], []
    for _ in range(repeat):  # alternating, so both see the same machine state
        off.append(_run(LOAD, ckpt, "0")["load_s"])
        on.append(_run(LOAD, ckpt, "1")["load_s"])
        result = _run(VERIFY, ckpt)
        alone.append(result["verify_s"])
    return {"gb": result["gb"], "load_verified_s": statistics.median(on), "load_unverified_s": statistics.median(off),
            "verify_alone_s": statistics.median(alone), "runs": {"on": on, "off": off, "verify": alone}}


def bench_convert(src: str, scratch: str, repeat: int) -> dict:
    def has_checksums(dst):
        assert os.path.exists(os.path.join(dst, "checksums.json"))

    runs = convert_vs_cp(src, scratch, repeat, check=has_checksums)
    ratio, conv_s, cp_s, peak, cpu_s = sorted(runs)[len(runs) // 2]
    return {"convert_s": conv_s, "cp_s": cp_s, "ratio": ratio, "peak_rss_anon_mb": max(r[3] for r in runs),
            "convert_cpu_s": cpu_s, "runs": runs}


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="PE-Core-L14-336")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(dir=args.dir)
    try:
        # not "ckpt": convert_vs_cp writes that one (and refuses an existing one)
        src, ckpt = os.path.join(scratch, "src.safetensors"), os.path.join(scratch, "loaded")
        write_random_safetensors(src, torch_shapes(args.model))
        subprocess.run([sys.executable, "-m", "pe_jax.cli", "convert", src, ckpt, "--quiet"], check=True)
        load = bench_load(ckpt, args.repeat)
        _warm(src)
        conv = bench_convert(src, scratch, args.repeat)
        share = (load["load_verified_s"] - load["load_unverified_s"]) / load["load_verified_s"]
        alone_share = load["verify_alone_s"] / load["load_unverified_s"]
        print(f"CPU: {_cpu()}")
        print(f"{args.model}: {load['gb']:.2f} GB checkpoint")
        print(f"load: {load['load_verified_s']:.2f} s verified, {load['load_unverified_s']:.2f} s with verify=False "
              f"(verification {100 * share:.0f}% of the verified load); verify alone {load['verify_alone_s']:.2f} s "
              f"({load['gb'] / load['verify_alone_s']:.2f} GB/s, {100 * alone_share:.0f}% "
              f"of the unverified load: the stable figure when loads vary by more than that)")
        print(f"convert (checksums on): {conv['convert_s']:.1f} s vs cp {conv['cp_s']:.1f} s = {conv['ratio']:.2f}x, "
              f"peak RssAnon {conv['peak_rss_anon_mb']:.0f} MB, {conv['convert_cpu_s']:.1f} CPU s")
        print(json.dumps({"load": load, "convert": conv}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
