"""Search an embedding job's rows from a text or image query: faiss indexes over a job's folder.

`build_index` makes a faiss index of a job's image (or text) rows with faiss's own `index_factory` (inner
product: rows are unit-norm by default), for folders that fit in memory; autofaiss builds large ones from the
same folder (`img_emb/` of a `--layout clip-retrieval` job, or `embeddings/`), in its own environment (it pins
numpy<2). `search` encodes a query with the checkpoint and the settings the job recorded in its manifest
(weights checked by content hash, preprocessing, layer, pooling, normalization) and returns the nearest rows
with their metadata. Row i of an index is row i of the job (its finished parts in order), as autofaiss and
embedding-reader read them.
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np

from pe_jax import storage
from pe_jax.embed.output import part_files, read_metadata_file
from pe_jax.errors import MissingDependency, NotFound, UsageError, install_hint
from pe_jax.storage.atomic import atomic_file, write_json

INDEX_FILE, INFO_FILE = "knn.index", "pe_jax_index.json"  # knn.index: the name autofaiss's docs use


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency(f"faiss is not installed: {install_hint('index', 'faiss-cpu')}") from None
    return faiss


def _manifest(embeddings: str) -> dict:
    path = storage.join(embeddings, "manifest.json")
    if not storage.exists(path):
        raise NotFound(f"{embeddings}: no manifest.json (not a pe-jax embedding job's folder)")
    try:  # capped, a regular file only: a FIFO named manifest.json blocked
        settings = json.loads(read_metadata_file(path)).get("settings")
    except (ValueError, AttributeError, RecursionError) as e:
        raise UsageError(f"{path}: not a manifest ({e})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{path}: not a pe-jax embed manifest (no settings object)")
    return settings


def build_index(embeddings: str, output: str, *, tower: str | None = None, factory: str = "Flat") -> dict:
    """A faiss index of an embedding job's rows, written to `output/knn.index` with `output/pe_jax_index.json`
    (the job's folder, the tower, the factory, the row count), which `search` reads.

    Args:
        embeddings: the embedding job's output folder (either layout).
        output: the index folder to write (made if missing).
        tower: "image" or "text" rows of an image,text job (default: the job's first tower).
        factory: a faiss `index_factory` string, e.g. "Flat" (exact), "HNSW32", "IVF256,Flat".

    Example:
        >>> build_index("emb/", "index/")  # doctest: +SKIP
        {'rows': 1000, 'dim': 512, 'tower': 'image', 'factory': 'Flat', ...}
    """
    faiss = _faiss()
    if storage.is_url(output):
        raise UsageError(f"{output}: the index folder must be local (faiss writes a file)")
    settings = _manifest(embeddings)
    files = part_files(embeddings, settings)
    tower = tower or files.towers[0]
    parts = files.on_disk(tower)
    if not parts:
        raise NotFound(f"{embeddings}: no finished {tower} embeddings to index")
    rows = np.concatenate([_load(p) for p, _ in parts]).astype(np.float32)
    try:
        index = faiss.index_factory(rows.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UsageError(f"--factory {factory!r}: faiss cannot build it ({str(e).strip().splitlines()[-1]})") from None
    if not index.is_trained:
        index.train(rows)
    index.add(rows)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, INDEX_FILE)
    with atomic_file(path) as tmp:  # faiss writes a file name
        faiss.write_index(index, tmp)
    info = {"embeddings": os.path.abspath(embeddings) if not storage.is_url(embeddings) else embeddings,
            "tower": tower, "factory": factory, "rows": int(index.ntotal), "dim": int(rows.shape[1])}
    write_json(os.path.join(output, INFO_FILE), info, indent=1)
    return info


def _load(path: str) -> np.ndarray:
    with storage.open_file(path) as f:  # a path or a URL
        return np.load(io.BytesIO(f.read()))


def _open_index(index: str, embeddings: str | None):
    """(faiss index, the job's folder): `index` is a folder written by `build_index`, or an index file
    (autofaiss's) with `embeddings` naming the job."""
    faiss = _faiss()
    path, info = index, {}
    if os.path.isdir(index):
        path = os.path.join(index, INDEX_FILE)
    if os.path.isfile(os.path.join(os.path.dirname(path), INFO_FILE)):
        info = json.loads(read_metadata_file(os.path.join(os.path.dirname(path), INFO_FILE)))
    if not os.path.isfile(path):
        raise NotFound(f"{index}: no faiss index there (a knn.index file, or a folder of pe-jax index)")
    embeddings = embeddings or info.get("embeddings")
    if embeddings is None:
        raise UsageError(f"{index}: which embedding job does it index? pass --embeddings (the job's folder)")
    try:
        return faiss.read_index(path), embeddings
    except RuntimeError as e:
        raise UsageError(f"{path}: not a faiss index ({str(e).strip().splitlines()[-1]})") from None


def encode_query(model, settings: dict, *, text: str | None = None, image: str | None = None) -> np.ndarray:
    """One query's embedding [1, D] (float32) as the embedding job computed its rows: text through the text
    tower, an image file through the job's transform, layer, pooling and normalization.

    Args:
        model: the job's model (`pe_jax.resolve_model(checkpoint).load()`).
        settings: the job's manifest settings.
        text: a text query, or
        image: the path of an image query.

    Example:
        >>> q = encode_query(model, settings, text="a red car")  # doctest: +SKIP
    """
    from pe_jax.preprocess import get_image_transform, get_text_tokenizer
    from pe_jax.preprocess.image import decode_image

    normalize = settings.get("normalize", True)
    if (text is None) == (image is None):
        raise UsageError("give one query: --text or --image")
    if text is not None:
        if not hasattr(model, "text"):
            raise UsageError("a text query needs a PE-Core CLIP checkpoint (this one has no text tower)")
        tokens = get_text_tokenizer(model.config.text.context_length)([text])
        out = _encoder("text", normalize, None, None)(model, tokens)
    else:
        try:
            pixels = get_image_transform(settings["image_size"])(decode_image(image))[None]
        except FileNotFoundError:
            raise NotFound(f"--image {image}: no such file") from None
        except Exception as e:  # noqa: BLE001 (any decoding problem: one line naming the file)
            raise UsageError(f"--image {image}: cannot decode it ({type(e).__name__}: {e})") from None
        out = _encoder("image", normalize, settings.get("layer_idx"), settings.get("pooling"))(model, pixels)
    return np.asarray(out, np.float32)


@functools.cache  # one compiled program per feature choice, reused by every query of this process
def _encoder(tower: str, normalize: bool, layer_idx: int | None, pooling: str | None):
    import jax

    from pe_jax.features import features

    if tower == "text":
        return jax.jit(lambda m, x: m.encode_text(x, normalize=normalize))
    return jax.jit(lambda m, x: features(m, x, layer_idx=layer_idx, pooling=pooling, normalize=normalize))


def _rows(embeddings: str, settings: dict, ids: list[int]) -> dict[int, dict]:
    """The metadata rows `ids` of the job's finished parts, in order (only the parts holding them are read)."""
    import pyarrow.parquet as pq

    wanted, out, start = sorted(set(ids)), {}, 0
    for _, meta in part_files(embeddings, settings).on_disk():
        with storage.open_file(meta) as f:
            count = pq.ParquetFile(f).metadata.num_rows
        inside = [i for i in wanted if start <= i < start + count]
        if inside:
            with storage.open_file(meta) as f:
                table = pq.read_table(f)
            out.update({i: table.slice(i - start, 1).to_pylist()[0] for i in inside})
        start += count
    return out


class Searcher:
    """An index, its job's settings and the job's checkpoint, loaded once, for many queries (`search` is one).

    Args:
        index: a folder written by `build_index` (`pe-jax index`), or a faiss index file (autofaiss's,
            `clip-retrieval index`'s image.index).
        checkpoint: the job's checkpoint (its weights must be the ones the job recorded).
        embeddings: the job's folder (default: the one `build_index` recorded).
        model: the preset, for a PyTorch checkpoint file (default: the job's).
        verify: check a pe_jax checkpoint's checksums (None: unless PE_JAX_VERIFY=0).

    Example:
        >>> searcher = Searcher("index/", "ckpt/")  # doctest: +SKIP
        >>> [hit["key"] for hit in searcher(text="a photo of a dog", k=5)]  # doctest: +SKIP
    """

    def __init__(self, index: str, checkpoint: str, *, embeddings: str | None = None, model: str | None = None,
                 verify: bool | None = None):
        from pe_jax.pretrained import resolve_model

        self.name = index
        self.index, self.embeddings = _open_index(index, embeddings)
        self.settings = _manifest(self.embeddings)
        # A PyTorch file without --model: the job's preset.
        resolved = resolve_model(checkpoint, model=model, default_model=self.settings.get("preset"))
        self.model = resolved.load(verify=verify)
        # named as the job named them: the load's verification (or, with verify off, the recorded hash) is reused
        weights = resolved.weights_id()
        if self.settings.get("weights") != weights:
            raise UsageError(f"{checkpoint}: other weights than the embedding job {self.embeddings} used "
                             f"({weights} vs {self.settings.get('weights')}); search with the job's checkpoint")

    def __call__(self, *, text: str | None = None, image: str | None = None, k: int = 10) -> list[dict]:
        """The `k` rows nearest a text or an image file: [{rank, row, score, key, caption, metadata}]."""
        if k < 1:
            raise UsageError(f"-k must be >= 1, got {k}")
        query = encode_query(self.model, self.settings, text=text, image=image)
        if query.shape[1] != self.index.d:
            raise UsageError(f"{self.name}: the index holds {self.index.d}-dim rows, the query is "
                             f"{query.shape[1]}-dim")
        scores, ids = self.index.search(query, min(k, self.index.ntotal))
        hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        rows = _rows(self.embeddings, self.settings, [i for _, i in hits])
        if len(rows) != len(hits):
            raise UsageError(f"{self.name} holds rows that {self.embeddings} has no metadata for (rebuilt since?)")
        return [{"rank": r + 1, "row": i, "score": s, "key": rows[i].get("key", rows[i].get("image_path")),
                 "caption": rows[i].get("caption", rows[i].get("text")), "metadata": rows[i]}
                for r, (s, i) in enumerate(hits)]


def search(index: str, checkpoint: str, *, text: str | None = None, image: str | None = None, k: int = 10,
           embeddings: str | None = None, model: str | None = None, verify: bool | None = None) -> list[dict]:
    """The `k` rows nearest one query: [{rank, row, score, key, caption, metadata}], best first (`Searcher`
    keeps the model loaded for many).

    Args:
        index, checkpoint, embeddings, model, verify: as `Searcher`'s.
        text, image: the query: a text, or an image file's path.
        k: how many neighbours.

    Example:
        >>> for hit in search("index/", "ckpt/", text="a photo of a dog", k=5):  # doctest: +SKIP
        ...     print(hit["score"], hit["key"], hit["caption"])
    """
    if k < 1:
        raise UsageError(f"-k must be >= 1, got {k}")
    if image is not None and not storage.isfile(image):  # before the model loads
        raise NotFound(f"--image {image}: no such file")
    return Searcher(index, checkpoint, embeddings=embeddings, model=model, verify=verify)(text=text, image=image, k=k)
