"""Video frames for `CLIP.encode_video`, sampled as the reference evaluation does.

Frame indices are `int(i * (T - 1) / (N - 1))` for i in 0..N-1 (the middle frame when N == 1), over the
T decoded frames. Decoding uses PyAV (`pip install -e '.[video]'` in the checkout, or `pip install av`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from pe_jax.errors import InputError, MissingDependency, install_hint
from pe_jax.storage.files import check_regular_file


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    if total_frames < 1:
        raise InputError("the video has no frames")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return [total_frames // 2]
    return [int(i * (total_frames - 1) / (num_frames - 1)) for i in range(num_frames)]


def _decode(path: str, wanted: set[int] | None):
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise InputError("no video stream")
        stream = container.streams.video[0]
        count, frames = 0, {}
        for frame in container.decode(stream):
            if wanted is None or count in wanted:
                frames[count] = frame.to_image()  # RGB PIL image
            count += 1
        return count, frames


def load_frames(path: str | os.PathLike, num_frames: int = 8, *, image_size: int | None = 224,
                transform: Callable | None = None) -> np.ndarray:
    """[num_frames, H, W, 3] float32 frames of the video at `path`, preprocessed with `transform`
    (default: the reference image transform at `image_size`).

    Args:
        path: a video file PyAV decodes (mp4, webm, ...).
        num_frames: frames sampled evenly over the video, as the reference evaluation does.
        image_size: the side of the default transform (`model.config.vision.image_size`).
        transform: PIL image -> float32 [H, W, 3] instead.

    Example:
        >>> frames = load_frames("clip.mp4", num_frames=8, image_size=224)  # doctest: +SKIP
        >>> model.encode_video(frames[None]).shape  # doctest: +SKIP
        (1, 1024)
    """
    try:
        import av
    except ImportError:
        raise MissingDependency(f"video decoding needs PyAV: {install_hint('video', 'av')}") from None
    if transform is None:
        from pe_jax.preprocess.image import get_image_transform

        transform = get_image_transform(image_size)
    path = os.fspath(path)
    check_regular_file(path, missing=f"video not found: {path}")  # a FIFO would block the decoder
    try:
        total, _ = _decode(path, set())  # containers do not always know their frame count: count by decoding
        indices = frame_indices(total, num_frames)
        _, frames = _decode(path, set(indices))
    except (av.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"{path}: cannot decode video ({e})") from None
    return np.stack([np.asarray(transform(frames[i]), np.float32) for i in indices])
