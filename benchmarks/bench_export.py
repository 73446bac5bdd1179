"""ONNX export: onnxruntime (CPU) vs pe_jax vs timm on PE-Core-B16-224's vision tower, fp32, the same random
weights in all three, on this machine; then the export's cost for L/14 (PE-Core-L14-336 vision, random weights):
ONNX and StableHLO export time (tracing and writing; the self-check and loading apart) and file size.

Needs jax2onnx (pip install --no-deps jax2onnx==0.17.1) and the onnx extra. Run:
python benchmarks/bench_export.py [--batches 1 8] [--runs 5] [--skip-l14]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import numpy as np
import onnxruntime
import timm
import torch
from timing import median_seconds

import pe_jax
from pe_jax.checkpoints.orbax import save
from pe_jax.convert.graph_export import _onnx_session, export_graph
from pe_jax.modeling import build

PRESET, TIMM_NAME, SIZE = "PE-Core-B16-224", "vit_pe_core_base_patch16_224", 224


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def b16_table(tmp: str, batches: list[int], runs: int):
    peer = timm.create_model(TIMM_NAME, pretrained=False).eval()
    with torch.no_grad():  # every tensor random (timm zero-initialises biases and some norms)
        gen = torch.Generator().manual_seed(0)
        for name, p in peer.named_parameters():
            if name != "head.bias":  # the reference projection has no bias: it stays zero
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    sd = {k: v.numpy() for k, v in peer.state_dict().items()}
    model = pe_jax.VisionTransformer.from_config(PRESET, checkpoint=sd)
    save(model, f"{tmp}/b16")
    report = export_graph(f"{tmp}/b16", f"{tmp}/b16.onnx", format="onnx", verify=False)["towers"]["vision"]
    session = _onnx_session(f"{tmp}/b16.onnx")
    forward = jax.jit(lambda m, x: m(x))
    print(f"B/16 vision ONNX: {report['bytes'] / 2**20:.0f} MiB, exported in {report['export_seconds']:.1f} s; "
          f"onnxruntime vs pe_jax max abs diff {report['max_abs_diff']:.2g} (relative {report['max_rel_diff']:.2g})")
    print("| batch | timm img/s | pe_jax img/s | onnxruntime img/s | onnxruntime / timm | onnxruntime / pe_jax |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        with torch.inference_mode():
            t_timm = median_seconds(lambda xt=xt: peer(xt), runs)
            ref = peer(xt).numpy()
        t_jax = median_seconds(lambda x=x: forward(model, x).block_until_ready(), runs)
        t_ort = median_seconds(lambda x=x: session.run(None, {"images": x}), runs)
        diff = np.max(np.abs(session.run(None, {"images": x})[0] - ref)) / np.max(np.abs(ref))
        print(f"| {batch} | {batch / t_timm:.2f} | {batch / t_jax:.2f} | {batch / t_ort:.2f} | "
              f"{t_timm / t_ort:.2f}x | {t_jax / t_ort:.2f}x |  (onnxruntime vs timm: {diff:.1g} relative)")


def l14_cost(tmp: str):
    model = build(pe_jax.VisionTransformer, pe_jax.config.vision_config("PE-Core-L14-336"))
    save(model, f"{tmp}/l14")
    del model
    print("| PE-Core-L14-336 vision | export s (trace + write) | file MiB | check: max relative diff | total s |")
    print("|---|---|---|---|---|")
    for fmt, out in (("onnx", f"{tmp}/l14.onnx"), ("stablehlo", f"{tmp}/l14_hlo")):
        report = export_graph(f"{tmp}/l14", out, format=fmt, verify=False)
        t = report["towers"]["vision"]
        print(f"| {fmt} | {t['export_seconds']:.1f} | {t['bytes'] / 2**20:.0f} | {t['max_rel_diff']:.2g} | "
              f"{report['seconds']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-l14", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, torch {torch.__version__}, timm {timm.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        b16_table(tmp, args.batches, args.runs)
        if not args.skip_l14:
            l14_cost(tmp)


if __name__ == "__main__":
    main()
