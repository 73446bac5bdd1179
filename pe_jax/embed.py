"""Large embedding jobs: resumable, order-preserving, failures recorded, never half-written.

Inputs are listed by `pe_jax.sources` in a deterministic order and cut into parts: one part per input shard
for webdataset tar shards (`part-00042` holds shard 00042's samples, in member order), `part_size` items
otherwise. Part N produces `embeddings/part-N.npy` and `metadata/part-N.parquet` (row-aligned: key, source,
caption/label/text where the input has them, carried columns; one schema for every part) plus
`failures/part-N.jsonl`; each file is written under a temporary name and renamed, embeddings last, so a part
exists exactly when its embeddings file does. A rerun skips finished parts, which makes a job killed at any
point (even SIGKILL) finish with exactly one row per good input, identical to an uninterrupted run.
`manifest.json` pins the settings; a rerun with other settings into the same folder is refused.

Decoding runs in a thread pool a bounded window ahead of the device, so memory holds a few batches of
pixels whatever the part or job size; batches have a fixed size (the last of a part padded), so one program
is compiled. Processes of a multi-host job take parts round-robin by `jax.process_index()` and meet at a
barrier before the summary.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

import pe_jax
from pe_jax.distributed import barrier
from pe_jax.sources import Item, is_tar_pattern, list_inputs, list_tar, tar_shards


@dataclass(frozen=True)
class Settings:
    """What determines the output; a rerun must match it exactly."""

    preset: str | None
    checkpoint_sha256: str
    modality: str
    input: str
    inputs: int  # how many items the listing held
    listing_sha256: str  # of the items' keys and sources, in order
    part_size: int | None  # None: one part per tar shard
    dtype: str
    normalize: bool
    layer_idx: int | None
    pooling: str | None  # image features: attn, mean or cls (pe_jax.features)
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


def _listing_sha256(parts: list[list[Item]]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        for it in part:
            digest.update(f"{it.key}\0{it.source}\n".encode("utf-8", "surrogateescape"))
        digest.update(b"\1")
    return digest.hexdigest()


def list_parts(src: str, modality: str, part_size: int) -> tuple[list[list[Item]], int | None]:
    """(parts, the part size recorded): one part per tar shard, else fixed-size parts."""
    if modality != "text" and is_tar_pattern(src) and not os.path.isdir(src):
        return [list_tar(shard) for shard in tar_shards(src)], None
    items = list_inputs(src, modality)
    if not items:
        raise ValueError(f"{src}: no inputs found")
    return [items[i:i + part_size] for i in range(0, len(items), part_size)], part_size


# ------------------------------------------------------------------------------------------------ outputs


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


def _part_path(out_dir: str, kind: str, n: int, ext: str) -> str:
    return os.path.join(out_dir, kind, f"part-{n:05d}.{ext}")


def _metadata_schema(parts: list[list[Item]], modality: str):
    """One parquet schema for every part: key, source, the input's sidecars and carried columns. A carried
    column whose values do not share one type is stored as strings (JSON for non-strings)."""
    import pyarrow as pa

    items = [it for part in parts for it in part]
    fields = [pa.field("key", pa.string()), pa.field("source", pa.string())]
    if modality == "text" or any(it.text is not None for it in items):
        fields.append(pa.field("caption" if modality != "text" else "text", pa.string()))
    if any(it.label is not None for it in items):
        fields.append(pa.field("label", pa.string()))
    columns = sorted({k for it in items for k in it.extra} - {f.name for f in fields})
    for name in columns:
        values = [it.extra.get(name) for it in items]
        try:
            fields.append(pa.field(name, pa.array(values).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            fields.append(pa.field(name, pa.string(), metadata={"pe_jax": "mixed types, stored as strings"}))
    return pa.schema(fields)


def _row(it: Item, schema) -> dict:
    row = {"key": it.key, "source": it.source, "caption": it.text, "text": it.text, "label": it.label, **it.extra}
    out = {}
    for f in schema:
        v = row.get(f.name)
        if f.metadata and v is not None and not isinstance(v, str):
            v = json.dumps(v)
        out[f.name] = v
    return out


def _write_part(out_dir: str, n: int, items: list[Item], embeddings: np.ndarray, failures: list[dict], schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_row(it, schema) for it in items], schema=schema)
    _atomic_write(_part_path(out_dir, "failures", n, "jsonl"),
                  lambda p: _write_text(p, "".join(json.dumps(f) + "\n" for f in failures)))
    _atomic_write(_part_path(out_dir, "metadata", n, "parquet"), lambda p: pq.write_table(table, p))

    def save(p):
        with open(p, "wb") as f:
            np.save(f, embeddings)

    _atomic_write(_part_path(out_dir, "embeddings", n, "npy"), save)  # last: marks the part done


def _sweep_temporaries(out_dir: str):
    """Removes the temporary files (`NAME.tmp-PID`) of processes on this host that no longer run: a job killed
    mid-write leaves one, and nothing reads it."""
    for path in glob.glob(os.path.join(out_dir, "*.tmp-*")) + glob.glob(os.path.join(out_dir, "*", "*.tmp-*")):
        pid = path.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_manifest(out_dir: str, settings: Settings):
    path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not a manifest ({e}); use another output folder") from None
        previous = previous.get("settings") if isinstance(previous, dict) else None
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
                            "items_per_second": round(done_items / seconds, 2) if seconds else None}}
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


# ------------------------------------------------------------------------------------------------ the job


def _loader(modality: str, transform, num_frames: int):
    """item -> (model input, None) or (None, error message): a failure is recorded, never fatal."""
    from pe_jax.preprocess.image import decode_image

    def load(item: Item):
        try:
            if modality == "text":
                if not isinstance(item.text, str):
                    raise TypeError(f"the text is a {type(item.text).__name__}, not a string")
                return item.text, None
            if modality == "video":
                from pe_jax.preprocess.video import load_frames

                return load_frames(item.source, num_frames, transform=transform), None
            return transform(decode_image(item.data)), None
        except Exception as e:  # noqa: BLE001 (any decoding problem is this item's failure)
            return None, f"{type(e).__name__}: {e}"

    return load


def _encoder(modality: str, normalize: bool, layer_idx: int | None, pooling: str | None):
    """encode(model, batch): uses only its traced `model` argument, so weights are never program constants."""
    from pe_jax.features import features
    from pe_jax.layers import l2_normalize

    def encode(m, x):
        if modality == "text":
            return m.encode_text(x, normalize=normalize)
        if modality == "video":  # the mean of unit frame embeddings is not unit: normalize it again
            out = m.encode_video(x, normalize=normalize)
            return l2_normalize(out) if normalize else out
        return features(m, x, layer_idx=layer_idx, pooling=pooling, normalize=normalize)

    return encode


def _decoded(parts: dict[int, list[Item]], load, workers: int, window: int):
    """(part, item, input, error) for every item of `parts` in order, decoded at most `window` items ahead."""
    stream = ((n, it) for n, items in parts.items() for it in items)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = collections.deque((n, it, pool.submit(load, it)) for n, it in itertools.islice(stream, window))
        try:
            while pending:
                n, it, future = pending.popleft()
                for m, nxt in itertools.islice(stream, 1):
                    pending.append((m, nxt, pool.submit(load, nxt)))
                yield (n, it, *future.result())
        finally:
            for *_, future in pending:
                future.cancel()


def embed(model, src: str, out_dir: str, *, modality: str = "image", batch_size: int = 32, part_size: int = 1000,
          dtype: str = "float16", normalize: bool = True, layer_idx: int | None = None, pooling: str | None = None,
          mesh=None, preset: str | None = None, checkpoint: str | None = None, workers: int = 4,
          num_frames: int = 8, progress: bool = True) -> dict:
    """Embeds every input of `src` into `out_dir`; returns the summary. See the module docstring."""
    from tqdm import tqdm

    from pe_jax.batching import apply_batches, round_batch_size
    from pe_jax.features import feature_dim
    from pe_jax.preprocess import get_image_transform, get_text_tokenizer

    pooling = _check_arguments(model, modality, dtype, part_size, batch_size, layer_idx, pooling)
    image_size = getattr(model, "visual", model).config.image_size
    parts, recorded_part_size = list_parts(src, modality, part_size)
    settings = Settings(preset, _sha256_of_checkpoint(checkpoint) if checkpoint else "random-init", modality,
                        os.path.abspath(src), sum(map(len, parts)), _listing_sha256(parts), recorded_part_size, dtype,
                        normalize, layer_idx, pooling, image_size,
                        f"pe_jax.preprocess.get_image_transform({image_size}) (squash, bilinear, mean=std=0.5)")
    for sub in ("embeddings", "metadata", "failures"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    _check_manifest(out_dir, settings)
    _sweep_temporaries(out_dir)
    barrier("pe_jax_embed_manifest")
    schema = _metadata_schema(parts, modality)

    mine = [n for n in range(len(parts)) if n % jax.process_count() == jax.process_index()]
    todo = {n: parts[n] for n in mine if not os.path.exists(_part_path(out_dir, "embeddings", n, "npy"))}
    for n in [n for n, items in todo.items() if not items]:  # a shard without images: an empty part
        dim = feature_dim(model, layer_idx, pooling) if modality == "image" else model.config.text.output_dim
        _write_part(out_dir, n, [], np.zeros((0, dim), dtype), [], schema)
        del todo[n]
    size = round_batch_size(batch_size, mesh)
    tokenizer = get_text_tokenizer(model.config.text.context_length) if modality == "text" else None
    load = _loader(modality, get_image_transform(image_size), num_frames)
    stats = {"embedded": 0, "failed": 0}
    start = time.perf_counter()
    with tqdm(total=sum(map(len, todo.values())), desc="embedding", unit="item", disable=not progress) as bar:
        empty = _empty_input(model, modality, num_frames)
        batches = _part_batches(_decoded(todo, load, workers, window=2 * size), todo, size, tokenizer, empty, stats,
                                bar)
        pending = collections.deque()
        host_batches = (pending.append(meta) or x for x, meta in batches)
        done = collections.defaultdict(list)
        for out in apply_batches(_encoder(modality, normalize, layer_idx, pooling), model, host_batches,
                                 batch_size=size, mesh=mesh, progress=bar.update):
            n, items, failures, last = pending.popleft()
            done[n].append((items, out))
            if last:
                chunks = done.pop(n)
                _write_part(out_dir, n, [it for its, _ in chunks for it in its],
                            np.concatenate([o for _, o in chunks]).astype(dtype), failures, schema)
                stats["embedded"] += sum(len(its) for its, _ in chunks)
    barrier("pe_jax_embed_done")  # every process's parts are on disk before anyone counts them
    return _finish(out_dir, settings, settings.inputs, len(parts), time.perf_counter() - start,
                   stats["embedded"], stats["failed"])


def _check_arguments(model, modality, dtype, part_size, batch_size, layer_idx, pooling) -> str | None:
    """Clear errors for bad arguments; returns the image pooling used (None for text and video)."""
    from pe_jax.features import resolve_pooling

    if modality not in ("image", "text", "video"):
        raise ValueError(f"unknown modality {modality!r}; use image, text or video")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; use float16 or float32")
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"part size and batch size must be >= 1, got {part_size} and {batch_size}")
    if modality == "image":
        return resolve_pooling(model, layer_idx, pooling)
    if not hasattr(model, "text"):
        raise ValueError(f"{modality} embeddings need a PE-Core CLIP model")
    if layer_idx is not None or pooling is not None:
        raise ValueError("--layer-idx and --pooling apply to image embeddings")
    return None


def _empty_input(model, modality: str, num_frames: int) -> np.ndarray:
    if modality == "text":
        return np.zeros((0, model.config.text.context_length), np.int32)
    size = getattr(model, "visual", model).config.image_size
    frames = (num_frames,) if modality == "video" else ()
    return np.zeros((0, *frames, size, size, 3), np.float32)


def _part_batches(decoded, todo: dict[int, list[Item]], size: int, tokenizer, empty: np.ndarray, stats: dict, bar):
    """Fixed batches of decoded inputs that never span two parts: yields (batch, (part, items, part failures,
    last batch of the part)). A part whose items all failed still yields one empty batch, so it is written."""
    current, items, inputs, failures = None, [], [], []

    def flush(last: bool):
        batch = tokenizer(inputs) if tokenizer is not None else np.stack(inputs) if inputs else None
        return batch, (current, list(items), failures if last else [], last)

    counts = {n: len(v) for n, v in todo.items()}
    for n, item, x, error in decoded:
        if n != current:
            current, items, inputs, failures = n, [], [], []
        if error is None:
            items.append(item)
            inputs.append(x)
        else:
            failures.append({"key": item.key, "source": item.source, "error": error})
            stats["failed"] += 1
            bar.update(1)
        counts[n] -= 1
        if len(items) == size or counts[n] == 0:
            batch, meta = flush(counts[n] == 0)
            yield (empty if batch is None else batch), meta  # an empty last batch still closes its part
            items, inputs = [], []

