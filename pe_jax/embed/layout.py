"""Where an embedding job's part files go: the towers a job embeds and the folder layout it writes.

Two layouts, one commit protocol (each file written whole under a temporary name and renamed; the marker
tower's embeddings last, so a part is done exactly when every tower's embeddings file exists):

* `pe-jax` (the default): `embeddings/part-NNNNN.npy` (the image, video or text rows; with
  `--modality image,text` the image rows), `text_embeddings/part-NNNNN.npy` (the text rows of an image,text
  job), `metadata/part-NNNNN.parquet`.
* `clip-retrieval`: the names `clip-retrieval inference` writes (its `clip_inference/writer.py`):
  `img_emb/img_emb_{i}.npy`, `text_emb/text_emb_{i}.npy`, `metadata/metadata_{i}.parquet`, `i` zero-padded
  to `int(log10(parts)) + 1` digits as there; metadata columns `image_path` (a webdataset sample's key, else
  the image's path, as clip-retrieval's readers give it), `caption`, then the carried columns (the `.json`
  sidecar's fields, a list's columns). autofaiss, embedding-reader (`npy`, `parquet_npy`) and
  `clip-retrieval index` read it unchanged.

Both layouts keep pe-jax's own bookkeeping beside them: `manifest.json`, `failures/part-NNNNN.jsonl`,
`failures/part-NNNNN.checksums.json` (`pe_jax.embed.part_checksums`), `failures.jsonl`, `locks/`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pe_jax import storage
from pe_jax.errors import UsageError

LAYOUTS = ("pe-jax", "clip-retrieval")
MODALITIES = ("image", "text", "video", "image,text")
# (embeddings folder, file stem) of each tower in each layout; the file is STEM + part number + ".npy"
_FOLDERS = {"pe-jax": {"image": ("embeddings", "part-"), "video": ("embeddings", "part-"),
                       "text": ("embeddings", "part-")},
            "clip-retrieval": {"image": ("img_emb", "img_emb_"), "video": ("img_emb", "img_emb_"),
                               "text": ("text_emb", "text_emb_")}}
_SECOND_TEXT = ("text_embeddings", "part-")  # the text tower of a pe-jax image,text job


def towers(modality: str) -> tuple[str, ...]:
    """The towers a modality embeds: "image,text" -> ("image", "text"); others -> (modality,).

    Args:
        modality: image, text, video or image,text.

    Example:
        >>> towers("image,text")
        ('image', 'text')
    """
    if modality not in MODALITIES:
        raise UsageError(f"unknown modality {modality!r}; use {', '.join(MODALITIES)}")
    return tuple(modality.split(","))


@dataclass(frozen=True)
class PartFiles:
    """The part files of one job folder.

    Args:
        out_dir: the job's folder (a path or URL).
        layout: "pe-jax" or "clip-retrieval".
        modality: the job's modality (image, text, video or image,text).
        parts: how many parts the job has (clip-retrieval pads the part number to its digits).

    Example:
        >>> PartFiles("emb", "clip-retrieval", "image,text", 12).embeddings(3, "text")
        'emb/text_emb/text_emb_03.npy'
    """

    out_dir: str
    layout: str = "pe-jax"
    modality: str = "image"
    parts: int = 1

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}; use {' or '.join(LAYOUTS)}")
        towers(self.modality)

    @property
    def towers(self) -> tuple[str, ...]:
        return towers(self.modality)

    def _number(self, n: int) -> str:
        if self.layout == "pe-jax":
            return f"{n:05d}"
        return str(n).zfill(int(math.log10(max(1, self.parts))) + 1)  # clip-retrieval's writer.py

    def folder(self, tower: str) -> str:
        """The embeddings folder of `tower` (what autofaiss and embedding-reader are pointed at)."""
        if self.layout == "pe-jax" and tower == "text" and len(self.towers) == 2:
            return storage.join(self.out_dir, _SECOND_TEXT[0])
        return storage.join(self.out_dir, _FOLDERS[self.layout][tower][0])

    def embeddings(self, n: int, tower: str | None = None) -> str:
        """Part `n`'s embeddings file of `tower` (default: the job's first tower)."""
        tower = tower or self.towers[0]
        if tower not in self.towers:
            raise UsageError(f"{self.out_dir}: a {self.modality} job has no {tower} embeddings")
        stem = _SECOND_TEXT[1] if self.layout == "pe-jax" else _FOLDERS[self.layout][tower][1]
        return storage.join(self.folder(tower), f"{stem}{self._number(n)}.npy")

    def metadata(self, n: int) -> str:
        stem = "part-" if self.layout == "pe-jax" else "metadata_"
        return storage.join(self.out_dir, "metadata", f"{stem}{self._number(n)}.parquet")

    def done(self, n: int) -> bool:
        """A part is done when every tower's embeddings file exists (the marker, written last, is checked first)."""
        return all(storage.exists(self.embeddings(n, t)) for t in self.towers)

    def folders(self) -> list[str]:
        """The part folders the job creates (pe-jax's failures and locks included)."""
        return [*sorted({self.folder(t) for t in self.towers}), *(storage.join(self.out_dir, sub)
                                                                   for sub in ("metadata", "failures", "locks"))]

    def on_disk(self, tower: str | None = None) -> list[tuple[str, str]]:
        """(embeddings file, metadata file) of every finished part of `tower` on disk, in part order."""
        import glob

        tower = tower or self.towers[0]
        first = self.embeddings(0, tower)
        folder, name = first.rsplit("/", 1)
        stem = name[: name.rindex("_" if self.layout == "clip-retrieval" else "-") + 1]
        if storage.is_url(folder):
            paths = storage.glob(storage.join(folder, f"{stem}*.npy"))
        else:
            paths = glob.glob(os.path.join(glob.escape(folder), f"{stem}*.npy"))
        numbers = {p: os.path.basename(p)[len(stem):-len(".npy")] for p in paths}
        # in part order, not name order (part-100000 after part-99999); names that are no part's are not read
        paths = sorted((p for p, i in numbers.items() if i.isdigit()), key=lambda p: int(numbers[p]))
        meta = "part-" if self.layout == "pe-jax" else "metadata_"
        return [(p, storage.join(self.out_dir, "metadata", f"{meta}{numbers[p]}.parquet")) for p in paths]

    def write_order(self) -> tuple[str, ...]:
        """The towers in writing order: the first tower's file last, as the part's marker."""
        return self.towers[::-1]


def part_path(out_dir: str, kind: str, n: int, ext: str) -> str:
    """Part `n`'s file of pe-jax's own `kind` (failures, locks, tiles; the metadata of the pe-jax layout).

    Args:
        out_dir: the job's folder; kind: the sub-folder; n: the part; ext: the file's extension.

    Example:
        >>> part_path("emb", "failures", 3, "jsonl")
        'emb/failures/part-00003.jsonl'
    """
    return storage.join(out_dir, kind, f"part-{n:05d}.{ext}")


def tiles_path(out_dir: str, n: int) -> str:
    """Where part `n`'s tiles' rows are (`--tile-features`): `tiles/part-NNNNN.npy` in every layout."""
    return part_path(out_dir, "tiles", n, "npy")


def clip_retrieval_table(table, sources_are_keys: list[bool] | None):
    """A pe-jax metadata table (key, source, caption or text, carried columns, extra) as clip-retrieval's:
    `image_path` (the key where `sources_are_keys[i]`, i.e. a webdataset sample, else the source path),
    `caption`, then the other columns; a carried column named `image_path` becomes `json_image_path`. A text
    job (`sources_are_keys` None) keeps its key and source, its text as `caption`.

    Args:
        table: a pyarrow Table with `key` and `source` columns.
        sources_are_keys: per row, whether clip-retrieval names that sample by its key (tar samples).

    Example:
        >>> import pyarrow as pa
        >>> t = pa.table({"key": ["a"], "source": ["s.tar::a.jpg"], "caption": ["a cat"], "extra": [None]})
        >>> clip_retrieval_table(t, [True]).column_names
        ['image_path', 'caption', 'extra']
    """
    import pyarrow as pa

    names = {"text": "caption", "image_path": "json_image_path"}
    columns, fields = [], []
    if sources_are_keys is not None:
        keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
        columns.append(pa.array([k if is_key else s for k, s, is_key in zip(keys, sources, sources_are_keys,
                                                                            strict=True)], pa.string()))
        fields.append(pa.field("image_path", pa.string()))
    for f, col in zip(table.schema, table.columns, strict=True):
        if sources_are_keys is not None and f.name in ("key", "source"):
            continue
        columns.append(col)
        fields.append(f.with_name(names.get(f.name, f.name)))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
