"""An embedding job's options: one frozen value, checked once when it is made (before any model loads), then
passed down to the listing, the pipeline and each engine; `for_model` adds what needs the model (its pooling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pe_jax.embed.layout import LAYOUTS, towers
from pe_jax.errors import UsageError, check_positive

ENGINES = ("local", "ray")  # pe_jax.embed.run's engines
DTYPES = ("float16", "float32")  # dtypes of the stored rows
check_sizes = check_positive  # the name pe_jax.embed exported first
MAX_WORKERS = 1024  # decoding threads: more only wait on the GIL and the disk (10**9 ended in a traceback)


@dataclass(frozen=True)
class EmbedOptions:
    """How a job embeds (what `pe-jax embed` takes besides its input, output and weights).

    Args:
        modality: image, text, video, or image,text (both towers of each sample in one pass).
        layout: pe-jax or clip-retrieval (`pe_jax.embed.layout`).
        batch_size: inputs per device batch.
        part_size: items per output part (tar shards: one part a shard).
        dtype: float16 or float32, of the stored rows.
        normalize: unit-norm rows.
        layer_idx: image features of this block (None: the last).
        pooling: attn, mean or cls (None: the model's default, see `for_model`).
        workers: decoding threads.
        num_frames: frames a video is sampled to.
        progress: show a progress bar.
        tiles: PE-Lang tiling (`pe_jax.preprocess.tiling`) with up to this many tiles; 0: off (the plain
            transform). A row is then the feature of the image's thumbnail (tile size = the tower's image size).
        tile_features: with `tiles`, also encode the tiles and write their features (`tiles/part-N.npy`).

    Example:
        >>> EmbedOptions(modality="image,text", layout="clip-retrieval").towers
        ('image', 'text')
        >>> EmbedOptions(batch_size=0)
        Traceback (most recent call last):
        ...
        pe_jax.errors.UsageError: --batch-size must be >= 1, got 0
    """

    modality: str = "image"
    layout: str = "pe-jax"
    batch_size: int = 32
    part_size: int = 1000
    dtype: str = "float16"
    normalize: bool = True
    layer_idx: int | None = None
    pooling: str | None = None
    workers: int = 4
    num_frames: int = 8
    progress: bool = True
    tiles: int = 0
    tile_features: bool = False

    def __post_init__(self):
        towers(self.modality)  # a known modality
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}; use {' or '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; use {' or '.join(DTYPES)}")
        check_positive(batch_size=self.batch_size, part_size=self.part_size, workers=self.workers,
                       num_frames=self.num_frames)
        if self.workers > MAX_WORKERS:
            raise UsageError(f"--workers must be <= {MAX_WORKERS} (decoding threads), got {self.workers}")
        if self.pooling is not None:
            from pe_jax.features import POOLINGS  # imports jax: only where a pooling is named

            if self.pooling not in POOLINGS:
                raise UsageError(f"unknown pooling {self.pooling!r}; use {', '.join(POOLINGS)}")
        if "image" not in self.towers and (self.layer_idx is not None or self.pooling is not None):
            raise UsageError("--layer-idx and --pooling apply to image embeddings")
        if self.tiles < 0:
            raise UsageError(f"--tiles must be >= 0 (0: no tiling), got {self.tiles}")
        if self.tiles and self.modality != "image":
            raise UsageError(f"--tiles applies to --modality image, not {self.modality}")
        if self.tile_features and not self.tiles:
            raise UsageError("--tile-features needs --tiles N (N >= 1)")

    @property
    def towers(self) -> tuple[str, ...]:
        return towers(self.modality)

    @property
    def listed_as(self) -> str:
        """The modality the input is listed as: an image,text job lists images (each with its caption)."""
        return "image" if self.modality == "image,text" else self.modality

    def for_model(self, model) -> EmbedOptions:
        """These options checked against `model` (a text tower where one is needed), the image pooling resolved
        (attn where the model has a head and the layer is the last, else mean)."""
        from pe_jax.features import resolve_pooling

        if self.modality != "image" and not hasattr(model, "text"):
            raise UsageError(f"{self.modality} embeddings need a PE-Core CLIP model")
        if "image" not in self.towers:
            return self
        return dataclasses.replace(self, pooling=resolve_pooling(model, self.layer_idx, self.pooling))

    @classmethod
    def of(cls, options: EmbedOptions | None = None, **kwargs) -> EmbedOptions:
        """`options`, or the options named by keyword (the API's `embed(..., batch_size=64)` form)."""
        if options is None:
            return cls(**kwargs)
        if kwargs:
            raise UsageError(f"pass either options or keyword options, not both ({', '.join(sorted(kwargs))})")
        return options
