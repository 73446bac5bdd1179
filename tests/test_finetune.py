"""pe-jax finetune: configs and overrides, data pipelines, resume after SIGKILL, sharded runs, bad inputs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

import pe_jax
from pe_jax.data.sources import label_indices, list_labelled, list_pairs
from pe_jax.demo import open_clip_check, shapes
from pe_jax.preprocess import get_text_tokenizer
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec, apply_overrides, load_config
from pe_jax.train.loop import build_task, finetune
from pe_jax.train.pipeline import Batches

TIMINGS = ("examples_per_second", "compile_seconds")  # a run's timings: never equal between two runs

TINY = dict(vision_image_size=32, vision_patch_size=8, vision_width=32, vision_heads=2, vision_layers=2,
            vision_mlp_dim=64, vision_output_dim=32, text_width=32, text_heads=2, text_layers=1, text_mlp_dim=64,
            text_output_dim=32, text_context_length=16)

CONFIG_FILE = """
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec

def get_config():
    return FinetuneConfig(
        task="contrastive", model=ModelSpec(preset="PE-Core-T16-384", overrides={tiny!r}),
        data=DataSpec(train={train!r}, workers=2), optim=OptimSpec(learning_rate=1e-3, warmup_steps=2),
        batch_size=8, steps={steps}, log_every=1, checkpoint_every={every}, keep_checkpoints=2)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Captioned shapes as JSONL, CSV and two tar shards; labelled shapes as class folders; bad files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = []
    for i in range(40):
        colour, shape = list(shapes.COLOURS)[i % 3], shapes.SHAPES[i % 4]
        shapes.draw(colour, shape, "large", rng, 32).save(root / "img" / f"{i:03d}.png")
        rows.append({"image": f"img/{i:03d}.png", "caption": f"a {colour} {shape}"})
        label_dir = root / "labelled" / colour
        label_dir.mkdir(parents=True, exist_ok=True)
        shapes.draw(colour, shape, "large", rng, 32).save(label_dir / f"{i:03d}.png")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs.csv").write_text("path,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    for s in range(2):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for r in rows[s * 20:(s + 1) * 20]:
                key = os.path.basename(r["image"])[:-4]
                tar.add(root / r["image"], arcname=f"{key}.png")
                caption = root / f"{key}.txt"
                caption.write_text(r["caption"])
                tar.add(caption, arcname=f"{key}.txt")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "with_bad.jsonl").write_text((root / "pairs.jsonl").read_text()
                                         + json.dumps({"image": "img/broken.png", "caption": "x"}) + "\n"
                                         + json.dumps({"image": "img/missing.png", "caption": "y"}) + "\n")
    (root / "all_bad.jsonl").write_text(json.dumps({"image": "img/broken.png", "caption": "x"}) + "\n")
    (root / "empty.jsonl").write_text("")
    return root


def _tiny_config(train, **kw) -> FinetuneConfig:
    return FinetuneConfig(task="contrastive", model=ModelSpec(preset="PE-Core-T16-384", overrides=TINY),
                          data=DataSpec(train=str(train), workers=2),
                          optim=OptimSpec(learning_rate=1e-3, warmup_steps=2), batch_size=8, log_every=1, **kw)


# ------------------------------------------------------------------------------------------------ configs


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(FinetuneConfig(), ["optim.learning_rate=3e-4", "steps=7", "model.overrides.vision_layers=2",
                                             "data.eval_templates=a {}.", "mesh=fsdp=8", "optim.layer_decay=None",
                                             "data.augment=True"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.steps == 7 and cfg.model.overrides == {"vision_layers": 2}
    assert cfg.data.eval_templates == ("a {}.",) and cfg.mesh == "fsdp=8" and cfg.data.augment is True
    with pytest.raises(ValueError, match="unknown config key 'optim.lr'.*learning_rate"):
        apply_overrides(cfg, ["optim.lr=1"])
    with pytest.raises(ValueError, match="'steps' expects int"):
        apply_overrides(cfg, ["steps=many"])
    with pytest.raises(ValueError, match="multiple of grad_accum_steps"):
        apply_overrides(cfg, ["grad_accum_steps=3"])


def test_shipped_recipes_load():
    for name in ("clip_contrastive", "classification", "linear_probe", "demo_shapes"):
        cfg, _ = load_config(name)
        assert isinstance(cfg, FinetuneConfig)
    assert load_config("configs/classification.py")[0].optim.layer_decay == 0.75
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config("nope")


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("source", ["pairs.jsonl", "pairs.csv", "shard-{0..1}.tar"])
def test_pair_sources_agree(data, source):
    records = list_pairs(str(data / source))
    assert len(records) == 40
    tok = get_text_tokenizer(16)
    batch = next(Batches(records, 8, image_size=32, tokenizer=tok, seed=3, workers=2))
    reference = next(Batches(list_pairs(str(data / "pairs.jsonl")), 8, image_size=32, tokenizer=tok, seed=3,
                             workers=2))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["tokens"].shape == (8, 16)
    np.testing.assert_array_equal(batch["image"], reference["image"])
    np.testing.assert_array_equal(batch["tokens"], reference["tokens"])


def test_batches_resume_exactly_and_epochs_reshuffle(data):
    records = list_pairs(str(data / "pairs.jsonl"))
    make = lambda: Batches(records, 8, image_size=32, tokenizer=get_text_tokenizer(16), augment=True, seed=1)
    a = make()
    for _ in range(3):
        next(a)
    state = a.get_state()
    expected = [next(a) for _ in range(4)]  # crosses the epoch boundary at 40 records
    b = make()
    b.set_state(state)
    for want in expected:
        got = next(b)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_hosts_split_the_data(data):
    records = list_pairs(str(data / "pairs.jsonl"))
    parts = [Batches(records, 4, image_size=32, process_index=i, process_count=3) for i in range(3)]
    assert sum(p.num_records for p in parts) == 40


def test_bad_samples_are_skipped_and_counted(data):
    batches = Batches(list_pairs(str(data / "with_bad.jsonl")), 7, image_size=32, tokenizer=get_text_tokenizer(16))
    for _ in range(12):  # 84 samples: two passes over 42 records
        assert next(batches)["image"].shape[0] == 7
    assert batches.skipped == 4 and any("missing.png" in e for e in batches.errors)
    assert sorted(os.path.basename(f["source"]) for f in batches.failed) == ["broken.png"] * 2 + ["missing.png"] * 2
    with pytest.raises(ValueError, match="none of the 1 training samples could be decoded"):
        next(Batches(list_pairs(str(data / "all_bad.jsonl")), 2, image_size=32, tokenizer=get_text_tokenizer(16)))
    with pytest.raises(ValueError, match="empty"):
        Batches(list_pairs(str(data / "empty.jsonl")), 2, image_size=32)


def test_decode_failures_are_recorded_once_across_epochs_and_a_resume(data, tmp_path):
    """Samples the listing accepts but that fail to decode (a broken png, a missing file) go to failures.jsonl
    once each, though they fail every epoch and again after a resume; the listing's rows stay first."""
    from pe_jax.train.workdir import append_failures, record_failures

    batches = Batches(list_pairs(str(data / "with_bad.jsonl")), 7, image_size=32, tokenizer=get_text_tokenizer(16))
    listed = [{"key": "zzz", "source": "shard.tar::zzz.txt", "error": "no image member"}]
    seen = record_failures(str(tmp_path), "with_bad.jsonl", listed, 42)
    for _ in range(12):  # two passes: each bad sample fails twice
        next(batches)
        append_failures(str(tmp_path), batches.failed, seen)
        batches.failed.clear()
    rows = lambda: [json.loads(line) for line in open(tmp_path / "failures.jsonl")]
    assert rows()[0] == listed[0] and len(rows()) == 3 and len(seen) == 3  # in the order they failed
    decoded = {os.path.basename(r["source"]): r for r in rows()[1:]}
    assert sorted(decoded) == ["broken.png", "missing.png"] and decoded["missing.png"]["key"] == "img/missing.png"
    assert decoded["missing.png"]["error"].startswith(str(data / "img" / "missing.png") + ": ")
    before = rows()
    seen = record_failures(str(tmp_path), "with_bad.jsonl", listed, 42, resume=True)  # kept, not doubled
    assert rows() == before and len(seen) == 3
    assert append_failures(str(tmp_path), before[1:], seen) == 0 and rows() == before
    assert record_failures(str(tmp_path), "with_bad.jsonl", listed, 42) == {"shard.tar::zzz.txt"}  # a fresh run
    assert rows() == before[:1]


def _shard_with_failures(data, folder, undecodable: bool = False):
    """A tar shard of 9 samples, 2 of which cannot be pairs: 003 (an image without a caption), zzz (a caption
    without an image); `undecodable`: a 10th, `bad`, a pair whose image fails only when training decodes it."""
    shard = folder / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            tar.add(data / "img" / f"{i:03d}.png", arcname=f"{i:03d}.png")
            if i != 3:
                tar.add(data / f"{i:03d}.txt", arcname=f"{i:03d}.txt")
        tar.add(data / "008.txt", arcname="zzz.txt")
        if undecodable:
            tar.add(data / "img" / "broken.png", arcname="bad.png")
            tar.add(data / "008.txt", arcname="bad.txt")
    return shard


def test_samples_the_listing_leaves_out_are_recorded_and_said(data, tmp_path, capsys):
    """Tar samples that cannot be pairs (no caption, no image) were dropped without a trace; now each is a failure
    row in WORKDIR/failures.jsonl (key, source, error: the embedding job's rows), said in one line (a run's
    summary counts them: tests/test_finetune.py::test_a_rerun_with_another_config_never_reports_the_old_model).
    A failures.jsonl that is not pe-jax's is refused, never replaced."""
    from pe_jax.train.pipeline import training_items
    from pe_jax.train.workdir import record_failures

    shard = _shard_with_failures(data, tmp_path)
    items, labels, classnames, failures = training_items(_tiny_config(shard, steps=2))
    assert len(items) == 7 and labels is None and classnames is None
    assert [(f["key"], f["source"]) for f in failures] == [("003", f"{shard}::003.png"), ("zzz", f"{shard}::zzz.txt")]
    assert "no caption" in failures[0]["error"] and "no image member" in failures[1]["error"]
    assert list_pairs(str(shard)) == items  # without a list to record them in: left out as before

    work = tmp_path / "w"
    work.mkdir()
    record_failures(str(work), str(shard), failures, len(items))
    assert capsys.readouterr().err.splitlines() == [
        f"pe-jax finetune: 2 of the 9 training samples of {shard} cannot be used and are left out (the first: "
        f"{failures[0]['error']}); they are listed in {work / 'failures.jsonl'}"]
    assert [json.loads(line) for line in open(work / "failures.jsonl")] == failures
    record_failures(str(work), str(shard), [], 9)  # a run without failures leaves an empty file, says nothing
    assert (work / "failures.jsonl").read_text() == "" and capsys.readouterr().err == ""
    (work / "failures.jsonl").write_text("my notes\n")
    with pytest.raises(ValueError, match=r"failures.jsonl, line 1: not a pe-jax failure row"):
        record_failures(str(work), str(shard), failures, 7)
    assert (work / "failures.jsonl").read_text() == "my notes\n"
    with tarfile.open(tmp_path / "none.tar", "w") as tar:  # every sample a failure
        tar.add(data / "008.txt", arcname="zzz.txt")
    with pytest.raises(ValueError, match=r"the training dataset is empty: none of its 1 samples can be used "
                                         r"\(the first: no image member"):
        training_items(_tiny_config(tmp_path / "none.tar", steps=2))


def test_long_captions_are_truncated_like_the_reference(data, tmp_path):
    long = " ".join(["word"] * 100)
    (tmp_path / "long.jsonl").write_text(json.dumps({"image": str(data / "img" / "000.png"), "caption": long}) + "\n")
    tokens = next(Batches(list_pairs(str(tmp_path / "long.jsonl")), 2, image_size=32,
                          tokenizer=get_text_tokenizer(16)))["tokens"]
    assert tokens.shape == (2, 16) and (tokens[:, -1] == 49407).all()


def test_labelled_folder(data):
    items, classnames = list_labelled(str(data / "labelled"))
    assert classnames == sorted(list(shapes.COLOURS)[:3]) and len(items) == 40
    labels = label_indices(items, classnames)
    assert [classnames[y] for y in labels] == [it.label for it in items]
    batch = next(Batches(items, 8, labels=labels, image_size=32))
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------ jobs


@pytest.mark.slow
def test_classification_with_layer_decay_mlp_head_and_intermediate_layer(data, tmp_path):
    cfg = FinetuneConfig(task="classification", model=ModelSpec(preset="PE-Core-T16-384", overrides={
        k[len("vision_"):]: v for k, v in TINY.items() if k.startswith("vision_")}),
        data=DataSpec(train=str(data / "labelled"), eval=str(data / "labelled"), workers=2),
        optim=OptimSpec(learning_rate=3e-3, layer_decay=0.7), head="mlp", layer_idx=-2, batch_size=8, steps=12,
        log_every=1, checkpoint_every=6, async_checkpoints=False, best_metric="eval_top1", keep_checkpoints=1)
    summary = finetune(cfg, str(tmp_path), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    # rates exclude compilation: the first step's time is reported apart, and the rate begins after it
    trained = [r for r in rows if "loss" in r]
    assert trained[0]["examples_per_second"] is None and trained[0]["compile_seconds"] > 0
    assert all(r["examples_per_second"] > 0 for r in trained[1:])
    assert summary["eval_top1"] > 0.5  # colours are easy: 3 classes, chance 1/3
    evals = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in evals] == [6, 12]  # every checkpoint is evaluated when keeping the best
    kept = [int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]
    assert len(kept) == 1 and {r["step"]: r["eval_top1"] for r in evals}[kept[0]] == max(r["eval_top1"] for r in evals)
    assert os.path.exists(tmp_path / "model" / "head.npz") and os.path.exists(tmp_path / "model" / "classes.json")
    assert isinstance(pe_jax.load_model(str(tmp_path / "model")), pe_jax.VisionTransformer)


@pytest.mark.slow
def test_sharded_run_matches_single_device(data, straight_run, tmp_path):
    # Resuming is covered by the SIGKILL test, restoring across meshes by test_sharding. Both runs start from
    # the straight run's weights (a checkpoint, loaded directly sharded), which spares two random-init compiles.
    start = ModelSpec(preset="PE-Core-T16-384", checkpoint=str(straight_run[1] / "model"), overrides=TINY)
    cfg = _tiny_config(data / "pairs.jsonl", steps=2, checkpoint_every=2, mesh="data=2,fsdp=2,model=2",
                       strategy="fsdp_tp", grad_accum_steps=2)
    assert finetune(dataclasses.replace(cfg, model=start), str(tmp_path / "sharded"), progress=False)["complete"]
    cfg = _tiny_config(data / "pairs.jsonl", steps=2, checkpoint_every=2, grad_accum_steps=2)
    # A pe_jax checkpoint's own config is the model: the recipe's preset (here another one) does not apply.
    other_preset = ModelSpec(preset="PE-Core-B16-224", checkpoint=start.checkpoint)
    finetune(dataclasses.replace(cfg, model=other_preset), str(tmp_path / "single"), progress=False)
    with pytest.raises(ValueError, match=r"would change the architecture .*vision.layers: 2 there, 1 asked"):
        build_task(dataclasses.replace(cfg, model=dataclasses.replace(start, overrides={"vision_layers": 1})))
    rows = lambda d: [r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))]
    np.testing.assert_allclose(rows("sharded"), rows("single"), rtol=2e-5)
    a = pe_jax.load_model(str(tmp_path / "sharded" / "model"))
    b = pe_jax.load_model(str(tmp_path / "single" / "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        # Adam divides near-zero gradients by their own size: rounding shows up to a fraction of one lr step.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=5e-4)


def _finetune_cli(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "pe_jax.cli", "finetune", *map(str, args), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """A 20-step run of `pe-jax finetune` that nothing interrupted: (config file, workdir)."""
    root = tmp_path_factory.mktemp("finetune")
    config = root / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=20, every=5))
    out, err = _finetune_cli("--config", config, "--workdir", root / "straight").communicate(timeout=300)
    assert "weights in" in out, err
    return config, root / "straight"


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(straight_run, tmp_path):
    config, straight = straight_run
    killed = tmp_path / "killed"
    # The killed run compiles its programs afresh (its losses are compared with the separately compiled
    # straight run's) and leaves them in a compilation cache, which spares the resumed run recompiling them.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))
    proc = _finetune_cli("--config", config, "--workdir", killed, env=env)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "10").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    out, err = _finetune_cli("--config", config, "--workdir", killed, env=env).communicate(timeout=300)
    assert "weights in" in out, err

    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                        for line in open(run / "metrics.jsonl")]
    assert len(rows(straight)) == 20 and rows(killed) == rows(straight)  # same losses, bitwise, each step once
    a, b = pe_jax.load_model(str(straight / "model")), pe_jax.load_model(str(killed / "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_bad_jobs_fail_clearly_and_keep_checkpoints(data, straight_run, tmp_path, capsys):
    from pe_jax.cli import main

    config, work = straight_run
    before = sorted(os.listdir(work / "checkpoints"))
    cases = {
        ("--set", "optim.learning_rate=0.5"): "holds checkpoints of another run",
        ("--set", "optim.lr=1"): "unknown config key 'optim.lr'",
        ("--set", f"data.train={data / 'empty.jsonl'}", "--workdir", tmp_path / "w2"): "empty",
        ("--set", f"data.train={data / 'all_bad.jsonl'}", "--workdir", tmp_path / "w3"): "could be decoded",
        ("--set", f"data.train={data / 'nope.jsonl'}", "--workdir", tmp_path / "w4"): "input not found",
        ("--set", "steps=0", "--workdir", tmp_path / "w5"): "steps and batch_size must be >= 1",
        ("--set", "optim.learning_rate=-1", "--workdir", tmp_path / "w6"): "optim.learning_rate must be > 0",
        ("--set", "keep_checkpoints=0", "--workdir", tmp_path / "w7"): "keep_checkpoints must be >= 1",
        ("--set", "optim.warmup_steps=100", "--workdir", tmp_path / "w8"): "warmup_steps 100 exceeds steps",
        ("--set", "data.eval_templates=('no placeholder',)", "--workdir", tmp_path / "w9"): "placeholder",
    }
    for extra, message in cases.items():
        args = ["finetune", "--config", str(config), *map(str, extra), "--quiet"]
        args += [] if "--workdir" in extra else ["--workdir", str(work)]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert sorted(os.listdir(work / "checkpoints")) == before


@pytest.mark.slow
@pytest.mark.peers
def test_shapes_demo_learns_and_open_clip_agrees(tmp_path, capsys, monkeypatch):
    """The demo command on a shorter budget: loss falls, zero-shot accuracy on never-seen colour x shape pairs is
    far above chance; without torch it still ends well (the open_clip check says it was skipped); a rerun over
    the finished workdir prints the finished run's figures; the weights in open_clip naming give the same
    predictions in open_clip."""
    from pe_jax.cli import main

    shapes.generate(str(tmp_path / "data"), train_size=1500, eval_per_class=6)  # prepare() finds it there
    demo = ["demo", "--workdir", str(tmp_path), "--quiet", "--set", "steps=30", "--set", "batch_size=64",
            "--set", "eval_every=0", "--set", "log_every=5", "--set", "optim.warmup_steps=5"]
    monkeypatch.setattr(open_clip_check, "available", lambda: False)  # as after `pip install -e .` alone
    assert main(demo) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "open_clip check: skipped" in out[-2] and out[-1].startswith("zero-shot top-1: "), out
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert losses[-1] < losses[0] - 1.0, losses
    # 30 steps reach ~34% top-1 on this data (chance 6.25%, asserted >= 18.75%) and a loss 5.3 -> 3.5.
    assert float(out[-1].split()[-1].rstrip("%")) / 100 >= 3 / len(shapes.held_out()), out

    assert main(demo) == 0  # the finished run: nothing trains, its figures are printed
    again = capsys.readouterr().out.strip().splitlines()
    assert again[-1] == out[-1] and "nan" not in again[-3] and f"loss {losses[-1]:.4f}" in again[-3], again
    agree, total = open_clip_check.open_clip_agreement(str(tmp_path))
    assert agree == total == 6 * len(shapes.held_out())


@pytest.mark.slow
@pytest.mark.multihost
def test_two_process_finetune_writes_one_loadable_model(data, tmp_path):
    """Two jax.distributed processes (4 fake devices each) train one model over a data=8 mesh: the final
    model/ holds pe_jax.json and loads (a finished rerun is the demo test's, in one process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "mp.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=2, every=2)
                      .replace("keep_checkpoints=2)", 'keep_checkpoints=2, mesh="data=8")'))

    def run():
        flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
        procs = [_finetune_cli("--config", config, "--workdir", tmp_path / "work", env=dict(
            os.environ, XLA_FLAGS=flags, JAX_NUM_PROCESSES="2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_PROCESS_ID=str(i))) for i in range(2)]
        results = [p.communicate(timeout=400) for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        return results

    run()
    model = pe_jax.load_model(str(tmp_path / "work" / "model"))
    assert isinstance(model, pe_jax.CLIP) and model.config.vision.width == TINY["vision_width"]
    written = set(os.listdir(tmp_path / "work"))
    assert {"checkpoints", "config.json", "weights.json", "metrics.jsonl", "model"} <= written
    assert not [n for n in os.listdir(tmp_path / "work") if "tmp" in n]


# ------------------------------------------------------------------------------------------------ job faults


def test_recipe_errors_and_a_busy_workdir_are_one_line(data, tmp_path, capsys):
    """A recipe that raises or does not parse names its file (and line); a workdir another run holds is refused,
    naming the holder."""
    from pe_jax.cli import main
    from pe_jax.storage.locks import folder_lock

    cases = {"broken.py": ("def get_config(:\n", "broken.py, line 1: the config file failed to load: SyntaxError"),
             "raises.py": ("x = 1\ndef get_config():\n    return 1 / 0\n",
                           "raises.py, line 3: get_config() raised: ZeroDivisionError: division by zero"),
             "import_fails.py": ("import no_such_module_here\n", "ModuleNotFoundError")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="^" + str(tmp_path / name)):
            load_config(str(tmp_path / name))
        assert main(["finetune", "--config", str(tmp_path / name), "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=2, every=2))
    (tmp_path / "busy").mkdir()
    with folder_lock(str(tmp_path / "busy"), "finetuning run"):
        assert main(["finetune", "--config", str(config), "--workdir", str(tmp_path / "busy"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"in use by another finetuning run (pid {os.getpid()} on " in err and "Traceback" not in err
    assert not (tmp_path / "busy" / "checkpoints").exists()


@pytest.mark.slow
def test_failing_async_checkpoint_is_one_line_and_leaves_no_temporary(data, tmp_path, capfd, monkeypatch):
    """A full disk under Orbax's async save (tensorstore's open raising ENOSPC in Orbax's threads): one line
    naming the checkpoint, no traceback from the threads, no `N.orbax-checkpoint-tmp*` left; then the same
    command resumes like any killed run (tests/test_finetune.py::test_resume_after_sigkill_is_bitwise_identical)."""
    import errno

    import tensorstore

    from pe_jax.cli import main

    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=4, every=2))

    async def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorstore, "open", full_disk)
    work = tmp_path / "work"
    assert main(["finetune", "--config", str(config), "--workdir", str(work), "--quiet"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot write the checkpoint" in err and str(work / "checkpoints") in err and "No space left" in err
    assert not list((work / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_workdir_files_are_never_written_through_links(tmp_path):
    """config.json's temporary was a fixed `config.json.tmp`: a link planted there made the run overwrite the
    link's target. Now each write goes through a new, exclusively created temporary."""
    from pe_jax.train.workdir import truncate_metrics, write_json

    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    for name in ("config.json.tmp", "metrics.jsonl.tmp"):
        os.symlink(target, tmp_path / name)
    write_json(str(tmp_path / "config.json"), {"a": 1})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    truncate_metrics(str(tmp_path / "metrics.jsonl"), 1)
    assert target.read_text() == "the user's file"
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_workdir_lock_or_record_planted_as_a_link_is_never_followed(data, tmp_path, capsys):
    """WORKDIR/job.lock as a symbolic link to the user's file: the run stops in one line naming it, before
    anything is written, the target untouched (as embed's OUT/job.lock); config.json and weights.json as links
    are replaced by the write, never written through."""
    from pe_jax.cli import main
    from pe_jax.train.workdir import prepare_workdir

    target = tmp_path / "precious.txt"
    target.write_text("the user's file")
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=2, every=2))
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(target, work / "job.lock")
    assert main(["finetune", "--config", str(config), "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot use the lock file {work / 'job.lock'}: it is a symbolic link (pe-jax never" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert target.read_text() == "the user's file" and sorted(os.listdir(work)) == ["job.lock"]
    for name in ("config.json", "weights.json"):
        os.symlink(target, work / name)
    prepare_workdir(_tiny_config(data / "pairs.jsonl", steps=2), str(work))
    assert target.read_text() == "the user's file"
    assert not (work / "config.json").is_symlink() and json.loads((work / "config.json").read_text())["steps"] == 2
    assert not (work / "weights.json").is_symlink() and "content_hash" in (work / "weights.json").read_text()


def test_a_model_folder_pe_jax_did_not_write_for_this_run_is_never_removed(data, tmp_path, capsys):
    """A project folder used as workdir keeps its own model/ and model.tmp/ (they were taken for a crashed save
    and removed); a model/ of another config (checkpoints/ deleted, config changed) is refused, not reported as
    this run's; this run's own model/ is recognised."""
    from pe_jax.cli import main
    from pe_jax.train.config import config_to_dict
    from pe_jax.train.workdir import final_model

    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=2, every=2))
    work = tmp_path / "project"
    for folder in ("model", "model.tmp"):
        (work / folder).mkdir(parents=True)
        (work / folder / "notes.txt").write_text("the user's")
    assert main(["finetune", "--config", str(config), "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{work / 'model'} exists and is not this run's model (no pe_jax.json" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert [(work / f / "notes.txt").read_text() for f in ("model", "model.tmp")] == ["the user's"] * 2
    assert not (work / "checkpoints").exists()

    cfg = _tiny_config(data / "pairs.jsonl", steps=2)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=0.5))
    (work / "model" / "pe_jax.json").write_text(json.dumps({"finetune": config_to_dict(other)}))
    with pytest.raises(ValueError, match=r"not this run's model \(trained with other settings: "
                                         r"optim.learning_rate: 0.5 there, 0.001 now\)"):
        final_model(cfg, str(work))
    (work / "model" / "pe_jax.json").write_text(json.dumps({"finetune": config_to_dict(cfg)}))
    assert final_model(cfg, str(work)) and not final_model(cfg, str(tmp_path / "empty"))


@pytest.mark.slow
def test_a_rerun_with_another_config_never_reports_the_old_model(data, straight_run, tmp_path, capsys):
    """A finished run's checkpoints/ deleted, the same workdir rerun with another config: the run trained and
    then reported the previous model/ as its result. Now it stops before training, in one line naming model/
    (kept as it was: pe-jax never replaces a model it did not write for this run); with model/ moved away the
    same command trains and leaves the new run's model. The new data's left-out samples are said, recorded and
    counted, a sample that fails only when decoded once although it fails every epoch; a link planted at the
    model's temporary name is removed, its target untouched."""
    import shutil

    from pe_jax.cli import main

    config, straight = straight_run
    work = tmp_path / "work"
    shutil.copytree(straight, work, ignore=lambda folder, names: ["checkpoints"] if folder == str(straight) else [])
    snapshot = lambda folder: {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    old = snapshot(work / "model")
    shard = _shard_with_failures(data, tmp_path, undecodable=True)
    rerun = ["--config", config, "--workdir", work, "--set", f"data.train={shard}"]
    assert main(["finetune", *map(str, rerun), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{work / 'model'} exists and is not this run's model (trained with other settings: data.train: " in err
    assert f"{data / 'pairs.jsonl'}' there, '{shard}' now)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(work / "model") == old and not (work / "checkpoints").exists()

    (work / "model").rename(work / "model.old")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    os.symlink(tmp_path / "mine", work / "model.pe_jax-tmp-shared")
    # other data alone, and a command like the straight run's: its programs, in the tests' compilation cache
    proc = _finetune_cli(*rerun)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # the listing's two and `bad`, which fails at each of the ~20 epochs' decode: each recorded once
    assert out.strip().endswith(f"3 left out (see failures.jsonl); weights in {work / 'model'}"), out
    assert [line for line in err.splitlines() if "left out" in line] == [
        f"pe-jax finetune: 2 of the 10 training samples of {shard} cannot be used and are left out (the first: "
        f"{shard}::003.png: no caption (no .txt member in sample '003')); they are listed in {work / 'failures.jsonl'}"]
    finetune_config = json.loads((work / "model" / "pe_jax.json").read_text())["finetune"]
    assert finetune_config["data"]["train"] == str(shard)
    assert snapshot(work / "model.old") == old and snapshot(work / "model") != old
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not os.path.lexists(work / "model.pe_jax-tmp-shared")
    assert [json.loads(line)["step"] for line in open(work / "metrics.jsonl")] == list(range(1, 21))
    assert [json.loads(line)["key"] for line in open(work / "failures.jsonl")] == ["003", "zzz", "bad"]


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_saves_nothing(data, tmp_path, monkeypatch):
    """A step that turns the loss and weights into NaN stops the run with one clear error at that step: no
    checkpoint of the NaN state, no model."""
    import jax.numpy as jnp

    from pe_jax.train import step as step_module

    real = step_module.make_train_step

    def poisoned(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, batch):
            state, metrics = fn(state, batch)
            nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
            return jax.tree.map(nan, state), {**metrics, "loss": metrics["loss"] * jnp.nan}
        return step

    monkeypatch.setattr(step_module, "make_train_step", poisoned)
    cfg = _tiny_config(data / "pairs.jsonl", steps=4, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"^the training loss is nan at step 1: the run stops and saves nothing"):
        finetune(cfg, str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w" / "model").exists()
    assert not [n for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()]


@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_the_newest_intact_step(straight_run, tmp_path):
    """Each saved step carries checksums: a step whose bytes were flipped is set aside (kept) and said in one
    line; the run resumes from the older intact step and ends with the uninterrupted run's weights. With no
    intact step left the run stops in one line."""
    import shutil

    from pe_jax.train.checkpointing import STEP_CHECKSUMS, step_problem

    config, straight = straight_run
    work = tmp_path / "work"
    shutil.copytree(straight, work)
    shutil.rmtree(work / "model")
    steps = sorted(int(n) for n in os.listdir(work / "checkpoints") if n.isdigit())
    assert steps == [15, 20] and all((work / "checkpoints" / str(s) / STEP_CHECKSUMS).is_file() for s in steps)
    files = [p for p in (work / "checkpoints" / "20").rglob("*") if p.is_file() and p.name != STEP_CHECKSUMS]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "does not match its checksum" in step_problem(str(work / "checkpoints"), 20)
    proc = _finetune_cli("--config", config, "--workdir", work)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "weights in" in out, err
    said = [line for line in err.splitlines() if "is damaged" in line]
    assert len(said) == 1 and said[0].endswith("it is kept as 20.pe_jax-damaged; resuming from step 15"), err
    assert (work / "checkpoints" / "20.pe_jax-damaged").is_dir()
    a, b = pe_jax.load_model(str(straight / "model")), pe_jax.load_model(str(work / "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # one step left, truncated and without checksums (killed before they were written): one line, no traceback
    lone = tmp_path / "lone"
    shutil.copytree(straight, lone)
    shutil.rmtree(lone / "model")
    shutil.rmtree(lone / "checkpoints" / "15")
    (lone / "checkpoints" / "20" / STEP_CHECKSUMS).unlink()
    victim = lone / victim.relative_to(work)
    victim.write_bytes(victim.read_bytes()[:10])
    proc = _finetune_cli("--config", config, "--workdir", lone)
    _, err = proc.communicate(timeout=300)
    # (the error is the last line: on a loaded machine a thread of the failed restore has once printed an
    # asyncio traceback at exit before it)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "20 is damaged (it cannot be restored: " in last, err
    assert last.endswith("no intact checkpoint is left: the same command starts the run again from step 0"), err


@pytest.mark.slow
def test_truncated_latest_checkpoint_resumes_from_the_intact_older_step(straight_run, tmp_path, capsys):
    """A latest step truncated before its checksums were written (killed mid-save) beside an intact older step
    was a 151-line traceback: now it is set aside and said in one line, and the run resumes from the older step
    (`stop_after=0`: restored, nothing trained; the full resume is the flipped-bytes test's). With its checksums
    written, the truncation is found by size before any restore."""
    import shutil

    from pe_jax.train.checkpointing import STEP_CHECKSUMS, step_problem

    config, straight = straight_run
    work = tmp_path / "work"
    shutil.copytree(straight, work, ignore=lambda folder, names: ["model"] if folder == str(straight) else [])
    files = [p for p in (work / "checkpoints" / "20").rglob("*") if p.is_file() and p.name != STEP_CHECKSUMS]
    victim = max(files, key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[:10])
    assert step_problem(str(work / "checkpoints"), 20) == (f"{victim.relative_to(work / 'checkpoints' / '20')} is "
                                                          f"10 bytes, {size} when saved")
    (work / "checkpoints" / "20" / STEP_CHECKSUMS).unlink()
    summary = finetune(load_config(str(config))[0], str(work), progress=False, stop_after=0)
    said = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(said) == 1 and f"{work / 'checkpoints'}/20 is damaged (it cannot be restored: " in said[0], said
    assert said[0].endswith("it is kept as 20.pe_jax-damaged; resuming from step 15"), said
    assert summary["step"] == 15 and not summary["complete"] and "model" not in summary
    assert sorted(os.listdir(work / "checkpoints")) == ["15", "20.pe_jax-damaged"]
    assert [json.loads(line)["step"] for line in open(work / "metrics.jsonl")] == list(range(1, 16))


def test_demo_data_and_metrics_of_a_user_are_never_removed(data, tmp_path, capsys):
    """The demo's data folder: a user's folder or file named like it was removed (or a traceback); now refused
    in one line and kept. A fresh run's metrics.jsonl is removed only when it holds pe-jax rows."""
    from pe_jax.cli import main
    from pe_jax.demo import generate_once

    (tmp_path / "data").write_text("a user's file")
    demo = ["demo", "--workdir", str(tmp_path), "--quiet", "--set", "steps=1", "--set", "optim.warmup_steps=0"]
    assert main(demo) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data'} exists and is not a finished demo dataset" in err and err.count("\n") == 1, err
    assert (tmp_path / "data").read_text() == "a user's file"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="not a finished demo dataset"):
        generate_once(str(tmp_path / "mine"), lambda out: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"
    made = generate_once(str(tmp_path / "new"), lambda out: (os.makedirs(out), open(f"{out}/dataset.json", "w")))
    assert os.listdir(made) == ["dataset.json"] and not list(tmp_path.glob("*pe_jax-tmp*"))

    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE.format(tiny=TINY, train=str(data / "pairs.jsonl"), steps=2, every=2))
    work = tmp_path / "project"
    work.mkdir()
    (work / "metrics.jsonl").write_text("my own notes\n")
    assert main(["finetune", "--config", str(config), "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{work / 'metrics.jsonl'}, line 1: not a pe-jax metrics row" in err and err.count("\n") == 1, err
    assert (work / "metrics.jsonl").read_text() == "my own notes\n"
    empty = tmp_path / "empty.txt"  # a link to an empty file of the user's: it would have been appended to
    empty.write_text("")
    (work / "metrics.jsonl").unlink()
    os.symlink(empty, work / "metrics.jsonl")
    assert main(["finetune", "--config", str(config), "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: is a symbolic link" in err and err.count("\n") == 1 and empty.read_text() == "", err


def test_workdir_records_that_are_not_pe_jaxs_are_one_line(tmp_path):
    """A workdir config.json of `[]` and a metrics.jsonl row without `step` were tracebacks; a torn last line
    (a run killed mid-append) blocked every resume naming no file: it is dropped now, the rest named."""
    from pe_jax.train.workdir import metrics_rows, prepare_workdir

    cfg = _tiny_config(tmp_path / "pairs.jsonl", steps=2)
    (tmp_path / "w" / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "w" / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config.json: not a finetuning config \(a JSON list, not an object\)$"):
        prepare_workdir(cfg, str(tmp_path / "w"))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # torn by a kill
    assert metrics_rows(str(metrics)) == [{"step": 1, "loss": 2.0}]
    metrics.write_text('{"step": 1}\n{"loss": 2.0}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"^{metrics}, line 2: not a pe-jax metrics row"):
        metrics_rows(str(metrics))
