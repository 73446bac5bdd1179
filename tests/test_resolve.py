"""One resolver (`pe_jax.pretrained.resolve_model`): a checkpoint's class, config, naming and content hash decided in
one place, its metadata read once per job: by the local embedding job, and by a Ray job's driver, whose actors
load the weights from the driver's `ResolvedModel` without reading anything again."""

import collections
import os
import pickle
import re

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import pe_jax
from pe_jax import pretrained, storage
from pe_jax.checkpoints import orbax, readers, verify
from pe_jax.checkpoints.load import torch_state_dict
from pe_jax.pretrained import ResolvedModel, resolve_model

PRESET = "PE-Core-T16-384"
TINY = dict(vision_layers=1, text_layers=1, vision_image_size=32)  # the shapes of conftest's tiny_clip
URL = "s3://bucket/ckpt"  # served by a counted stand-in for the object store's copy


@pytest.fixture(scope="module")
def files(tiny_clip, tmp_path_factory):
    """A pe_jax checkpoint of tiny_clip, the same weights as a PyTorch (original naming) safetensors file, and a
    folder of three images."""
    root = tmp_path_factory.mktemp("resolve")
    pe_jax.save(tiny_clip, root / "ckpt", preset=PRESET)
    save_file(torch_state_dict(tiny_clip, "original"), str(root / "tiny.safetensors"))
    save_file(torch_state_dict(tiny_clip.visual, "timm"), str(root / "tower.safetensors"))
    (root / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(root / "images" / f"{i}.png")
    return root


@pytest.fixture
def counts(files, monkeypatch):
    """Counters of what touches a checkpoint: `resolve_model` calls, reads of pe_jax.json (by any reader) and
    object-store copies (URL stands for the local checkpoint)."""
    seen = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    read = counted("metadata", orbax.read_metadata)
    monkeypatch.setattr(orbax, "read_metadata", read)
    monkeypatch.setattr(pretrained, "read_metadata", read)
    read_json = verify.read_json
    monkeypatch.setattr(verify, "read_json", lambda ckpt, rel: (
        seen.update(["metadata"]) if rel == verify.METADATA_FILE else None) or read_json(ckpt, rel))
    monkeypatch.setattr(pretrained, "resolve_model", counted("resolve_model", pretrained.resolve_model))
    monkeypatch.setattr(storage, "local_copy", counted(
        "object store", lambda url: str(files / "ckpt") if url == URL else pytest.fail(f"fetched {url}")))
    return seen


def _params(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(model)]


def test_a_local_embedding_job_resolves_and_reads_metadata_once(files, counts, tmp_path):
    from pe_jax.embed import run

    summary = run(str(files / "images"), str(tmp_path / "out"), checkpoint=URL, batch_size=4, progress=False)
    assert summary["complete"] and summary["embedded"] == 3
    assert counts == {"resolve_model": 1, "metadata": 1, "object store": 1}


def test_a_ray_job_resolves_in_the_driver_and_its_actors_read_nothing(files, counts, tmp_path, monkeypatch):
    """The driver and an actor in this process (a Ray cluster's start costs more than the rest of this file):
    the actor is built from the driver's arguments after a pickle round trip, as Ray ships them."""
    from pe_jax.embed import ray_engine, run

    shipped = {}
    def drive(ray, listing, out, settings, actor, *args):
        shipped.update(pickle.loads(pickle.dumps(actor)))
        return {"embedded": 0, "failed": 0}

    monkeypatch.setattr(ray_engine, "_drive", drive)
    monkeypatch.setattr(ray_engine, "connect", lambda address: None)
    run(str(files / "images"), str(tmp_path / "out"), checkpoint=URL, engine="ray", progress=False)
    assert counts == {"resolve_model": 1, "metadata": 1, "object store": 1}
    assert isinstance(shipped["resolved"], ResolvedModel) and shipped["resolved"].source == URL
    counts.clear()
    actor = ray_engine.PartEmbedder(**shipped)
    assert counts == {} and actor.model.config == shipped["resolved"].config


def test_a_pe_jax_checkpoint_resolves_to_its_own_model_with_overrides(files, tiny_clip):
    resolved = resolve_model(files / "ckpt", dtype="bfloat16")
    assert resolved.model_class is pe_jax.CLIP and resolved.naming == "pe_jax" and resolved.preset == PRESET
    assert resolved.config == pe_jax.clip_config(PRESET, dtype="bfloat16", **TINY)
    assert resolved.content_hash == verify.content_hash(files / "ckpt")
    assert resolved.path == resolved.source == str(files / "ckpt")
    assert pickle.loads(pickle.dumps(resolved)) == resolved
    model = resolved.load()
    assert model.config.vision.dtype == "bfloat16"
    for a, b in zip(_params(model), _params(tiny_clip), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resolved.abstract().config == resolved.config
    with pytest.raises(ValueError, match=r"would change the architecture .*vision.layers: 1 there, 2 asked"):
        resolve_model(files / "ckpt", vision_layers=2)
    with pytest.raises(ValueError, match="vision.layers is 1 in the checkpoint, 12 in the preset"):
        resolve_model(files / "ckpt", model=PRESET)


def test_a_torch_file_resolves_from_its_keys_with_overrides(files, tiny_clip, monkeypatch):
    # Only the keys are read: no tensor of the file is touched.
    monkeypatch.setattr(readers.SafetensorsDict, "__getitem__", lambda self, key: pytest.fail(f"read {key}"))
    resolved = resolve_model(files / "tiny.safetensors", model=PRESET, **TINY)
    assert resolved.naming == "original" and resolved.model_class is pe_jax.CLIP and resolved.content_hash is None
    assert resolved.config == pe_jax.clip_config(PRESET, **TINY) and resolved.preset == PRESET
    tower = resolve_model(files / "tower.safetensors", default_model=PRESET, layers=1, image_size=32)
    assert tower.naming == "timm" and tower.model_class is pe_jax.VisionTransformer  # no text tower in the file
    monkeypatch.undo()
    for a, b in zip(_params(resolved.load()), _params(tiny_clip), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resolved.weights_id() == verify.content_hash(files / "tiny.safetensors")


def test_a_preset_resolves_without_a_checkpoint():
    resolved = resolve_model(model="PE-Core-B16-224", vision_image_size=448)
    assert resolved.model_class is pe_jax.CLIP and resolved.path is None and resolved.naming is None
    assert resolved.config.vision.image_size == 448 and resolved.weights_id() == "random-init"
    assert resolve_model(model="PE-Spatial-G14-448").model_class is pe_jax.VisionTransformer


def test_clear_errors(files, tmp_path):
    with pytest.raises(ValueError, match=r"unknown preset 'PE-Core-X'; available: PE-Core-G14-448"):
        resolve_model(model="PE-Core-X")
    with pytest.raises(ValueError, match="unknown preset 'PE-Core-X'"):
        resolve_model(files / "tiny.safetensors", model="PE-Core-X")
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {tmp_path / 'nope'}")):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="is a PyTorch file: name its preset"):
        resolve_model(files / "tiny.safetensors")
    with pytest.raises(ValueError, match="name a checkpoint or a preset"):
        resolve_model()
    with pytest.raises(ValueError, match="directory without pe_jax.json"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="unknown CLIP override 'depth'"):
        resolve_model(model=PRESET, depth=3)


def test_the_earlier_entry_points_wrap_the_resolver(files, counts):
    ckpt = str(files / "ckpt")
    assert pretrained.preset_of(ckpt) == PRESET and pretrained.preset_of(ckpt, "x") == "x"
    assert pretrained.preset_of(str(files / "tiny.safetensors")) is None
    assert pretrained.abstract_model(ckpt).config == pe_jax.clip_config(PRESET, **TINY)
    assert counts["resolve_model"] == 2 and counts["metadata"] == 2
    meta = orbax.read_metadata(ckpt)
    assert pretrained.model_from_metadata(meta).config == pe_jax.clip_config(PRESET, **TINY)
    assert os.path.samefile(resolve_model(ckpt).local_path(), ckpt)


def test_finetuning_starts_from_the_resolved_model(files, counts):
    """The run's start (`pe_jax.train.loop.resolve_start`): a pe_jax checkpoint's own config whatever the recipe's
    preset, a PyTorch file's class from its keys (a tower file under a CLIP preset trains the tower)."""
    from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec
    from pe_jax.train.loop import resolve_start

    def start(checkpoint, task="classification", image_size=None, **overrides):
        model = ModelSpec(preset=PRESET, checkpoint=checkpoint and str(files / checkpoint), overrides=overrides)
        return resolve_start(FinetuneConfig(model=model, data=DataSpec(train="x", image_size=image_size), task=task))

    own = start("ckpt", task="contrastive", dtype="bfloat16")
    assert own.config == pe_jax.clip_config(PRESET, dtype="bfloat16", **TINY) and counts["metadata"] == 1
    with pytest.raises(ValueError, match=r"would change the architecture .*vision.layers: 1 there, 2 asked"):
        start("ckpt", vision_layers=2)
    clip = start("tiny.safetensors", image_size=64, layers=1, text_layers=1)  # a classifier's fields: the tower's
    assert clip.model_class is pe_jax.CLIP and clip.config.vision.image_size == 64 and clip.config.vision.layers == 1
    tower = start("tower.safetensors", image_size=32, layers=1)
    assert tower.model_class is pe_jax.VisionTransformer and tower.naming == "timm"
    assert tower.config == pe_jax.vision_config(PRESET, layers=1, image_size=32)
    with pytest.raises(ValueError, match="contrastive finetuning needs a PE-Core CLIP preset"):
        resolve_start(FinetuneConfig(model=ModelSpec(preset="PE-Spatial-T16-512"), data=DataSpec(train="x")))
