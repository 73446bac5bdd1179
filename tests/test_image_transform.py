"""pe_jax image preprocessing vs OpenCLIP's `meta` transform of PE-Core (the reference): bit-identical pixels."""

from __future__ import annotations

import io
import re

import numpy as np
import open_clip
import pytest
from open_clip.transform import PreprocessCfg, image_transform, image_transform_v2
from PIL import Image

from pe_jax.preprocess import get_image_transform, load_images

MODELS = {224: "PE-Core-B-16", 336: "PE-Core-L-14-336", 448: "PE-Core-bigG-14-448"}
MODES = ["RGB", "RGBA", "LA", "L", "P", "PA", "1", "CMYK", "YCbCr", "I;16", "I", "F"]
# (width, height): odd sizes, downsampling, upsampling, both at once, and one already square.
SIZES = [(641, 479), (97, 61), (1000, 37), (225, 223), (300, 300)]


def oracle(size: int, center_crop: bool = False):
    """OpenCLIP's transform built from the `meta` pretrained cfg (the untagged default is a different transform)."""
    cfg = open_clip.get_pretrained_cfg(MODELS.get(size, "PE-Core-B-16"), "meta")
    assert (cfg["resize_mode"], cfg["interpolation"], cfg["mean"]) == ("squash", "bilinear", (0.5,) * 3)
    if center_crop:  # the reference's center_crop=True: Resize(size) + CenterCrop(size), as OpenCLIP's "shortest"
        tf = image_transform(size, False, mean=cfg["mean"], std=cfg["std"], interpolation="bilinear",
                             resize_mode="shortest")
    else:
        tf = image_transform_v2(PreprocessCfg(size=size, mean=cfg["mean"], std=cfg["std"],
                                              interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"]),
                                is_train=False)
    return lambda img: tf(img).permute(1, 2, 0).numpy()  # CHW -> HWC


def make_image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise, so resampling has real structure to get wrong.
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx * 255 // max(w - 1, 1) + yy * 128 // max(h - 1, 1)) % 256).astype(np.int64)
    u8 = lambda: np.clip(base + rng.integers(-40, 40, (h, w)), 0, 255).astype(np.uint8)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return Image.merge(mode, [Image.fromarray(u8()) for _ in range(len(Image.new(mode, (1, 1)).getbands()))])
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(u8()), Image.fromarray(u8())])
    if mode == "L":
        return Image.fromarray(u8())
    if mode == "1":
        return Image.fromarray(u8()).convert("1")
    if mode in ("P", "PA"):
        img = Image.merge("RGB", [Image.fromarray(u8()) for _ in range(3)]).quantize(61)
        if mode == "PA":
            img = img.convert("PA")
        else:
            img.info["transparency"] = 3  # a palette entry marked transparent, as in many GIFs
        return img
    if mode == "I;16":
        return Image.fromarray((base * 250 + rng.integers(0, 500, (h, w))).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((base * 300 - 2000 + rng.integers(0, 500, (h, w))).astype(np.int32))
    if mode == "F":
        return Image.fromarray((base * 1.3 - 30 + rng.standard_normal((h, w))).astype(np.float32))
    raise AssertionError(mode)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL: palette images with transparency
@pytest.mark.parametrize("size", [224, 336, 448])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_exactly(mode: str, size: int):
    ref, mine = oracle(size), get_image_transform(size)
    for i, (w, h) in enumerate(SIZES):
        img = make_image(mode, w, h, seed=i)
        assert img.mode == mode
        want, got = ref(img), mine(img)
        assert got.dtype == np.float32 and got.shape == (size, size, 3) and got.flags.c_contiguous
        assert np.abs(got - want).max() == 0, (mode, w, h)
        assert img.size == (w, h) and img.mode == mode  # the input is not modified


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK", "I;16", "F"])
def test_center_crop_matches_reference_exactly(mode: str, size: int):
    ref, mine = oracle(size, center_crop=True), get_image_transform(size, center_crop=True)
    for i, (w, h) in enumerate([*SIZES, (size, size + 1), (size + 3, size)]):  # + rounding of the crop offset
        img = make_image(mode, w, h, seed=i)
        assert np.abs(mine(img) - ref(img)).max() == 0, (mode, w, h)


def test_squash_and_center_crop_differ_and_value_range():
    img = make_image("RGB", 400, 200)
    squash, crop = get_image_transform(64)(img), get_image_transform(64, center_crop=True)(img)
    assert squash.shape == crop.shape == (64, 64, 3) and not np.array_equal(squash, crop)
    assert -1.0 <= squash.min() < -0.5 and 0.5 < squash.max() <= 1.0
    white = get_image_transform(8)(Image.new("RGB", (3, 5), (255, 255, 255)))
    assert np.all(white == 1.0) and np.all(get_image_transform(8)(Image.new("L", (9, 9))) == -1.0)


def test_rectangular_size_and_bad_arguments():
    img = make_image("RGB", 100, 80)
    out = get_image_transform((48, 64))(img)  # (height, width)
    assert out.shape == (48, 64, 3)
    want = image_transform((48, 64), False, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                           resize_mode="squash")(img).permute(1, 2, 0).numpy()
    assert np.abs(out - want).max() == 0
    with pytest.raises(ValueError, match="square"):
        get_image_transform((48, 64), center_crop=True)
    with pytest.raises(ValueError, match="positive"):
        get_image_transform(0)
    with pytest.raises(TypeError, match="PIL image"):
        get_image_transform(32)(np.zeros((4, 4, 3), np.uint8))


def _jpeg_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    make_image("RGB", w, h).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """Good images interleaved with a truncated JPEG, a text file named .jpg, an empty file, a decompression bomb
    (with MAX_IMAGE_PIXELS lowered so a 200x200 image counts as one) and a missing path."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # bombs are > 2x this; the 40x30 good images are below
    make_image("RGB", 40, 30, seed=1).save(tmp_path / "good0.png")
    jpeg = _jpeg_bytes(40, 30)
    (tmp_path / "good1.jpg").write_bytes(jpeg)
    (tmp_path / "truncated.jpg").write_bytes(_jpeg_bytes(120, 90)[:1500])
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    make_image("L", 200, 200).save(tmp_path / "bomb.png")
    make_image("RGBA", 30, 40, seed=2).save(tmp_path / "good2.png")
    names = ["good0.png", "truncated.jpg", "good1.jpg", "notes.jpg", "empty.jpg", "bomb.png", "missing.jpg",
             "good2.png"]
    return tmp_path, [tmp_path / n for n in names]


@pytest.mark.parametrize("bad", ["truncated.jpg", "notes.jpg", "empty.jpg", "bomb.png"])
def test_load_images_raises_naming_the_file(image_folder, bad: str):
    folder, _ = image_folder
    tf = get_image_transform(32)
    with pytest.raises(ValueError, match=re.escape(str(folder / bad))):
        load_images([folder / "good0.png", folder / bad], tf)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_images([folder / "missing.jpg"], tf)


def test_load_images_skips_and_records(image_folder):
    folder, paths = image_folder
    tf = get_image_transform(32)
    pil = make_image("P", 50, 20)
    batch, failures = load_images([*paths, pil], tf, on_error="skip")
    good = [0, 2, 7]
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
    for row, i in zip(batch[:3], good, strict=True):  # good images, in order, preprocessed like the reference
        with Image.open(paths[i]) as img:
            assert np.abs(row - oracle(32)(img)).max() == 0
    assert np.array_equal(batch[3], tf(pil))
    assert [(i, src) for i, src, _ in failures] == [(i, str(paths[i])) for i in (1, 3, 4, 5, 6)]
    errors = {src.rsplit("/", 1)[-1]: err for _, src, err in failures}
    assert "DecompressionBomb" in errors["bomb.png"]
    assert "not found" in errors["missing.jpg"]
    assert all(isinstance(e, str) and e for e in errors.values())


def test_load_images_edge_cases(image_folder):
    folder, paths = image_folder
    tf = get_image_transform((16, 24))
    batch, failures = load_images([paths[1], paths[3]], tf, on_error="skip")
    assert batch.shape == (0, 16, 24, 3) and len(failures) == 2
    batch, failures = load_images([], tf)
    assert batch.shape == (0, 16, 24, 3) and failures == []
    batch, _ = load_images((str(p) for p in paths[:1]), tf)  # str paths, any iterable
    assert batch.shape == (1, 16, 24, 3)
    with pytest.raises(ValueError, match="on_error"):
        load_images(paths[:1], tf, on_error="ignore")


def test_reuse_freed_images_raises_pillows_block_cache_and_never_lowers_it():
    from pe_jax.preprocess.image import reuse_freed_images

    before = Image.core.get_blocks_max()
    try:
        Image.core.set_blocks_max(0)  # Pillow's default
        reuse_freed_images(3)
        assert Image.core.get_blocks_max() == 12
        reuse_freed_images(1)  # another job with fewer threads keeps the larger cache
        assert Image.core.get_blocks_max() == 12
        # pixels do not depend on reused blocks: the same image twice, with blocks from the cache the second time
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 97, 3), np.uint8))
        tf = get_image_transform(32)
        first = tf(img)
        assert np.array_equal(first, tf(img.copy()))
    finally:
        Image.core.set_blocks_max(before)


def test_an_image_file_larger_than_any_decodable_image_is_refused_unread(tmp_path):
    """A 3 GB sparse .jpg was read whole (3.5 GB of memory) only to be rejected: now refused by its size."""
    import resource

    from pe_jax.preprocess.image import ByteRange, decode_image, max_image_bytes

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(max_image_bytes() + 1)  # sparse: no disk used
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"big.jpg: \d+ bytes, more than any image Pillow decodes holds"):
        decode_image(big)
    with pytest.raises(ValueError, match="not read"):
        decode_image(ByteRange(str(big), 0, max_image_bytes() + 1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was read
