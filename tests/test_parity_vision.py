"""Vision towers against timm `vit_pe_*` (an exact oracle of the reference at native resolution)."""

import jax
import numpy as np
import pytest
from peers import compare, make_timm, numpy_state_dict, run_torch, timm_at_resolution

import pe_jax

MAX_ABS, REL_L2 = 1e-4, 1e-5

# (preset, depth override: None = full depth). Every vision family: Core, Lang, Spatial, cls / no cls, LayerScale.
CASES = [
    ("PE-Core-T16-384", None),
    pytest.param("PE-Core-S16-384", 3, marks=pytest.mark.slow),
    pytest.param("PE-Core-B16-224", None, marks=pytest.mark.slow),  # full depth: T/16 is the quick run's
    pytest.param("PE-Core-L14-336", 2, marks=pytest.mark.slow),
    pytest.param("PE-Core-G14-448", 2, marks=pytest.mark.slow),
    pytest.param("PE-Lang-L14-448", 2, marks=pytest.mark.slow),
    pytest.param("PE-Lang-G14-448", 2, marks=pytest.mark.slow),
    ("PE-Spatial-T16-512", 2),
    ("PE-Spatial-S16-512", 2),
    pytest.param("PE-Spatial-B16-512", 2, marks=pytest.mark.slow),
    pytest.param("PE-Spatial-L14-448", 2, marks=pytest.mark.slow),
    pytest.param("PE-Spatial-G14-448", 2, marks=pytest.mark.slow),
]


def _pair(preset, depth, seed=0):
    kwargs = {} if depth is None else {"depth": depth}
    peer = make_timm(preset, seed=seed, **kwargs)
    sd = numpy_state_dict(peer)
    overrides = {} if depth is None else {"layers": depth}
    ours = pe_jax.VisionTransformer.from_config(preset, checkpoint=sd, **overrides)
    return peer, sd, ours


def _images(batch, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("preset,depth", CASES)
def test_vision_tower_matches_timm(preset, depth):
    peer, _, ours = _pair(preset, depth)
    size = ours.config.image_size
    x = _images(2, size, size)
    # Token towers (Lang, Spatial): timm's forward pools, its forward_features is the reference output.
    method = "forward_features" if ours.config.pool_type == "none" else None
    max_abs, rel = compare(jax.jit(lambda m, x: m(x))(ours, x), run_torch(peer, x, method))
    assert max_abs <= MAX_ABS and rel <= REL_L2, (max_abs, rel)


# Non-native sizes: the reference is the truth; timm is patched back to it (see peers.timm_at_resolution).
@pytest.mark.parametrize("preset,depth,size", [
    pytest.param("PE-Core-B16-224", 2, (288, 288), marks=pytest.mark.slow),
    pytest.param("PE-Core-B16-224", 2, (160, 160), marks=pytest.mark.slow),
    ("PE-Core-B16-224", 2, (224, 320)),
    pytest.param("PE-Core-G14-448", 1, (336, 336), marks=pytest.mark.slow),
])
def test_non_native_resolution(preset, depth, size):
    _, native, ours = _pair(preset, depth)
    peer = timm_at_resolution(preset, native, size, depth=depth)
    x = _images(1, *size, seed=1)
    max_abs, rel = compare(ours(x), run_torch(peer, x))
    assert max_abs <= MAX_ABS and rel <= REL_L2, (max_abs, rel)


@pytest.mark.slow
def test_intermediate_layers_match_timm():
    peer, _, ours = _pair("PE-Core-B16-224", 4)
    x = _images(1, 224, 224)
    import torch

    with torch.inference_mode():
        theirs = peer.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2)), indices=[0, 2],
                                            output_fmt="NLC", intermediates_only=True, norm=False,
                                            return_prefix_tokens=False)
    for layer, theirs_tokens in zip([0, 2], theirs, strict=False):
        ours_tokens = ours.forward_features(x, layer_idx=layer, strip_cls_token=True)
        max_abs, rel = compare(ours_tokens, theirs_tokens.numpy().reshape(ours_tokens.shape))
        assert max_abs <= MAX_ABS and rel <= REL_L2, (layer, max_abs, rel)
    several = ours.forward_intermediates(x, [2, 0, -1], strip_cls_token=True)
    np.testing.assert_array_equal(several[0], ours.forward_features(x, layer_idx=2, strip_cls_token=True))
    np.testing.assert_array_equal(several[1], ours.forward_features(x, layer_idx=0, strip_cls_token=True))
    np.testing.assert_array_equal(several[2], ours.forward_features(x, strip_cls_token=True))
