"""PE-Lang tiling (pe_jax.preprocess.tiling) against transformers' PerceptionLMImageProcessor, bit for bit."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.perception_lm.image_processing_perception_lm import PerceptionLMImageProcessor

from pe_jax.preprocess.tiling import choose_grid, resize_bicubic_uint8, tile_image

SIZES = [(1, 2000), (2000, 1), (300, 500), (500, 300), (64, 64), (63, 65), (37, 3000), (1234, 567), (3, 7),
         (129, 1), (900, 1800), (450, 451)]  # (height, width)


def _reference(image, tile_size, max_tiles, input_type="thumb+tile"):
    proc = PerceptionLMImageProcessor(tile_size=tile_size, max_num_tiles=max_tiles, vision_input_type=input_type)
    return proc(image, return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)  # NCHW -> NHWC


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 9, 36])
def test_tiles_equal_processor_bit_for_bit(max_tiles):
    rng = np.random.default_rng(max_tiles)
    for h, w in SIZES:  # a 64 px tile keeps the 36-tile canvases small; the grid logic is the same at 448
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = tile_image(image, tile_size=64, max_tiles=max_tiles)
        ref = _reference(image, 64, max_tiles)
        cols, rows = ours.grid
        assert ours.tiles.dtype == np.float32 and ours.tiles.shape == ref.shape == (1 + cols * rows, 64, 64, 3)
        np.testing.assert_array_equal(ours.tiles, ref, err_msg=f"{h}x{w}, max_tiles={max_tiles}")


@pytest.mark.parametrize("hw", [(1, 2000), (2000, 1), (300, 500)])
def test_tiles_at_448(hw):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8))
    ours = tile_image(image, max_tiles=4)
    np.testing.assert_array_equal(ours.tiles, _reference(image, 448, 4))
    assert ours.grid == {(1, 2000): (4, 1), (2000, 1): (1, 4), (300, 500): (2, 2)}[hw]


@pytest.mark.slow
def test_tiles_at_448_with_36_tiles():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (900, 1800, 3), dtype=np.uint8))
    ours = tile_image(image)
    assert ours.grid == (8, 4)
    np.testing.assert_array_equal(ours.tiles, _reference(image, 448, 36))


def test_modes_and_tiles_alone():
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (70, 150, 4), dtype=np.uint8), "RGBA")  # composited onto white
    gray = Image.fromarray(rng.integers(0, 256, (90, 40), dtype=np.uint8), "L")
    for image in (rgba, gray):
        np.testing.assert_array_equal(tile_image(image, 32, 6).tiles, _reference(image, 32, 6))
    vanilla = tile_image(gray, 32, 6, thumbnail=False)
    np.testing.assert_array_equal(vanilla.tiles, tile_image(gray, 32, 6).tiles[1:])


def test_resize_matches_torchvision_and_is_not_pil():
    import torch
    import torchvision.transforms.v2.functional as tvF

    image = np.random.default_rng(3).integers(0, 256, (123, 301, 3), dtype=np.uint8)
    for h, w in ((448, 448), (50, 700), (123, 90)):
        ref = tvF.resize(torch.from_numpy(image).permute(2, 0, 1), [h, w], tvF.InterpolationMode.BICUBIC,
                         antialias=True).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(resize_bicubic_uint8(image, h, w), ref)
    pil = np.asarray(Image.fromarray(image).resize((448, 448), Image.Resampling.BICUBIC))
    assert not np.array_equal(pil, resize_bicubic_uint8(image, 448, 448))  # why the module has its own resampler


def test_grid_choice_and_errors():
    assert choose_grid(2000, 1, 448, 36) == (36, 1)
    assert choose_grid(448, 448, 448, 1) == (1, 1)
    assert choose_grid(500, 300, 448, 4) == (2, 2)  # fits 2x1 and 2x2 without downsampling: the bigger canvas
    with pytest.raises(ValueError, match="uint8"):
        tile_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="max_tiles"):
        tile_image(np.zeros((4, 4, 3), np.uint8), max_tiles=0)


def test_tiles_are_a_batch_for_the_tower():
    from flax import nnx

    from pe_jax.config import vision_config
    from pe_jax.features import features
    from pe_jax.modeling import VisionTransformer

    cfg = vision_config("PE-Lang-L14-448", width=64, layers=1, heads=2, mlp_dim=128, image_size=28, patch_size=14)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 90, 3), dtype=np.uint8))
    tiles = tile_image(image, tile_size=28, max_tiles=3)
    batch = np.asarray(features(model, tiles.tiles))  # [1 + tiles, width]: the thumbnail's row first
    assert batch.shape == (1 + 3, 64) and tiles.grid == (3, 1)
    np.testing.assert_allclose(batch[2], np.asarray(features(model, tiles.tiles[2:3]))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_readme_tiling_block_runs():

    from doc_blocks import run_python

    scope = run_python("## Tiling (PE-Lang)")  # docs/inputs.md
    assert scope["tiles"].shape == (3, 448, 448, 3) and scope["grid"] == (2, 1)
    assert scope["tokens"].shape == (3, 1024, 64)
