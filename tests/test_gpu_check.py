"""benchmarks/gpu_check.py --smoke: the prepared GPU check runs its every section at tiny sizes on CPU, so the
script stays runnable while no GPU is available."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

# the smoke run builds timm models beside pe_jax's
pytestmark = [pytest.mark.slow, pytest.mark.peers, pytest.mark.heavy]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One tower and timm eager only keep the smoke run short; G/14 has the odd cases (no class token, 192-wide pool).
TOWERS = ("G14",)


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    argv = [sys.executable, script, "--smoke", "--models", *TOWERS, "--no-torch-compile", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "gpu_check.json") as f:
        results = json.load(f)
    return results, (out / "gpu_check.md").read_text(), proc.stdout


def test_every_section_ran_without_errors(smoke):
    results, _, log = smoke
    assert results["smoke"] is True
    assert results["errors"] == [], log[-4000:]
    assert set(results["sections"]) == {"matmul_peak", "inference", "attention", "clip_forward_memory", "train_step"}
    records = [results["sections"]["matmul_peak"], *results["sections"]["inference"].values(),
               results["sections"]["clip_forward_memory"], results["sections"]["train_step"]]
    for rec in records:
        assert rec["status"] == "ok", rec
        # the GPU machine has none of these: nothing the check runs may import them
        assert rec["imported_unavailable"] == [], rec["imported_unavailable"]
    peak = results["sections"]["matmul_peak"]
    assert positive(peak["jax"]["tflops"]) and positive(peak["torch"]["tflops"])
    assert positive(peak["jax_bf16_tflops"])


def test_inference_and_attention_sections(smoke):
    results, _, _ = smoke
    inference, attention = results["sections"]["inference"], results["sections"]["attention"]
    assert set(inference) == set(attention) == set(TOWERS)
    for key in TOWERS:
        rec = inference[key]
        assert positive(rec["flops_per_image"])
        assert positive(rec["pe_jax"]["xla"]["images_per_s"]) and rec["pe_jax"]["xla"]["finite"]
        assert positive(rec["timm"]["eager"]["images_per_s"])
        # torch.compile is left out of the CPU smoke run (inductor alone took over a minute on 2 cores)
        assert positive(rec["ratio_vs_timm_eager"])
        assert positive(rec["mfu"]["pe_jax_xla"]) and positive(rec["mfu"]["timm_eager"])
        assert rec["pe_jax_best"]["backend"] == "xla"
        # the same tower on both sides: timm has one more vector, its projection bias
        assert rec["timm_init"]["params"] - rec["pe_jax_init"]["params"] == 64
        assert rec["timm_init"]["sdpa"] is True
        view = attention[key]
        assert positive(view["xla"]["images_per_s"])
        assert "skipped" in view["cudnn"] and "GPU" in view["cudnn"]["skipped"]  # no cuDNN on CPU
        assert set(view["auto_picks"].values()) == {"xla"} and view["auto"]["same_as"] == "xla"


@pytest.mark.parametrize("section", ["clip_forward_memory", "train_step"])
def test_memory_sections_match_the_planner(smoke, section):
    results, _, _ = smoke
    rec = results["sections"][section]
    run = rec["run"]
    assert positive(run["forward_ms" if section == "clip_forward_memory" else "step_ms"])
    assert "skipped" in run["measured"]  # CPU devices keep no allocator statistics
    assert "skipped" in rec["planner_device"]  # on CPU it would be planner_cpu again
    planned, compiled = rec["planner_cpu"]["peak_gib"], run["compiled_memory"]["peak_gib"]
    assert positive(planned) and positive(compiled)
    # The measured program is the planner's configuration: on the same compiler, the same memory plan.
    assert compiled == pytest.approx(planned, rel=0.02)
    assert rec["planner_cpu"]["train"] is (section == "train_step")
    if section == "train_step":
        assert run["finite"] and len(run["losses"]) == 2
        assert positive(rec["mfu"])


def test_markdown_table(smoke):
    _, md, _ = smoke
    for heading in ("## 1. bf16 inference", "## 2. pe_jax attention backends", "## 3-4. Device memory"):
        assert heading in md
    rows = [line for line in md.splitlines() if line.startswith("| PE-Core-")]
    assert len(rows) == len(TOWERS) * 2 + 2, md
    assert "## Errors" not in md
