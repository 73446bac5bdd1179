"""Sharding on 8 fake CPU devices: rules, directly-sharded construction, sharded forward, restore on other meshes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import pe_jax
from pe_jax import sharding
from pe_jax.batching import run_batched
from pe_jax.checkpoints.orbax import save

PRESET = "PE-Core-T16-384"
SMALL = dict(vision_layers=2, text_layers=2, vision_image_size=64)
MESHES = {"dp": "data=8", "fsdp": "fsdp=8", "fsdp_tp": "fsdp=4,model=2"}


@pytest.fixture(scope="module")
def reference():
    model = pe_jax.CLIP.from_config(PRESET, seed=7, **SMALL)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 64, 64, 3)).astype(np.float32)
    tokens = np.zeros((5, 32), np.int32)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, rng.integers(1, 49000, (5, 5)), 49407
    encode = lambda m, x, t: (m.encode_image(x), m.encode_text(t))
    return model, images, tokens, jax.jit(encode)(model, images, tokens)


def _placed(model, mesh, strategy="fsdp"):
    """`model`'s weights laid out on `mesh` by the strategy's rules, without another random-init compile
    (building directly sharded is test_directly_sharded_model_matches_single_device's subject)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, strategy)))


def _spec(model, *path):
    node = model
    for p in path:
        node = getattr(node, p)
    return node.get_value().sharding.spec


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dp", "fsdp", "fsdp_tp"])
def test_directly_sharded_model_matches_single_device(reference, strategy):
    single, images, tokens, (img_ref, txt_ref) = reference
    mesh = sharding.make_mesh(MESHES[strategy])
    model = pe_jax.CLIP.from_config(PRESET, seed=7, mesh=mesh, strategy=strategy, **SMALL)
    # same random init as the unsharded model, sharded as the strategy says
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(single), jax.tree.leaves(model))
    mlp = _spec(model, "visual", "transformer", "resblocks", "mlp", "c_fc", "kernel")
    qkv = _spec(model, "visual", "transformer", "resblocks", "attn", "in_proj", "kernel")
    vocab = _spec(model, "text", "token_embedding")
    if strategy == "dp":
        assert mlp == P(None, None, None) and vocab == P(None, None)
    elif strategy == "fsdp":
        assert mlp == P(None, None, "fsdp") and qkv == P(None, "fsdp", None, None, None) and vocab == P("fsdp", None)
        for leaf in jax.tree.leaves(model):  # nothing large left replicated
            if leaf.size >= 4096:
                assert any(axis is not None for axis in leaf.sharding.spec), leaf.shape
    else:
        assert mlp == P(None, "fsdp", "model") and vocab == P("model", "fsdp")
        assert qkv == P(None, "fsdp", None, None, None)  # T/16 has 3 heads: not divisible by 2, left whole
    encode = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))
    x = jax.device_put(np.concatenate([images, images[:3]]), sharding.batch_sharding(mesh, 4))
    t = jax.device_put(np.concatenate([tokens, tokens[:3]]), sharding.batch_sharding(mesh, 2))
    img, txt = encode(model, x, t)
    np.testing.assert_allclose(np.asarray(img)[:5], img_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(txt)[:5], txt_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_shards_heads_when_divisible():
    mesh = sharding.make_mesh("fsdp=4,model=2")
    model = pe_jax.VisionTransformer.from_config("PE-Core-B16-224", layers=1, image_size=32, mesh=mesh,
                                                 strategy="fsdp_tp")
    assert _spec(model, "transformer", "resblocks", "attn", "in_proj", "kernel") == P(None, "fsdp", None, "model",
                                                                                        None)
    assert _spec(model, "transformer", "resblocks", "attn", "out_proj", "kernel") == P(None, "model", None, "fsdp")


@pytest.mark.slow
def test_batched_inference_pads_and_keeps_order(reference):
    single, images, _, (img_ref, _) = reference
    mesh = sharding.make_mesh("fsdp=8")
    model = _placed(single, mesh)
    assert _spec(model, "visual", "transformer", "resblocks", "mlp", "c_fc", "kernel") == P(None, None, "fsdp")
    out = run_batched(lambda m, x: m.encode_image(x), model, images, batch_size=3, mesh=mesh)  # 3 -> 8, padded
    assert out.shape == img_ref.shape
    np.testing.assert_allclose(out, img_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes_bit_exactly(reference, tmp_path):
    mesh = sharding.make_mesh("fsdp=2,model=4")
    model = _placed(reference[0], mesh, "fsdp_tp")
    assert _spec(model, "visual", "transformer", "resblocks", "mlp", "c_fc", "kernel") == P(None, "fsdp", "model")
    save(model, tmp_path / "ckpt", preset=PRESET)
    expected = [np.asarray(a) for a in jax.tree.leaves(model)]
    for target, strategy in [(None, "fsdp"), ("fsdp=4,model=2", "fsdp_tp"), ("fsdp=8", "fsdp"), ("data=8", "dp")]:
        other = sharding.make_mesh(target) if target else None
        restored = pe_jax.CLIP.from_config(PRESET, checkpoint=tmp_path / "ckpt", mesh=other, strategy=strategy,
                                           **SMALL)
        for a, b in zip(expected, jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
        if other is not None:
            spec = _spec(restored, "visual", "transformer", "resblocks", "mlp", "c_fc", "kernel")
            assert spec == sharding.partition_spec(("layers", "embed", "mlp"), (2, 192, 768), other, strategy)


def test_torch_state_dict_loads_sharded(tiny_clip):
    source = tiny_clip.visual  # a random T/16 tower: one block, 32 px
    assert source.config == pe_jax.vision_config(PRESET, layers=1, image_size=32)
    sd = pe_jax.torch_state_dict(source, "timm")
    mesh = sharding.make_mesh("fsdp=8")
    model = pe_jax.VisionTransformer.from_config(PRESET, checkpoint=sd, layers=1, image_size=32, mesh=mesh)
    assert _spec(model, "transformer", "resblocks", "mlp", "c_fc", "kernel") == P(None, None, "fsdp")
    for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad,match", [
    ("fsdp=3", "needs 3 devices, but 8 are available"),
    ("fsdp=16", "needs 16 devices"),
    ("fsdp=3,data=-1", "does not divide 8 devices"),
    ("tp=8", r"unknown mesh axes \['tp'\]"),
    ("fsdp:8", "expected NAME=SIZE"),
])
def test_bad_meshes(bad, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(bad)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero3'"):
        pe_jax.VisionTransformer.from_config(PRESET, layers=1, mesh=sharding.make_mesh("fsdp=8"), strategy="zero3")
