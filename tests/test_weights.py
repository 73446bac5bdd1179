"""The weight table: round trips in every naming and errors that list every problem at once."""

import numpy as np
import pytest
from peers import make_open_clip, make_timm, numpy_state_dict

import pe_jax
from pe_jax.checkpoints.params import CheckpointMismatchError


@pytest.fixture(scope="module")
def timm_sd():
    return numpy_state_dict(make_timm("PE-Core-T16-384", depth=2))


@pytest.fixture(scope="module")
def open_clip_sd():
    return numpy_state_dict(make_open_clip("PE-Core-T16-384", vision_depth=2, text_layers=2))


def _vision(sd):
    return pe_jax.VisionTransformer.from_config("PE-Core-T16-384", checkpoint=sd, layers=2)


def _clip(sd):
    return pe_jax.CLIP.from_config("PE-Core-T16-384", checkpoint=sd, vision_layers=2, text_layers=2)


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_naming_detection(timm_sd, open_clip_sd):
    assert pe_jax.detect_naming(timm_sd) == "timm"
    assert pe_jax.detect_naming(open_clip_sd) == "open_clip"
    original = pe_jax.torch_state_dict(_clip(open_clip_sd), "original")
    assert pe_jax.detect_naming(original) == "original"
    with pytest.raises(ValueError, match="not a Perception Encoder state dict"):
        pe_jax.detect_naming({"foo.weight": np.zeros(1)})


def test_round_trips_are_bit_exact(timm_sd, open_clip_sd):
    _assert_same(pe_jax.torch_state_dict(_vision(timm_sd), "timm"), timm_sd)  # zero head.bias included
    clip = _clip(open_clip_sd)
    expected_oc = {k: v for k, v in open_clip_sd.items() if k != "text.attn_mask"}
    _assert_same(pe_jax.torch_state_dict(clip, "open_clip"), expected_oc)
    original = pe_jax.torch_state_dict(clip, "original")
    assert "visual.attn_pool.attn.in_proj_weight" in original and "token_embedding.weight" in original
    _assert_same(pe_jax.torch_state_dict(_clip(original), "open_clip"), expected_oc)
    # A CLIP checkpoint loads into its vision tower, as the reference's load_ckpt does.
    trunk = {k[len("visual.trunk."):]: v for k, v in open_clip_sd.items() if k.startswith("visual.trunk.")}
    _assert_same(pe_jax.torch_state_dict(_vision(original), "timm"), trunk)
    _assert_same(pe_jax.torch_state_dict(_vision(open_clip_sd), "timm"), trunk)
    # module. prefixes (DDP) are stripped.
    _assert_same(pe_jax.torch_state_dict(_vision({f"module.{k}": v for k, v in timm_sd.items()}), "timm"), timm_sd)


def test_mismatches_are_listed_together(timm_sd):
    bad = dict(timm_sd)
    del bad["blocks.1.mlp.fc2.weight"]
    del bad["norm.bias"]
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:, :10]
    bad["blocks.7.norm1.weight"] = np.ones(192, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        _vision(bad)
    msg = str(info.value)
    for part in ["missing keys (2)", "blocks.1.mlp.fc2.weight", "norm.bias", "unexpected keys (1)",
                 "blocks.7.norm1.weight", "blocks.0.attn.qkv.weight: expected shape (576, 192), got (576, 10)"]:
        assert part in msg, part


def test_nonzero_timm_head_bias_is_refused(timm_sd):
    # The reference projection has no bias: a finetuned timm head with one cannot be represented.
    with pytest.raises(CheckpointMismatchError, match="head.bias: must be all zeros"):
        _vision(dict(timm_sd, **{"head.bias": np.ones(512, np.float32)}))


def test_wrong_preset_is_a_shape_error(timm_sd):
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed.proj.weight: expected shape \(384, 3, 16, 16\)"):
        pe_jax.VisionTransformer.from_config("PE-Core-S16-384", checkpoint=timm_sd, layers=2)


def test_timm_checkpoint_into_clip_is_refused(timm_sd):
    with pytest.raises(ValueError, match="timm checkpoints hold only a vision tower"):
        _clip(timm_sd)


def test_safetensors_path_loads(tmp_path, timm_sd):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file(timm_sd, str(path))
    _assert_same(pe_jax.torch_state_dict(pe_jax.VisionTransformer.from_config(
        "PE-Core-T16-384", checkpoint=path, layers=2), "timm"), timm_sd)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pe_jax.VisionTransformer.from_config("PE-Core-T16-384", checkpoint=tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError):
        pe_jax.VisionTransformer.from_config("PE-Core-T16-384", checkpoint=tmp_path / "nope.safetensors")


def test_fill_params_with_default_buffers(timm_sd):
    """fill_params' default `allocate` makes plain numpy buffers (it once passed the path to np.empty)."""
    from pe_jax.checkpoints.naming import fill_params, plan_for
    from pe_jax.checkpoints.params import flat_params, param_shapes

    model = _vision(timm_sd)
    sd = pe_jax.torch_state_dict(model, "timm")
    key_shapes = {k: v.shape for k, v in sd.items()}
    params = fill_params(plan_for(model.config, param_shapes(model), key_shapes), sd)
    expected = flat_params(model)
    assert sorted(params) == sorted(expected)
    for path, a in expected.items():
        assert isinstance(params[path], np.ndarray) and params[path].dtype == a.dtype, path
        np.testing.assert_array_equal(params[path], np.asarray(a), err_msg=str(path))
