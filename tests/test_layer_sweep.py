"""Retrieval from images over every (layer, pooling) pair in one pass: each row equals the metrics of a plain
numpy kNN over features pooled from `forward_intermediates`."""

import numpy as np
import pytest
from PIL import Image

import pe_jax
from pe_jax.evals import layer_sweep, retrieval
from pe_jax.preprocess import get_image_transform


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "q" / f"class_{c}").mkdir(parents=True)
        base = rng.integers(0, 255, (1, 1, 3))
        for i in range(6):  # a class shares a colour, with noise: some layers separate them better than others
            img = np.clip(base + rng.normal(0, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "q" / f"class_{c}" / f"{i}.png")
    (root / "q" / "class_0" / "broken.png").write_bytes(b"nope")
    model = pe_jax.CLIP.from_config("PE-Core-T16-384", seed=3, vision_layers=2, text_layers=1, vision_image_size=32)
    return model, root


def _numpy_metrics(features, labels, ks):
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, : len(f) - 1]
    return retrieval.metrics(neighbours, labels, labels, ks, exclude_self=True)


def test_every_pair_equals_numpy_on_forward_intermediates(setup):
    model, root = setup
    report = layer_sweep.sweep(model, str(root / "q"), "label", layers=[0, -1], poolings=["attn", "mean", "cls"],
                               ks=[1, 5], batch_size=4)
    pairs = [(r["layer"], r["pooling"]) for r in report["results"]]
    assert pairs == [(0, "mean"), (0, "cls"), (1, "attn"), (1, "mean"), (1, "cls")]
    assert len(report["failures"]) == 1 and report["best"]["mAP@10"] == max(r["mAP@10"] for r in report["results"])
    files = sorted(p for p in (root / "q").rglob("*.png") if p.name != "broken.png")
    x = np.stack([get_image_transform(32)(Image.open(f)) for f in files])
    labels = [f.parent.name.replace("_", " ") for f in files]
    tokens = model.visual.forward_intermediates(x, layer_indices=[0, 1], norm=True)
    pooled = {"mean": lambda t: t[:, 1:].mean(1), "cls": lambda t: t[:, 0], "attn": model.visual.pool}
    for row in report["results"]:
        expected = _numpy_metrics(np.asarray(pooled[row["pooling"]](tokens[row["layer"]])), labels, [1, 5, 10])
        for key in ("P@1", "P@5", "R@1", "R@5", "mAP@10", "Hit@1", "Hit@5", "Hit@10"):
            assert row[key] == pytest.approx(expected[key], abs=1e-6), (row["layer"], row["pooling"], key)
    text = layer_sweep.table(report, [1, 5])
    assert text.count("(best)") == 1 and len(text.splitlines()) == 2 + 5


def test_bad_sweeps(setup):
    model, root = setup
    with pytest.raises(ValueError, match="out of range"):
        layer_sweep.sweep_pairs(model, [5], ["mean"])
    with pytest.raises(ValueError, match="unknown pooling"):
        layer_sweep.sweep_pairs(model, [0], ["max"])
    with pytest.raises(ValueError, match="no valid"):
        layer_sweep.sweep_pairs(model, [0], ["attn"])


def test_eval_retrieval_from_images_cli(setup, tmp_path, capsys):
    import json

    from pe_jax.cli import main

    model, root = setup
    pe_jax.save(model, tmp_path / "ckpt", preset="PE-Core-T16-384")
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path / "ckpt"), "--queries", str(root / "q"),
                 "--labels", "label", "--layers", "0,-1", "--pooling", "attn,mean", "-k", "1,5",
                 "--output", str(tmp_path / "sweep.json")]) == 0
    out = capsys.readouterr().out
    assert "| layer | pooling | P@1 | P@5 | R@1 | R@5 | mAP@10 |" in out and "best: layer" in out
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["layer"], r["pooling"]) for r in report["results"]] == [(0, "mean"), (1, "attn"), (1, "mean")]
    assert main(["eval", "retrieval", "--queries", str(root / "q"), "--labels", "label"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
