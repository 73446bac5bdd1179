"""The retrieval demo, timed: the shapes demo's CLIP as the backbone (`pe-jax demo`), then retrieval finetuning on
generated products (`configs/demo_retrieval.py`), with the held-out layer x pooling sweep (`pe-jax eval
retrieval`) of the backbone and of the finetuned tower (issue target: held-out mAP@10 +20 points in 10 min).

Run: python benchmarks/bench_retrieval_demo.py [--workdir DIR]   (a fresh temporary folder by default)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def cli(*args: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pe_jax.cli", *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return time.perf_counter() - start


def sweep(checkpoint: str, queries: str, output: str) -> dict:
    cli("eval", "retrieval", "--checkpoint", checkpoint, "--queries", queries, "--labels", "label",
        "--layers", "0,1,2,-1", "--pooling", "attn,mean,cls", "-k", "1,5,10", "--output", output)
    with open(output) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="pe-jax-retrieval-demo-")
    shapes, products = os.path.join(root, "shapes"), os.path.join(root, "products")
    backbone_s = cli("demo", "--workdir", shapes, "--quiet", "--no-open-clip")
    finetune_s = cli("finetune", "--config", "demo_retrieval", "--workdir", products, "--quiet",
                     "--set", f"model.checkpoint={os.path.join(shapes, 'model')}")
    heldout = os.path.join(products, "data", "heldout")
    before = sweep(os.path.join(shapes, "model"), heldout, os.path.join(root, "before.json"))
    after = sweep(os.path.join(products, "model"), heldout, os.path.join(root, "after.json"))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{name}, {os.cpu_count()} cores: backbone (pe-jax demo) {backbone_s:.0f} s, retrieval finetuning "
          f"{finetune_s:.0f} s; held-out products, leave-one-out")
    print("| layer | pooling | backbone P@1 | mAP@10 | finetuned P@1 | mAP@10 |\n|---|---|---|---|---|---|")
    for b, a in zip(before["results"], after["results"], strict=True):
        print(f"| {b['layer']} | {b['pooling']} | {b['P@1']:.3f} | {b['mAP@10']:.3f} | {a['P@1']:.3f} | "
              f"{a['mAP@10']:.3f} |")
    head = [(b, a) for b, a in zip(before["results"], after["results"], strict=True) if b["pooling"] == "attn"][0]
    gain = 100 * (head[1]["mAP@10"] - head[0]["mAP@10"])
    print(f"the head's embedding: mAP@10 {head[0]['mAP@10']:.3f} -> {head[1]['mAP@10']:.3f} ({gain:+.1f} points), "
          f"P@1 {head[0]['P@1']:.3f} -> {head[1]['P@1']:.3f}")


if __name__ == "__main__":
    main()
