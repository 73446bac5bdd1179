"""Images: the one decoder (a path, a byte range of a file such as a tar member, or bytes) and the
reference preprocessing, bit-identical to `core/vision_encoder/transforms.py` (OpenCLIP's `meta` transform).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from pe_jax import storage
from pe_jax.errors import InputError


class ByteRange(NamedTuple):
    """`size` bytes at `offset` of the regular file `path` (a tar member, indexed once by pe_jax.data.sources).

    Args:
        path: the file (a local path or an object-store URL).
        offset: where the bytes start.
        size: how many bytes.

    Example:
        >>> import io, os, tempfile
        >>> data = io.BytesIO()
        >>> Image.new("RGB", (8, 6)).save(data, "PNG")
        >>> path = os.path.join(tempfile.mkdtemp(), "blob")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(b"header" + data.getvalue())
        >>> decode_image(ByteRange(path, 6, len(data.getvalue()))).size
        (8, 6)
    """

    path: str
    offset: int
    size: int


# What a broken, truncated, non-image or oversized file raises while PIL opens or decodes it.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def max_image_bytes() -> int | None:
    """The most bytes an image file Pillow would decode can hold: its pixel limit (Image.MAX_IMAGE_PIXELS) at 8
    bytes a pixel (16-bit RGBA, stored uncompressed), a quarter more and 64 MiB for headers; None without a limit.
    A larger file is refused unread (a 3 GB sparse .jpg was read whole to be rejected)."""
    pixels = Image.MAX_IMAGE_PIXELS
    return int(pixels * 8 * 1.25) + (64 << 20) if pixels else None


def _check_size(path: str, size: int):
    cap = max_image_bytes()
    if cap is not None and size > cap:
        raise InputError(f"{path}: {size} bytes, more than any image Pillow decodes holds ({cap} bytes at its "
                         f"{Image.MAX_IMAGE_PIXELS}-pixel limit); not read")


def read_image_bytes(source: str | os.PathLike | ByteRange) -> bytes:
    """The bytes of a regular file or of a byte range of one, local or an object-store URL (storage.read_bytes:
    FIFOs, devices and folders are refused unread), refused unread when larger than `max_image_bytes`.

    Args:
        source: a path or URL, or a ByteRange of one (a tar member).

    Example:
        >>> read_image_bytes(ByteRange("shards/00000.tar", 1536, 10240))  # doctest: +SKIP
    """
    if isinstance(source, ByteRange):
        return storage.read_bytes(source.path, source.offset, source.size,
                                  check_size=functools.partial(_check_size, source.path))
    return storage.read_bytes(source, check_size=functools.partial(_check_size, os.fspath(source)))


read_bytes = read_image_bytes  # the former name


def decode_image(source: str | os.PathLike | ByteRange | bytes) -> Image.Image:
    """A fully decoded PIL image (a truncated file fails here, not later in the transform).

    Args:
        source: a path or URL, a `ByteRange` of a file (a tar member), or the encoded bytes.

    Example:
        >>> import io
        >>> data = io.BytesIO()
        >>> Image.new("RGB", (8, 6)).save(data, "PNG")
        >>> decode_image(data.getvalue()).size
        (8, 6)
    """
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    data = source if is_bytes else read_image_bytes(source)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # PIL would name the BytesIO object: name the file
        name = "bytes" if is_bytes else source.path if isinstance(source, ByteRange) else os.fspath(source)
        raise Image.UnidentifiedImageError(f"cannot identify image file {name}") from None
    img.load()
    return img


def reuse_freed_images(threads: int):
    """Let Pillow keep up to 4 freed image blocks per decoding thread for reuse (`PILLOW_BLOCKS_MAX`, 0 by
    default). Memory handed back to the OS after every image stalls the other threads of the process (page
    faults, TLB shootdowns): two decoding threads on 2 cores ran 1.68x one thread before this, 1.81x after
    (benchmarks/bench_embed.py). Process-wide and only ever raised; a block is at most Pillow's block size."""
    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 4 * threads))


# float32 value of every uint8 after ToTensor (x / 255, true division) and Normalize(0.5, 0.5), as torchvision computes.
_PIXEL_LUT = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


class ImageTransform:
    """PIL image -> float32 [H, W, 3] (channels last), bit-identical to the reference `get_image_transform`."""

    def __init__(self, image_size: int | tuple[int, int], center_crop: bool = False):
        h, w = (image_size, image_size) if isinstance(image_size, int | np.integer) else tuple(image_size)
        if min(h, w) < 1:
            raise InputError(f"image_size must be positive, got {image_size}")
        if center_crop and h != w:
            raise InputError(f"center_crop needs a square image_size, got {image_size}")
        self.size, self.center_crop = (int(h), int(w)), center_crop

    def __call__(self, img: Image.Image) -> np.ndarray:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        h, w = self.size
        if self.center_crop:
            img = self._resize_short_side_and_crop(img, h)
        elif img.size != (w, h):  # torchvision returns the image untouched when it already has the size
            img = img.resize((w, h), Image.Resampling.BILINEAR)  # squash; PIL antialiases when downsampling
        # RGB conversion comes after the resize, as in the reference: PIL resizes RGBA premultiplied, P with NEAREST.
        # (convert("RGB") of an RGB image is a copy; np.take scales over decoding threads, fancy indexing less.)
        return np.take(_PIXEL_LUT, np.asarray(img if img.mode == "RGB" else img.convert("RGB")))

    @staticmethod
    def _resize_short_side_and_crop(img: Image.Image, size: int) -> Image.Image:
        """torchvision Resize(size) (shorter side to size, the longer one floored) then CenterCrop(size)."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return img.crop((left, top, left + size, top + size))

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, center_crop={self.center_crop})"


def get_image_transform(image_size: int | tuple[int, int], center_crop: bool = False) -> ImageTransform:
    """The reference preprocessing: squash-resize to `image_size` with PIL bilinear (or, with `center_crop`, resize
    the shorter side and crop the centre), convert to RGB, scale to [-1, 1]. Returns float32 [H, W, 3].

    Args:
        image_size: the side (or (height, width)) the model takes: `model.config.vision.image_size`.
        center_crop: keep the aspect ratio and crop instead of squashing.

    Example:
        >>> pixels = get_image_transform(32)(Image.new("RGB", (50, 40), (255, 0, 0)))
        >>> pixels.shape, pixels.dtype, pixels[0, 0].tolist()
        ((32, 32, 3), dtype('float32'), [1.0, -1.0, -1.0])
    """
    return ImageTransform(image_size, center_crop)


def load_images(items: Iterable[str | os.PathLike | Image.Image], transform: Callable[[Image.Image], np.ndarray], *,
                on_error: Literal["raise", "skip"] = "raise") -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Open and preprocess image paths (or PIL images) into one float32 batch [N, H, W, 3].

    A file that cannot be read (missing, empty, corrupt, not an image, a decompression bomb) raises a `ValueError`
    naming it (`on_error="raise"`, a missing file raises `FileNotFoundError`), or is left out of the batch and
    reported as `(index, source, error message)` in the returned failure list (`on_error="skip"`).

    Args:
        items: image paths (or URLs) and PIL images.
        transform: PIL image -> float32 [H, W, 3], e.g. `get_image_transform(224)`.
        on_error: "raise" at the first unreadable file, or "skip" it and report it.

    Example:
        >>> images, failures = load_images([Image.new("RGB", (8, 8)), "missing.png"], get_image_transform(32),
        ...                                on_error="skip")
        >>> images.shape, [(i, source) for i, source, _ in failures]
        ((1, 32, 32, 3), [(1, 'missing.png')])
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    arrays, failures = [], []
    for i, item in enumerate(items):
        source = f"<{type(item).__name__} at index {i}>" if isinstance(item, Image.Image) else os.fspath(item)
        try:
            if isinstance(item, Image.Image):
                arrays.append(transform(item))
                continue
            arrays.append(transform(decode_image(source)))
        except FileNotFoundError as e:
            if on_error == "raise":
                raise
            failures.append((i, source, f"file not found: {e}"))
        except DECODE_ERRORS as e:
            if on_error == "raise":
                raise InputError(f"cannot read image {source}: {type(e).__name__}: {e}") from e
            failures.append((i, source, f"{type(e).__name__}: {e}"))
    if arrays:
        return np.stack(arrays), failures
    h, w = getattr(transform, "size", (0, 0))
    return np.zeros((0, h, w, 3), np.float32), failures


def image_batches(sources: Sequence[str | os.PathLike], transform: Callable[[Image.Image], np.ndarray],
                  batch_size: int, failures: list) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Decoded batches of up to `batch_size` images, one batch in memory at a time: yields (images, indices
    into `sources` of the images decoded). Files that do not decode are appended to `failures` as
    {"path", "error"} and left out; a batch with no image left is not yielded.

    Args:
        sources: image paths (or URLs).
        transform: PIL image -> float32 [H, W, 3], e.g. `get_image_transform(224)`.
        batch_size: images per batch.
        failures: a list the unreadable files are appended to.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> paths = [os.path.join(folder, f"{i}.png") for i in range(3)]
        >>> for path in paths:
        ...     Image.new("RGB", (8, 8)).save(path)
        >>> failures = []
        >>> batches = image_batches([*paths, "missing.png"], get_image_transform(32), 2, failures)
        >>> [(images.shape, kept) for images, kept in batches]
        [((2, 32, 32, 3), [0, 1]), ((1, 32, 32, 3), [2])]
        >>> [f["path"] for f in failures]
        ['missing.png']
    """
    for start in range(0, len(sources), batch_size):
        images, skipped = load_images(sources[start:start + batch_size], transform, on_error="skip")
        bad = {i for i, _, _ in skipped}
        failures.extend({"path": src, "error": err} for _, src, err in skipped)
        kept = [start + i for i in range(min(batch_size, len(sources) - start)) if i not in bad]
        if kept:
            yield images, kept
