"""pe-jax export --format onnx / stablehlo (pe_jax.convert.graph_export): onnxruntime and a deserialized
jax.export artifact against pe_jax, with random weights (every tensor) and a dynamic batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import onnxruntime  # noqa: F401  (a test extra; jax2onnx: pip install --no-deps jax2onnx==0.17.1)
import pytest
from flax import nnx

from pe_jax.checkpoints.orbax import save
from pe_jax.cli import main
from pe_jax.config import clip_config, vision_config
from pe_jax.convert.graph_export import _onnx_session, export_graph
from pe_jax.modeling import CLIP, VisionTransformer, build

TINY = dict(vision_width=64, vision_heads=2, vision_mlp_dim=128, vision_layers=1, vision_image_size=32,
            vision_output_dim=48, vision_attn_pooler_heads=2, text_width=64, text_heads=2, text_mlp_dim=128,
            text_layers=1, text_vocab_size=500, text_context_length=8, text_output_dim=48)


def _randomized(model, seed: int = 0):
    """Every parameter perturbed (norm scales, biases, embeddings, the class token included)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)  # numpy's: jax's eager normal compiles once per shape (12 s for G/14 blocks)
    leaves = [a + (0.05 * rng.standard_normal(a.shape, np.float32)).astype(a.dtype) for a in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def _checkpoint(path, model):
    save(_randomized(model), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("export") / "tiny", build(CLIP, clip_config("PE-Core-B16-224", **TINY)))


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    model = build(VisionTransformer, vision_config("PE-Core-B16-224", width=64, heads=2, mlp_dim=128, layers=1,
                                                   output_dim=48, attn_pooler_heads=2))
    return _checkpoint(tmp_path_factory.mktemp("export") / "vit", model)


def _param_bytes(module) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(nnx.state(module)))


def _rel(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.slow
def test_onnx_both_towers_from_the_cli(tiny_ckpt, tmp_path, capsys):
    from pe_jax.pretrained import load_model

    assert main(["export", tiny_ckpt, str(tmp_path / "m.onnx"), "--format", "onnx", "--no-verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("onnxruntime vs pe_jax at batch 1 and 3: max abs diff" in x for x in lines)
    model = load_model(tiny_ckpt)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    tokens = np.random.default_rng(1).integers(1, 500, (4, 8)).astype(np.int32)
    vision = _onnx_session(str(tmp_path / "m.vision.onnx")).run(None, {"images": images})[0]
    text = _onnx_session(str(tmp_path / "m.text.onnx")).run(None, {"tokens": tokens})[0]
    assert _rel(vision, np.asarray(model.encode_image(images))) < 1e-5
    assert _rel(text, np.asarray(model.encode_text(tokens))) < 1e-5
    # Each weight stored once: the graph itself is ~50 KB (text) and ~95 KB (vision); a second copy of the token
    # embedding (128 KB), the stacked blocks or the patch kernel (197 KB) would not fit in the allowance.
    for name, tower in (("vision", model.visual), ("text", model.text)):
        size = sum(os.path.getsize(p) for p in tmp_path.glob(f"m.{name}.onnx*"))
        assert _param_bytes(tower) < size < _param_bytes(tower) + 2**17, (name, size, _param_bytes(tower))


@pytest.mark.slow
def test_bfloat16_checkpoint_exports_float32(tmp_path):
    cfg = clip_config("PE-Core-B16-224", param_dtype="bfloat16", dtype="bfloat16", **TINY)
    ckpt = _checkpoint(tmp_path / "bf16", build(CLIP, cfg, seed=1))
    report = export_graph(ckpt, str(tmp_path / "v.onnx"), format="onnx", tower="vision", image_size=48)
    assert "weights stored in bfloat16, computed in bfloat16: exported in float32" in report["note"]
    vision = report["towers"]["vision"]
    assert vision["max_rel_diff"] < 1e-5 and vision["bytes"] == os.path.getsize(tmp_path / "v.onnx")
    session = _onnx_session(str(tmp_path / "v.onnx"))
    assert session.get_inputs()[0].shape[1:] == [48, 48, 3] and session.get_inputs()[0].type == "tensor(float)"


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--tower", "text"], "holds a vision tower alone: --tower text needs a PE-Core CLIP"),
    (["--format", "onnx", "--image-size", "33"], "--image-size 33 must be a positive multiple of the patch size 16"),
    (["--format", "stablehlo", "--dtype", "bfloat16"], "exports float32"),
    (["--format", "stablehlo", "--platforms", "cpu,gpu"], "unknown --platforms gpu; jax.export lowers for cpu, cuda"),
    (["--format", "timm", "--tower", "vision"], "--tower, --image-size and --platforms apply to --format onnx"),
])
def test_one_line_errors(argv, message, vit_ckpt, tmp_path, capsys):
    out = str(tmp_path / ("out.onnx" if "onnx" in argv else "out"))
    assert main(["export", vit_ckpt, out, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(out)


@pytest.mark.slow
def test_existing_outputs(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "notes.onnx").mkdir()
    (tmp_path / "v.onnx").write_bytes(b"old")
    base = ["export", tiny_ckpt, "--format", "onnx", "--tower", "vision", "--no-verify"]
    assert main([base[0], base[1], str(tmp_path / "notes.onnx"), *base[2:], "--force"]) == 2
    assert "is not a pe-jax onnx export; it is left as it is" in capsys.readouterr().err
    assert main([base[0], base[1], str(tmp_path / "v.onnx"), *base[2:]]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (tmp_path / "v.onnx").read_bytes() == b"old"
    assert main([base[0], base[1], str(tmp_path / "x.txt"), *base[2:]]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main([base[0], base[1], str(tmp_path / "v.onnx"), *base[2:], "--force"]) == 0
    assert (tmp_path / "v.onnx").stat().st_size > 1000
    assert [n for n in os.listdir(tmp_path) if n.endswith(".partial") or ".pe_jax-tmp-" in n] == []


_FRESH = """
import sys, jax, numpy as np
for name, path in (("vision", sys.argv[1]), ("text", sys.argv[2])):
    exp = jax.export.deserialize(bytearray(open(path, "rb").read()))
    np.save(sys.argv[3] + name + ".npy", np.asarray(exp.call(np.load(sys.argv[3] + name + "_in.npy"))))
"""


@pytest.mark.slow
def test_stablehlo_is_bit_identical_in_a_fresh_process(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "hlo"
    assert main(["export", tiny_ckpt, str(out), "--format", "stablehlo", "--image-size", "48"]) == 0
    assert "jax.export.deserialize vs pe_jax at batch 1 and 3" in capsys.readouterr().out
    specs = json.loads((out / "specs.json").read_text())["towers"]
    assert specs["vision"]["inputs"] == [{"name": "images", "shape": ["b", 48, 48, 3], "dtype": "float32"}]
    assert specs["text"]["inputs"] == [{"name": "tokens", "shape": ["b", 8], "dtype": "int32"}]
    inputs = {"vision": np.random.default_rng(0).uniform(-1, 1, (3, 48, 48, 3)).astype(np.float32),
              "text": np.random.default_rng(1).integers(1, 500, (5, 8)).astype(np.int32)}
    here = {}
    for name, x in inputs.items():
        np.save(tmp_path / f"{name}_in.npy", x)
        exp = jax.export.deserialize(bytearray((out / specs[name]["file"]).read_bytes()))
        here[name] = np.asarray(exp.call(x))
    # The same XLA flags (the compiler's settings, not state): a different optimization level fuses differently.
    subprocess.run([sys.executable, "-c", _FRESH, str(out / "vision.jax_export"), str(out / "text.jax_export"),
                    f"{tmp_path}/"], check=True, timeout=300)
    for name in inputs:
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), here[name])


def _onnx_matches(tmp_path, model, tower: str, image_size=None):
    ckpt = _checkpoint(tmp_path / "ckpt", model)
    report = export_graph(ckpt, str(tmp_path / "m.onnx"), format="onnx", tower=tower, image_size=image_size,
                          verify=False)
    result = report["towers"][tower]
    assert result["max_rel_diff"] < 1e-5, result  # over batch sizes 1 and 3 (the dynamic batch)
    return result


@pytest.mark.slow
@pytest.mark.heavy
def test_onnx_g14_shaped_two_layers_at_448(tmp_path):
    cfg = vision_config("PE-Core-G14-448", layers=2)  # width 1536, 16 heads of 96
    _onnx_matches(tmp_path, build(VisionTransformer, cfg), "vision")


@pytest.mark.slow
@pytest.mark.heavy
def test_onnx_b16_vision_tower_at_full_depth(tmp_path):
    """PE-Core-B16-224's vision tower, all 12 blocks at 224 px (~25 s and 2.2 GB peak RSS on 2 cores)."""
    _onnx_matches(tmp_path, build(VisionTransformer, vision_config("PE-Core-B16-224")), "vision")


@pytest.mark.slow
@pytest.mark.heavy
def test_onnx_b16_text_tower_at_full_depth(tmp_path):
    """PE-Core-B16-224's text tower (L14-336's: width 1024, 24 blocks, 354 M parameters), ~62 s and 6.3 GB peak RSS on
    2 cores, the model's random init included; the file holds its weights once."""
    model = build(CLIP, clip_config("PE-Core-B16-224", vision_layers=1))
    assert _onnx_matches(tmp_path, model, "text")["bytes"] < 1.01 * _param_bytes(model.text)
