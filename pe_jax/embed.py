"""Large embedding jobs: resumable, order-preserving, failures recorded, never half-written.

Inputs are listed in a deterministic order and cut into parts of `part_size` items. Part N produces
`embeddings/part-N.npy` and `metadata/part-N.parquet` (row-aligned: key, source, carried columns) plus
`failures/part-N.jsonl`; each file is written under a temporary name and renamed, embeddings last, so a
part exists exactly when its embeddings file does. A rerun skips finished parts, which makes a job killed
at any point (even SIGKILL) finish with exactly one row per good input, identical to an uninterrupted run.
`manifest.json` pins the settings; a rerun with other settings into the same folder is refused.

Decoding runs in a thread pool ahead of the device; batches have a fixed size (the last padded), so one
program is compiled. Processes of a multi-host job take parts round-robin by `jax.process_index()`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field

import jax
import numpy as np

import pe_jax

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # image members of tar shards


@dataclass(frozen=True)
class Item:
    key: str
    source: str  # a path, or "shard.tar::member"
    extra: dict = field(default_factory=dict)  # carried columns


# ------------------------------------------------------------------------------------------------ inputs


def expand_braces(pattern: str) -> list[str]:
    """'data/{000..009}.tar' -> the ten paths (zero padding kept); plain globs work too."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def list_inputs(src: str, modality: str = "image") -> list[Item]:
    """Items of a folder (recursive), a list file (txt/csv/parquet of paths; txt/jsonl/csv of texts) or
    webdataset tar shards (brace pattern), in a deterministic order."""
    if modality == "text":
        return _list_texts(src)
    if os.path.isdir(src):
        # every file is an input: one that does not decode is a recorded failure, never silently dropped
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs)
        if not paths:
            raise ValueError(f"{src}: the input folder is empty")
        return [Item(os.path.relpath(p, src), p) for p in paths]
    if ".tar" in src:
        shards = expand_braces(src)
        existing = [s for s in shards if os.path.exists(s)]
        if not existing:
            raise ValueError(f"{src}: the pattern matches no tar shard")
        missing = sorted(set(shards) - set(existing))
        if missing:
            raise FileNotFoundError(f"{src}: shard(s) not found: {', '.join(missing[:5])}")
        return [item for shard in existing for item in _tar_items(shard)]
    if not os.path.exists(src):
        raise FileNotFoundError(f"input not found: {src}")
    rows = _read_table(src)
    base = os.path.dirname(os.path.abspath(src))
    items = []
    for i, row in enumerate(rows):
        path = row.pop("path", None)
        if path is None:
            raise ValueError(f"{src}: a list needs a 'path' column")
        key = str(row.pop("key", i))
        items.append(Item(key, path if os.path.isabs(path) else os.path.join(base, path), row))
    return items


def _read_table(src: str) -> list[dict]:
    if src.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(src).to_pylist()
    if src.endswith(".csv"):
        with open(src, newline="") as f:
            return list(csv.DictReader(f))
    with open(src) as f:  # txt: one path per line
        return [{"path": line.strip()} for line in f if line.strip()]


def read_rows(src: str) -> list[dict] | None:
    """The rows of a JSONL or CSV file (None for another extension)."""
    if src.endswith(".jsonl"):
        with open(src) as f:
            return [json.loads(line) for line in f if line.strip()]
    if src.endswith(".csv"):
        with open(src, newline="") as f:
            return list(csv.DictReader(f))
    return None


def _list_texts(src: str) -> list[Item]:
    if not os.path.exists(src):
        raise FileNotFoundError(f"input not found: {src}")
    rows = read_rows(src)
    if rows is None:
        with open(src) as f:
            rows = [{"text": line.rstrip("\n")} for line in f]
    items = []
    for i, row in enumerate(rows):
        if "text" not in row:
            raise ValueError(f"{src}: row {i} has no 'text'")
        text = row.pop("text")
        items.append(Item(str(row.pop("key", i)), f"{src}:{i}", {"text": text, **row}))
    return items


def _tar_items(shard: str) -> list[Item]:
    try:
        with tarfile.open(shard) as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{shard}: not a readable tar shard ({e})") from None
    return [Item(os.path.splitext(n)[0], f"{shard}::{n}") for n in names if n.lower().endswith(IMAGE_EXTS)]


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class Settings:
    """What determines the output; a rerun must match it exactly."""

    preset: str | None
    checkpoint_sha256: str
    modality: str
    input: str
    part_size: int
    dtype: str
    normalize: bool
    layer_idx: int | None
    image_size: int
    preprocessing: str
    pe_jax_version: str = pe_jax.__version__


def _sha256_of_checkpoint(path: str) -> str:
    """Of the weights' identity: a file's bytes, or a pe_jax checkpoint's metadata (which holds the source hash)."""
    digest = hashlib.sha256()
    target = os.path.join(path, "pe_jax.json") if os.path.isdir(path) else path
    with open(target, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


def _atomic_write(path: str, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(item: Item, modality: str, transform, num_frames: int):
    """The model input for one item (decoded and preprocessed), or raises."""
    if modality == "text":
        return item.extra["text"]
    if modality == "video":
        from pe_jax.video import load_frames

        return load_frames(item.source, num_frames, transform=transform)
    from PIL import Image

    if "::" in item.source:
        shard, member = item.source.split("::", 1)
        with tarfile.open(shard) as tar:
            data = tar.extractfile(member).read()
        img = Image.open(io.BytesIO(data))
    else:
        img = Image.open(item.source)
    img.load()
    return transform(img)


def embed(model, src: str, out_dir: str, *, modality: str = "image", batch_size: int = 32, part_size: int = 1000,
          dtype: str = "float16", normalize: bool = True, layer_idx: int | None = None, mesh=None,
          preset: str | None = None, checkpoint: str | None = None, workers: int = 4, num_frames: int = 8,
          progress: bool = True) -> dict:
    """Embeds every input of `src` into `out_dir`; returns the summary. See the module docstring."""
    from tqdm import tqdm

    from pe_jax.inference import run_batched
    from pe_jax.modeling import CLIP
    from pe_jax.transforms import get_image_transform, get_text_tokenizer

    if modality not in ("image", "text", "video"):
        raise ValueError(f"unknown modality {modality!r}; use image, text or video")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; use float16 or float32")
    if part_size < 1 or batch_size < 1:
        raise ValueError("part_size and batch_size must be >= 1")
    if modality in ("text", "video") and not isinstance(model, CLIP):
        raise ValueError(f"{modality} embeddings need a PE-Core CLIP model")
    vision = model.visual if isinstance(model, CLIP) else model
    image_size = vision.config.image_size
    settings = Settings(preset, _sha256_of_checkpoint(checkpoint) if checkpoint else "random-init", modality,
                        os.path.abspath(src), part_size, dtype, normalize, layer_idx, image_size,
                        f"pe_jax.transforms.get_image_transform({image_size}) (squash, bilinear, mean=std=0.5)")
    items = list_inputs(src, modality)
    if not items:
        raise ValueError(f"{src}: no inputs found")
    os.makedirs(out_dir, exist_ok=True)
    for sub in ("embeddings", "metadata", "failures"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    _check_manifest(out_dir, settings)

    transform = get_image_transform(image_size)
    tokenizer = get_text_tokenizer(model.config.text.context_length) if modality == "text" else None

    def encode(m, x):
        if modality == "text":
            out = m.encode_text(x, normalize=normalize)
        elif modality == "video":
            out = m.encode_video(x, normalize=normalize)
        elif layer_idx is not None:
            out = vision.forward_features(x, layer_idx=layer_idx, norm=False).mean(axis=1)  # mean-pooled tokens
            if normalize:
                out = out / jax.numpy.linalg.norm(out, axis=-1, keepdims=True)
        else:
            out = m.encode_image(x, normalize=normalize) if isinstance(m, CLIP) else m(x)
            if normalize and not isinstance(m, CLIP):
                out = out / jax.numpy.linalg.norm(out, axis=-1, keepdims=True)
        return out

    parts = [items[i:i + part_size] for i in range(0, len(items), part_size)]
    mine = [n for n in range(len(parts)) if n % jax.process_count() == jax.process_index()]
    todo = [n for n in mine if not os.path.exists(_part_path(out_dir, "embeddings", n, "npy"))]
    start, done_items, failed = time.perf_counter(), 0, 0
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        with tqdm(total=sum(len(parts[n]) for n in todo), desc="embedding", unit="item",
                  disable=not progress) as bar:
            # decoding of the next part is queued while the device works on this one
            pending = {n: [pool.submit(_safe_load, it, modality, transform, num_frames) for it in parts[n]]
                       for n in todo[:1]}
            for i, n in enumerate(todo):
                if i + 1 < len(todo):
                    pending[todo[i + 1]] = [pool.submit(_safe_load, it, modality, transform, num_frames)
                                            for it in parts[todo[i + 1]]]
                loaded = [f.result() for f in pending.pop(n)]
                good = [(it, x) for it, (x, err) in zip(parts[n], loaded, strict=True) if err is None]
                failures = [{"key": it.key, "source": it.source, "error": err}
                            for it, (_, err) in zip(parts[n], loaded, strict=True) if err is not None]
                if good:
                    inputs = [x for _, x in good]
                    batch = tokenizer(inputs) if modality == "text" else np.stack(inputs)
                    embeddings = run_batched(encode, model, batch, batch_size=batch_size, mesh=mesh)
                else:
                    embeddings = np.zeros((0, _embed_dim(model, vision, modality, layer_idx)), np.float32)
                _write_part(out_dir, n, [it for it, _ in good], embeddings.astype(dtype), failures)
                done_items += len(good)
                failed += len(failures)
                bar.update(len(parts[n]))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return _finish(out_dir, settings, len(items), len(parts), time.perf_counter() - start, done_items, failed)


def _safe_load(item, modality, transform, num_frames):
    try:
        return _load(item, modality, transform, num_frames), None
    except Exception as e:  # any decoding problem is this item's failure, recorded, never fatal
        return None, f"{type(e).__name__}: {e}"


def _embed_dim(model, vision, modality, layer_idx):
    if layer_idx is not None and modality == "image":
        return vision.config.width
    return model.config.text.output_dim if modality == "text" else vision.config.embed_dim


def _part_path(out_dir: str, kind: str, n: int, ext: str) -> str:
    return os.path.join(out_dir, kind, f"part-{n:05d}.{ext}")


def _write_part(out_dir: str, n: int, items: list[Item], embeddings: np.ndarray, failures: list[dict]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"key": it.key, "source": it.source, **{k: v for k, v in it.extra.items() if k != "text"}}
            for it in items]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string()),
                                                               "source": pa.array([], pa.string())})
    _atomic_write(_part_path(out_dir, "failures", n, "jsonl"),
                  lambda p: _write_text(p, "".join(json.dumps(f) + "\n" for f in failures)))
    _atomic_write(_part_path(out_dir, "metadata", n, "parquet"), lambda p: pq.write_table(table, p))

    def save(p):
        with open(p, "wb") as f:
            np.save(f, embeddings)

    _atomic_write(_part_path(out_dir, "embeddings", n, "npy"), save)  # last: marks the part done


def _check_manifest(out_dir: str, settings: Settings):
    path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("settings")
        if previous != asdict(settings):
            diff = sorted(k for k in asdict(settings) if (previous or {}).get(k) != asdict(settings)[k])
            raise ValueError(f"{out_dir} holds a job with other settings ({', '.join(diff)}); "
                             "use another output folder")
    elif jax.process_index() == 0:
        _atomic_write(path, lambda p: _write_text(p, json.dumps({"settings": asdict(settings), "complete": False})))


def _finish(out_dir, settings, n_items, n_parts, seconds, done_items, failed) -> dict:
    """Counts from the parts on disk; failures.jsonl gathered from the per-part files."""
    finished = [n for n in range(n_parts) if os.path.exists(_part_path(out_dir, "embeddings", n, "npy"))]
    failures = []
    rows = 0
    for n in finished:
        with open(_part_path(out_dir, "failures", n, "jsonl")) as f:
            failures += f.readlines()
        rows += int(np.load(_part_path(out_dir, "embeddings", n, "npy"), mmap_mode="r").shape[0])
    summary = {"items": n_items, "embedded": rows, "failed": len(failures), "parts": n_parts,
               "parts_finished": len(finished), "complete": len(finished) == n_parts,
               "this_run": {"embedded": done_items, "failed": failed, "seconds": round(seconds, 3),
                            "items_per_second": round((done_items + failed) / seconds, 2) if seconds else None}}
    if jax.process_index() == 0:
        _atomic_write(os.path.join(out_dir, "failures.jsonl"), lambda p: _write_text(p, "".join(failures)))
        manifest = {"settings": asdict(settings), **{k: v for k, v in summary.items() if k != "this_run"}}
        _atomic_write(os.path.join(out_dir, "manifest.json"), lambda p: _write_text(p, json.dumps(manifest, indent=1)))
    return summary


def read_embeddings(out_dir: str) -> tuple[np.ndarray, list[dict]]:
    """All finished parts of an embedding job, in order: (embeddings [N, D], metadata rows)."""
    import pyarrow.parquet as pq

    paths = sorted(glob.glob(os.path.join(out_dir, "embeddings", "part-*.npy")))
    if not paths:
        raise FileNotFoundError(f"{out_dir}: no embeddings/part-*.npy (not an embedding job's output)")
    arrays, rows = [], []
    for p in paths:
        arrays.append(np.load(p))
        name = os.path.basename(p)[: -len(".npy")]
        rows += pq.read_table(os.path.join(out_dir, "metadata", f"{name}.parquet")).to_pylist()
    return np.concatenate(arrays), rows
