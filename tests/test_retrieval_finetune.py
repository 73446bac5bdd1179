"""Retrieval finetuning (task "retrieval", the recipe "retrieval"): class-balanced batches that resume exactly,
metric losses in the resumable loop, leave-one-out mAP@10 on held-out classes as the eval and best metric."""

import dataclasses
import json

import numpy as np
import pytest

from pe_jax.data.sources import label_indices, list_labelled
from pe_jax.demo import shapes
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec, load_config
from pe_jax.train.evaluate import Evaluator
from pe_jax.train.loop import build_task, finetune
from pe_jax.train.pipeline import BalancedBatches
from pe_jax.train.sampler import ClassBalancedSampler

TIMINGS = ("examples_per_second", "compile_seconds")  # a run's timings: never equal between two runs

TINY = dict(vision_image_size=32, vision_patch_size=8, vision_width=32, vision_heads=2, vision_layers=2,
            vision_mlp_dim=64, vision_output_dim=32, text_width=32, text_heads=2, text_layers=1, text_mlp_dim=64,
            text_output_dim=32, text_context_length=16)


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """'Products' = colour x shape; training and held-out products disjoint; one corrupt training image."""
    root = tmp_path_factory.mktemp("products")
    rng = np.random.default_rng(0)
    combos = [(c, s) for c in list(shapes.COLOURS)[:4] for s in shapes.SHAPES[:4]]
    held_out = {combos[i] for i in (0, 5, 10, 15)}  # each colour and each shape also appears in training
    for colour, shape in combos:
        folder = root / ("heldout" if (colour, shape) in held_out else "train") / f"{colour}-{shape}"
        folder.mkdir(parents=True)
        for i in range(6):
            shapes.draw(colour, shape, ("small", "large")[i % 2], rng, 32).save(folder / f"{i}.png")
    (root / "train" / "red-square" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def _config(products, **kw) -> FinetuneConfig:
    return FinetuneConfig(task="retrieval", model=ModelSpec(preset="PE-Core-T16-384", overrides=TINY),
                          data=DataSpec(train=str(products / "train"), eval=str(products / "heldout"), workers=2),
                          optim=OptimSpec(learning_rate=2e-3, warmup_steps=2), classes_per_batch=6, batch_size=24,
                          log_every=1, **kw)


def test_balanced_batches_are_full_skip_bad_images_and_resume_exactly(products):
    items, classnames = list_labelled(str(products / "train"))
    labels = label_indices(items, classnames)

    def batches():
        return BalancedBatches(items, labels, ClassBalancedSampler(labels, 4, 3, seed=7), image_size=32,
                               augment=True, seed=7, workers=2)

    a = batches()
    first = [next(a) for _ in range(12)]  # > one epoch: every image, the broken one too, is drawn
    for b in first:
        assert b["image"].shape == (12, 32, 32, 3) and len(set(b["label"].tolist())) == 4
        assert (np.bincount(b["label"], minlength=len(classnames)) % 3 == 0).all()  # K = 3 of each class
    assert a.skipped >= 1 and "broken.png" in a.errors[-1]
    state = a.get_state()
    after = [next(a) for _ in range(3)]
    b = batches()
    b.set_state(state)
    for x, y in zip(after, [next(b) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert (b.skipped, b.errors) == (a.skipped, a.errors)  # the skip count resumes with the stream


@pytest.mark.slow
def test_a_tiny_run_raises_held_out_map_at_10_and_resumes_exactly(products, tmp_path):
    cfg = _config(products, steps=24, eval_every=12, checkpoint_every=12, best_metric="eval_mAP@10",
                  keep_checkpoints=1)
    task = build_task(cfg, num_classes=12)  # the run's own start: same seeds
    before = Evaluator(cfg, 32, None)(task)
    summary = finetune(cfg, str(tmp_path / "straight"), progress=False)
    assert summary["complete"]
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_mAP@10" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[0]["eval_images"] == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    assert evals[-1]["eval_mAP@10"] > before["eval_mAP@10"] + 0.05, (before, evals)
    assert evals[-1]["eval_loss"] < before["eval_loss"] - 0.05, (before, evals)  # the held-out loss falls
    assert summary["eval_mAP@10"] == evals[-1]["eval_mAP@10"] and summary["skipped_samples"] >= 1
    kept = sorted(int(p.name) for p in (tmp_path / "straight" / "checkpoints").iterdir() if p.name.isdigit())
    assert max(r["eval_mAP@10"] for r in evals) == {r["step"]: r["eval_mAP@10"] for r in evals}[kept[0]]

    # stopped after 7 steps (a checkpoint), resumed: the same batches, so the same losses
    assert not finetune(cfg, str(tmp_path / "resumed"), progress=False, stop_after=7)["complete"]
    assert finetune(cfg, str(tmp_path / "resumed"), progress=False)["complete"]
    resumed = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rs if "loss" in r]
    assert strip(resumed) == strip(rows)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["arcface", "multi_similarity"])
def test_other_losses_train(products, tmp_path, loss):
    cfg = _config(products, steps=3, metric_loss=loss, checkpoint_every=3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=None))  # no eval: a quicker run
    summary = finetune(cfg, str(tmp_path), progress=False)
    assert summary["complete"] and np.isfinite(summary["loss"])


def test_held_out_classes_must_be_new_and_batches_must_split(products, tmp_path):
    cfg = _config(products, steps=2)
    with pytest.raises(ValueError, match=r"data.eval shares 12 classes with data.train .*never trained on"):
        finetune(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=cfg.data.train)),
                 str(tmp_path / "shared"), progress=False)
    with pytest.raises(ValueError, match=r"the workdir .*/train/w is inside the input folder .*/train"):
        finetune(cfg, str(products / "train" / "w"), progress=False)  # it would become a class
    assert not (products / "train" / "w").exists()
    with pytest.raises(ValueError, match="classes_per_batch 5 must be >= 2 and divide batch_size 24"):
        dataclasses.replace(cfg, classes_per_batch=5)
    with pytest.raises(ValueError, match="unknown metric_loss 'triplet'"):
        dataclasses.replace(cfg, metric_loss="triplet")
    recipe = load_config("retrieval")[0]
    assert recipe.task == "retrieval" and recipe.best_metric == "eval_mAP@10" and recipe.batch_classes == 16


def test_generated_products_are_distinct_disjoint_and_reproducible(tmp_path):
    from pe_jax.demo import products

    info = products.generate(str(tmp_path / "a"), train_products=12, heldout_products=4, views=3, image_size=32)
    keys = [json.dumps(d, sort_keys=True) for d in info["designs"]["train"] + info["designs"]["heldout"]]
    assert len(set(keys)) == 16  # every product its own design, so training and held-out ones are disjoint
    items, classnames = list_labelled(info["heldout"])
    assert len(classnames) == 4 and len(items) == 12
    products.generate(str(tmp_path / "b"), train_products=12, heldout_products=4, views=3, image_size=32)
    for a, b in zip(sorted((tmp_path / "a").rglob("*.png")), sorted((tmp_path / "b").rglob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes()
    cfg, module = load_config("demo_retrieval")
    cfg = module.prepare(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, overrides={**cfg.model.overrides, "vision_image_size": 32})), str(tmp_path / "w"))
    assert cfg.data.train.endswith("data/train") and len(list_labelled(cfg.data.eval)[1]) == 80
