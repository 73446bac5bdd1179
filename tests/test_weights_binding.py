"""Jobs are bound to their exact weights: an embedding folder or a finetuning workdir refuses to continue with
other weights behind the same path and metadata, naming both content hashes."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import pe_jax
from pe_jax.checkpoints.verify import content_hash
from pe_jax.embed import embed
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec
from pe_jax.train.workdir import prepare_workdir


@pytest.fixture(scope="module")
def two_checkpoints(tiny_clip, tmp_path_factory):
    """The same config and preset, other weights (a nudged logit scale): (path A, path B)."""
    root = tmp_path_factory.mktemp("weights")
    pe_jax.save(tiny_clip, root / "a", preset="PE-Core-T16-384")
    other = pe_jax.load_model(str(root / "a"))
    other.logit_scale[...] = other.logit_scale[...] + 0.5
    pe_jax.save(other, root / "b", preset="PE-Core-T16-384")
    return root / "a", root / "b"


def test_embedding_rerun_with_other_weights_is_refused(tiny_clip, two_checkpoints, tmp_path):
    a, b = two_checkpoints
    assert content_hash(a) != content_hash(b)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    live = tmp_path / "ckpt"
    shutil.copytree(a, live)
    embed(tiny_clip, str(images), str(tmp_path / "out"), checkpoint=str(live), progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert manifest["weights"] == content_hash(a)
    shutil.rmtree(live)
    shutil.copytree(b, live)  # same path, same preset and config: other weights
    with pytest.raises(ValueError, match="other weights") as info:
        embed(tiny_clip, str(images), str(tmp_path / "out"), checkpoint=str(live), progress=False)
    assert content_hash(a) in str(info.value) and content_hash(b) in str(info.value)


def test_finetuning_resume_with_other_weights_is_refused(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    live = tmp_path / "ckpt"
    shutil.copytree(a, live)
    cfg = FinetuneConfig(model=ModelSpec(preset="PE-Core-T16-384", checkpoint=str(live)), data=DataSpec(train="x"))
    assert prepare_workdir(cfg, str(tmp_path / "work")) is False
    assert json.loads((tmp_path / "work" / "weights.json").read_text())["content_hash"] == content_hash(a)
    (tmp_path / "work" / "checkpoints" / "10").mkdir(parents=True)  # the run has checkpointed
    assert prepare_workdir(cfg, str(tmp_path / "work")) is True  # same weights: resume
    shutil.rmtree(live)
    shutil.copytree(b, live)
    with pytest.raises(ValueError, match="trained from other weights") as info:
        prepare_workdir(cfg, str(tmp_path / "work"))
    assert content_hash(a) in str(info.value) and content_hash(b) in str(info.value)


def test_finetuning_resume_with_an_edited_model_metadata_is_refused(two_checkpoints, tmp_path):
    """pe_jax.json is not in the content hash, yet it is the model (use_rope2d, dtypes): weights.json records its
    config_digest, and a resume after an edit is refused naming it."""
    a, _ = two_checkpoints
    live = tmp_path / "ckpt"
    shutil.copytree(a, live)
    cfg = FinetuneConfig(model=ModelSpec(preset="PE-Core-T16-384", checkpoint=str(live)), data=DataSpec(train="x"))
    prepare_workdir(cfg, str(tmp_path / "work"))
    assert json.loads((tmp_path / "work" / "weights.json").read_text())["model_config"].startswith("config:")
    (tmp_path / "work" / "checkpoints" / "10").mkdir(parents=True)
    meta = json.loads((live / "pe_jax.json").read_text())
    meta["config"]["vision"]["use_rope2d"] = False
    (live / "pe_jax.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained from other weights \\(model_config config:"):
        prepare_workdir(cfg, str(tmp_path / "work"))


@pytest.mark.parametrize("field, value", [("use_rope2d", False), ("dtype", "bfloat16"), ("param_dtype", "bfloat16"),
                                          ("layers", 2)])
def test_the_model_config_digest_covers_every_field_that_changes_outputs(field, value):
    """What binds a job's outputs beside the content hash: an edit of pe_jax.json that changes the embeddings
    (RoPE, the compute dtype, ...) changes config_digest; how the tower runs (remat, attention backend) does not."""
    import dataclasses

    from pe_jax.config import OUTPUT_NEUTRAL, clip_config, config_digest

    cfg = clip_config("PE-Core-T16-384")
    edited = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **{field: value}))
    assert config_digest(edited) != config_digest(cfg)
    for neutral in OUTPUT_NEUTRAL:
        other = "full" if neutral == "remat_policy" else "cudnn"
        assert config_digest(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **{neutral: other}))) \
            == config_digest(cfg)
