"""Full CLIP against open_clip `PE-Core-*` (an exact oracle of the reference CLIP)."""

import jax
import numpy as np
import open_clip
import pytest
import torch
from peers import OPEN_CLIP_NAMES, compare, make_open_clip, numpy_state_dict

import pe_jax

MAX_ABS, REL_L2 = 1e-4, 1e-5


def _tokens(preset, ctx):
    """Captions, an empty string, a truncated text, and random ids with an end token (tokenized by the peer)."""
    tok = open_clip.get_tokenizer(OPEN_CLIP_NAMES[preset])
    texts = ["a photo of a cat", "", "  ", "A diagram of the Perception Encoder; html &amp; emoji 🐱",
             " ".join(["very long caption"] * 40)]
    ids = tok(texts).numpy()
    rng = np.random.default_rng(0)
    rand = rng.integers(1, 49406, size=(3, ctx))
    for row, end in zip(rand, rng.integers(1, ctx, size=3), strict=False):
        row[0], row[end] = 49406, 49407
        row[end + 1:] = 0
    full = rng.integers(1, 49406, size=(1, ctx))  # every slot used: end token in the last one
    full[0, 0], full[0, -1] = 49406, 49407
    return np.concatenate([ids, rand, full]).astype(np.int32)


# T/16 runs at full depth (every block of both towers); the others at reduced depth (the full-depth B/16
# vision tower is also checked against timm in test_parity_vision).
CASES = [
    ("PE-Core-T16-384", {}),
    pytest.param("PE-Core-B16-224", {"vision_depth": 2, "text_layers": 2}, marks=pytest.mark.slow),
    pytest.param("PE-Core-L14-336", {"vision_depth": 2, "text_layers": 2}, marks=pytest.mark.slow),
    # no class token, head dim 96, 72 tokens
    pytest.param("PE-Core-G14-448", {"vision_depth": 2, "text_layers": 2}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,reduced", CASES)
def test_clip_matches_open_clip(preset, reduced):
    peer = make_open_clip(preset, seed=1, **reduced)
    sd = numpy_state_dict(peer)
    overrides = {}
    if reduced:
        overrides = {"vision_layers": reduced["vision_depth"], "text_layers": reduced["text_layers"]}
    ours = pe_jax.CLIP.from_config(preset, checkpoint=sd, **overrides)
    size = ours.config.vision.image_size
    images = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    tokens = _tokens(preset, ours.config.text.context_length)

    with torch.inference_mode():
        img_t = peer.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        txt_t = peer.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
        _, _, scale_t = peer(None, None)  # the peer's forward, towers skipped: its features are checked above

    # One compiled program for the raw features and the forward (an eager forward costs more than a compile).
    img, txt, (img_n, txt_n, scale) = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t), m(x, t)))(
        ours, images, tokens)
    for ours_out, theirs in ((img, img_t), (txt, txt_t)):
        max_abs, rel = compare(ours_out, theirs)
        assert max_abs <= MAX_ABS and rel <= REL_L2, (max_abs, rel)
    np.testing.assert_allclose(scale, scale_t.item(), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(img_n, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(txt_n, txt_t / np.linalg.norm(txt_t, axis=-1, keepdims=True), atol=1e-6)


def test_encode_video_is_mean_of_frames(tiny_clip):
    video = np.random.default_rng(0).standard_normal((2, 3, 32, 32, 3)).astype(np.float32)
    frames = jax.jit(lambda m, x: m.encode_image(x, normalize=True))(tiny_clip, video.reshape(6, 32, 32, 3))
    ours = jax.jit(lambda m, v: m.encode_video(v, normalize=True))(tiny_clip, video)
    np.testing.assert_allclose(ours, frames.reshape(2, 3, -1).mean(1), atol=1e-6)
