"""PE-Lang tiling: a squashed thumbnail plus up to N tiles from the best grid, bit-identical to transformers'
`PerceptionLMImageProcessor` ("thumb+tile", the input PE-Lang's -Tiling checkpoints and PerceptionLM were trained on).

The processor resizes uint8 images with torch's antialiased bicubic (a = -0.5), which on CPU runs in integer
arithmetic: per axis, double-precision filter weights are normalized, scaled to int16 at a precision chosen from
the largest weight, and each pass rounds and clamps to uint8 (width first, then height). PIL's bicubic is the same
filter at a fixed 22-bit precision and differs by up to 2 levels, so this module carries its own resampler.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from pe_jax.errors import UsageError

TILE_SIZE, MAX_TILES = 448, 36
# Each uint8 after rescale (1/255) and Normalize(0.5, 0.5), fused as transformers does: (x - 127.5) / 127.5.
_PIXEL_LUT = (np.arange(256, dtype=np.float32) - np.float32(127.5)) / np.float32(127.5)


class Tiles(NamedTuple):
    """`tiles`: float32 [1 + cols * rows, T, T, 3], the thumbnail first, then the grid's tiles row by row;
    `grid`: (cols, rows)."""

    tiles: np.ndarray
    grid: tuple[int, int]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (torch's antialias filter, PIL's BICUBIC)."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.cache
def _int16_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first source index [n_out], int16-valued weights [n_out, K], precision) of one resized axis, as torch's
    `_compute_index_ranges_int16_weights` (antialias, align_corners=False) computes them."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C truncation: the values are >= -0.5
    size = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - first, 0, taps)
    j = np.arange(taps)
    w = np.where(j < size[:, None], _cubic((j + first[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), 0.0)
    wmax = w.max()
    precision = 0
    while precision < 22 and int(0.5 + wmax * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    ints = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int32)
    return first, ints, precision


def _resample_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """One antialiased bicubic pass over `axis` of a uint8 image, rounded and clamped to uint8 like torch's."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    first, w, precision = _int16_weights(n_in, n_out)
    x = np.moveaxis(x, axis, 0)
    acc = np.full((n_out, *x.shape[1:]), 1 << (precision - 1), np.int32)
    extra = (slice(None),) + (None,) * (x.ndim - 1)
    for k in range(w.shape[1]):  # taps beyond a row's window have weight 0; their index is clamped in range
        acc += x[np.minimum(first + k, n_in - 1)].astype(np.int32) * w[:, k][extra]
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize_bicubic_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C], equal to torchvision's `resize(..., BICUBIC, antialias=True)`
    of the same uint8 tensor on CPU (which PerceptionLM's image processor calls).

    Args:
        image: uint8 array, channels last.
        height: output height in pixels (>= 1).
        width: output width in pixels (>= 1).

    Example:
        >>> resize_bicubic_uint8(np.zeros((10, 20, 3), np.uint8), 5, 5).shape
        (5, 5, 3)
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise UsageError(f"expected a uint8 [H, W, C] image, got {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise UsageError(f"output size must be positive, got {height} x {width}")
    return _resample_axis(_resample_axis(image, width, 1), height, 0)


@functools.cache
def _arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with cols * rows <= max_tiles, in the processor's order: grouped by aspect ratio in the
    order each ratio first appears counting tiles down from max_tiles (ties in the grid choice go to the later)."""
    groups: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for cols in sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}):
            groups.setdefault(cols / (n // cols), []).append((cols, n // cols))
    return tuple(g for group in groups.values() for g in group)


def _fitted_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[float, float]:
    """The image's size when scaled (aspect kept) into the canvas, rounded as the processor does."""
    scale = width / height
    factor = min(canvas_w / width, canvas_h / height)
    if scale > 1.0:
        new_w = factor * width
        return new_w, math.floor(new_w / scale)
    new_h = factor * height
    return math.floor(new_h * scale), new_h


def choose_grid(width: int, height: int, tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """The (cols, rows) grid PerceptionLM tiles an image of `width` x `height` into: among the grids whose canvas
    holds the image without downsampling, the one giving the image's shorter side the most pixels (the biggest
    canvas on ties); if none holds it, the grid of the closest aspect ratio (most tiles along the long side).

    Args:
        width: image width in pixels.
        height: image height in pixels.
        tile_size: tile side in pixels.
        max_tiles: most tiles in the grid (1: always (1, 1)).

    Example:
        >>> choose_grid(1000, 500, 448, 4)
        (2, 1)
    """
    if max_tiles <= 1:
        return (1, 1)
    scale, best, best_size = width / height, None, None
    for cols, rows in _arrangements(max_tiles):
        if cols * tile_size < width or rows * tile_size < height:
            continue
        size = _fitted_size(width, height, cols * tile_size, rows * tile_size)
        if best is None or (scale < 1.0 and size[0] >= best_size[0]) or (scale >= 1.0 and size[1] >= best_size[1]):
            best, best_size = (cols, rows), size
    if best is not None:
        return best
    groups: dict[float, list[tuple[int, int]]] = {}
    for g in _arrangements(max_tiles):
        groups.setdefault(g[0] / g[1], []).append(g)
    if scale >= 1:
        ratio = min((k for k in groups if k <= scale), key=lambda k: abs(k - scale))
        return max(groups[ratio], key=lambda g: g[0])
    ratio = min((k for k in groups if k > scale), key=lambda k: abs(1 / k - 1 / scale))
    return max(groups[ratio], key=lambda g: g[1])


def _rgb(image) -> np.ndarray:
    """uint8 [H, W, 3]: a PIL image converted as transformers converts it (transparency composited onto white),
    or an array taken as is."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise UsageError(f"expected a PIL image or a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    return array


def tile_image(image, tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES, thumbnail: bool = True) -> Tiles:
    """PE-Lang's tiling of one image, equal bit for bit to transformers' `PerceptionLMImageProcessor` with the same
    `tile_size` and `max_num_tiles` (`vision_input_type="thumb+tile"`; `thumbnail=False` gives the tiles alone).
    The thumbnail is the whole image squashed to one tile; the grid's canvas is the image squashed to
    cols x rows tiles. Pixels are scaled to [-1, 1]. Tiles are a batch: `model.encode_image(tiles)`.

    Args:
        image: a PIL image (any mode) or a uint8 [H, W, 3] array.
        tile_size: tile side in pixels (448 for PE-Lang).
        max_tiles: most tiles in the grid (the processor's default is 36).
        thumbnail: put the squashed thumbnail first.

    Returns:
        Tiles(tiles float32 [1 + cols * rows, tile_size, tile_size, 3], grid (cols, rows)).

    Example:
        >>> t = tile_image(Image.new("RGB", (1000, 500)), max_tiles=4)
        >>> t.tiles.shape, t.grid
        ((3, 448, 448, 3), (2, 1))
    """
    if tile_size < 1 or max_tiles < 1:
        raise UsageError(f"tile_size and max_tiles must be >= 1, got {tile_size} and {max_tiles}")
    rgb = _rgb(image)
    height, width = rgb.shape[:2]
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    canvas = resize_bicubic_uint8(rgb, rows * tile_size, cols * tile_size)
    tiles = canvas.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, tile_size, tile_size, 3)
    if thumbnail:
        thumb = canvas if (cols, rows) == (1, 1) else resize_bicubic_uint8(rgb, tile_size, tile_size)
        tiles = np.concatenate([thumb[None], tiles])
    return Tiles(np.take(_PIXEL_LUT, tiles), (cols, rows))


def tiling_transform(tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES, tiles: bool = True):
    """The embedding job's tiled input of an image (`pe-jax embed --tiles N`), of one shape whatever the image so
    that images batch: with `tiles`, (float32 [1 + max_tiles, T, T, 3]: `tile_image`'s thumbnail and tiles, zeros
    after the grid's last tile; int32 [2]: the grid (cols, rows)); without, the thumbnail alone [T, T, 3]
    (`tile_image(...).tiles[0]`, without resizing the grid's canvas).

    Args:
        tile_size: tile side in pixels (the tower's image size).
        max_tiles: most tiles in the grid.
        tiles: give the tiles too (else the thumbnail only).

    Example:
        >>> pixels, grid = tiling_transform(32, 4)(Image.new("RGB", (64, 32)))
        >>> pixels.shape, [int(g) for g in grid]
        ((5, 32, 32, 3), [2, 1])
    """
    if tile_size < 1 or max_tiles < 1:
        raise UsageError(f"tile_size and max_tiles must be >= 1, got {tile_size} and {max_tiles}")

    def thumbnail(image) -> np.ndarray:
        return np.take(_PIXEL_LUT, resize_bicubic_uint8(_rgb(image), tile_size, tile_size))

    def padded(image) -> tuple[np.ndarray, np.ndarray]:
        tiled = tile_image(image, tile_size, max_tiles)
        out = np.zeros((1 + max_tiles, tile_size, tile_size, 3), np.float32)
        out[: len(tiled.tiles)] = tiled.tiles
        return out, np.asarray(tiled.grid, np.int32)

    return padded if tiles else thumbnail


__all__ = ["MAX_TILES", "TILE_SIZE", "Tiles", "choose_grid", "resize_bicubic_uint8", "tile_image", "tiling_transform"]
