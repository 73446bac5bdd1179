"""PyTorch checkpoint file -> pe_jax (Orbax) checkpoint, streaming (and back: pe_jax.convert.export).

Conversion writes the Orbax checkpoint one zarr chunk at a time: each chunk of a stacked parameter is assembled in a
small reused buffer from the memory-mapped source tensors it covers (transposed and cast on the way) and written out,
so neither the state dict nor a parameter is ever held in memory. Output is built in a temporary directory beside DST
and renamed into place only when complete, so an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import math
import os
import re
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

import pe_jax
from pe_jax.checkpoints.naming import IGNORED_KEYS, ZeroBias, plan_for, slot_shape, tensor_shape
from pe_jax.checkpoints.orbax import METADATA_FILE, STATE_DIR, params_metadata
from pe_jax.checkpoints.params import CheckpointMismatchError, ParamSpec
from pe_jax.checkpoints.readers import open_state_dict, resolve
from pe_jax.checkpoints.verify import write_checksums
from pe_jax.config import available_configs, clip_config, config_to_dict, vision_config
from pe_jax.convert.chunks import check_finite, write_state_chunks
from pe_jax.convert.outputs import check_destination, staging
from pe_jax.errors import UsageError
from pe_jax.storage.hashing import sha256_of_files

# Conversion never imports jax or flax (1.5 s, half the time of converting an L/14): the parameter shapes
# of every preset come from PRESET_SHAPES, a table generated from the models (write_preset_shapes) and
# tested against them; only export, which builds a model, needs them.
PRESET_SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preset_shapes.json")

DTYPES = ("float32", "bfloat16")
# A transposed copy (see _copy) stages BAND source columns of up to STAGE_ROWS rows, then writes TILE rows at once.
BAND, TILE, STAGE_ROWS = 64, 128, 2048
_stage = threading.local()  # one staging buffer per writer thread


def _has_text_tower(keys) -> bool:
    return any(k.split("module.", 1)[-1] in ("token_embedding.weight", "text.token_embedding.weight") for k in keys)


@functools.cache
def _preset_table() -> dict:
    with open(PRESET_SHAPES) as f:  # read once: inferring a preset tries each of them
        return json.load(f)


def preset_shapes(kind: str, name: str, dtype: str = "float32") -> dict[tuple[str, ...], ParamSpec]:
    """{parameter path: ParamSpec} of preset `name` (kind "clip" or "vision"), read from PRESET_SHAPES."""
    table = _preset_table()[kind]
    if name not in table:  # a preset added to pe_jax.config without regenerating the table
        raise KeyError(f"{PRESET_SHAPES} has no {kind} preset {name}: run write_preset_shapes()")
    if dtype == "bfloat16":
        import ml_dtypes  # only here: importing it costs ~1 s, a third of converting L/14 in float32

        spec_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        spec_dtype = np.dtype(dtype)
    return {tuple(path.split(".")): ParamSpec(tuple(shape), spec_dtype) for path, shape in table[name].items()}


def write_preset_shapes(path: str = PRESET_SHAPES):
    """Regenerates the parameter-shape table of every preset from the models (nnx.eval_shape)."""
    from flax import nnx

    from pe_jax.checkpoints.params import param_shapes
    from pe_jax.modeling import CLIP, VisionTransformer

    lines = []
    for kind, cls, config in (("clip", CLIP, clip_config), ("vision", VisionTransformer, vision_config)):
        presets = []
        for name in available_configs(kind):
            cfg = config(name)
            model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))  # noqa: B023 (called at once)
            shapes = {".".join(p): list(spec.shape) for p, spec in sorted(param_shapes(model).items())}
            presets.append(f"  {json.dumps(name)}: {json.dumps(shapes)}")
        lines.append(f" {json.dumps(kind)}: {{\n" + ",\n".join(presets) + "\n }")
    with open(path, "w") as f:  # one line per preset
        f.write("{\n" + ",\n".join(lines) + "\n}\n")


def _file_depth(key_shapes) -> int | None:
    """The number of blocks of a lone vision tower (`...blocks.{i}.` in timm naming, `...resblocks.{i}.` in the
    original), else None."""
    found = [int(m[1]) for k in key_shapes if (m := re.search(r"(?:^|\.)(?:res)?blocks\.(\d+)\.", k))]
    return max(found) + 1 if found else None


def _candidates(kind: str, names: list[str], dtype: str, depth: int | None):
    """(name, config, shapes) of each preset in `names`, then, for a lone vision tower whose depth differs
    (PerceptionLM keeps a shortened tower; tiny test towers), of each at the file's depth."""
    config = clip_config if kind == "clip" else vision_config
    for name in names:
        yield name, config(name, param_dtype=dtype), preset_shapes(kind, name, dtype)
    for name in names if depth is not None and kind == "vision" else []:
        if depth != config(name).layers:  # the blocks' leading `layers` axis resized
            yield name, config(name, param_dtype=dtype, layers=depth), {
                p: ParamSpec((depth, *s.shape[1:]), s.dtype) if "resblocks" in p else s
                for p, s in preset_shapes(kind, name, dtype).items()}


def match_preset(key_shapes: dict, model: str | None = None, dtype: str = "float32"):
    """(preset, config, plan) for a state dict: `model` checked, or inferred from the shapes. A lone vision
    tower may have fewer (or more) blocks than its preset: the depth is read from the file.

    Args:
        key_shapes: {PyTorch key: shape} of the file; model: a preset name; dtype: the stored weights' dtype.

    Example:
        >>> match_preset({k: v.shape for k, v in state_dict.items()})[0]  # doctest: +SKIP
        'PE-Core-B16-224'
    """
    kind = "clip" if _has_text_tower(key_shapes) else "vision"
    depth = _file_depth(key_shapes)
    if model is not None and model not in available_configs(kind):
        raise UsageError(f"--model {model!r} is not a {kind} preset; {kind} presets: "
                         f"{', '.join(available_configs(kind))}")
    failures = []
    # The first match wins (aliases share shapes).
    for name, cfg, shapes in _candidates(kind, [model] if model else available_configs(kind), dtype, depth):
        try:
            return name, cfg, plan_for(cfg, shapes, key_shapes)
        except CheckpointMismatchError as e:
            failures.append((str(e).count("\n"), name, str(e)))
    if model:
        raise CheckpointMismatchError(f"the checkpoint does not fit --model {model}: {min(failures)[2]}")
    _, name, message = min(failures)
    raise CheckpointMismatchError(f"no {kind} preset matches these tensor shapes; pass --model. "
                                  f"Closest is {name}: {message}")


def unused_tensors(key_shapes, plan) -> dict[str, int]:
    """{group: count} of the tensors a conversion leaves out (a PerceptionLM's projector and language model,
    PE-AV's other towers), grouped by their first two key components."""
    used = set(plan.stored_keys.values())
    groups: dict[str, int] = {}
    for key in sorted(k for k in key_shapes if k not in used and not IGNORED_KEYS.search(k)):
        group = ".".join(key.split(".")[:2]) + ".*" if key.count(".") > 1 else key
        groups[group] = groups.get(group, 0) + 1
    return groups


def _staging(dst: str, force: bool):
    """A temporary sibling of `dst`, renamed to `dst` on success and removed on any failure; what --force may
    replace, the lock, the final no-clobber rename and the sweep of killed runs' leftovers: see outputs.py."""
    return staging(dst, force)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False)


def _region(shape: tuple[int, ...], index: tuple) -> list[tuple[int, int, bool]]:
    """(start, stop, is an integer index) on each axis of the part of a parameter that param[index] is."""
    out = []
    for n, ix in itertools.zip_longest(shape, index, fillvalue=slice(None)):
        out.append((ix, ix + 1, True) if isinstance(ix, int) else (*ix.indices(n)[:2], False))
    return out


def _merge_axes(out: np.ndarray, piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of two same-shape arrays without unit axes and with neighbouring axes merged wherever both lie
    alike across them, so that a transposed matrix shows as two axes whatever its pe_jax shape."""
    shape, so, sp = [], [], []
    for n, a, b in zip(out.shape, out.strides, piece.strides, strict=True):
        if n == 1:
            continue
        if shape and so[-1] == n * a and sp[-1] == n * b:
            shape[-1], so[-1], sp[-1] = shape[-1] * n, a, b
        else:
            shape, so, sp = [*shape, n], [*so, a], [*sp, b]
    return as_strided(out, shape, so), as_strided(piece, shape, sp, writeable=False)


def _copy(out: np.ndarray, piece: np.ndarray):
    """out[...] = piece. numpy copies a transposed view element by element in `out`'s order, one element
    per source row, missing cache and TLB on nearly every read (~0.7 GB/s). A transposed matrix instead goes
    through a small staging block of BAND source columns, copied in source order (contiguous runs), then
    transposed from that cached block TILE rows at a time (~3x faster)."""
    out, piece = _merge_axes(out, piece)
    if out.ndim != 2 or abs(piece.strides[0]) > abs(piece.strides[1]):  # not a transposed matrix
        out[...] = piece
        return
    rows = piece.T  # rows[j] is a contiguous run of the source tensor
    for j0 in range(0, rows.shape[0], STAGE_ROWS):
        for i in range(0, rows.shape[1], BAND):
            part = rows[j0: j0 + STAGE_ROWS, i: i + BAND]
            if len(getattr(_stage, "buffer", b"")) < part.nbytes:
                _stage.buffer = np.empty(part.nbytes, np.uint8)
            stage = _stage.buffer[: part.nbytes].view(part.dtype).reshape(part.shape)
            stage[...] = part  # runs of BAND contiguous elements
            for j in range(0, len(stage), TILE):  # transposed out of a block that stays in cache
                out[i: i + BAND, j0 + j: j0 + j + TILE] = stage[j: j + TILE].T


def _chunk_filler(plan, state_dict, progress):
    """`fill(param path, index, out)` for write_state_chunks: copies into `out` the part of every tensor
    that lands in param[index], in pe_jax layout and dtype. Checks zero biases and coverage up front."""
    lock = threading.Lock()

    def tell(nbytes):  # called from the writer threads
        with lock:
            progress(nbytes)

    parts, covered = {}, dict.fromkeys(plan.shapes, 0)
    for slot in plan.slots:
        shape = plan.shapes[slot.path].shape
        if isinstance(slot.transform, ZeroBias):
            tensor = np.asarray(state_dict[plan.stored_keys[slot.torch_key]])
            if np.any(tensor != 0):
                raise CheckpointMismatchError(
                    f"{slot.torch_key}: must be all zeros (the reference projection has no bias)")
            tell(tensor.nbytes)
            continue
        region = _region(shape, slot.index)
        parts.setdefault(slot.path, []).append((slot, slot_shape(shape, slot.index), region))
        covered[slot.path] += math.prod(hi - lo for lo, hi, _ in region)
    incomplete = sorted(".".join(p) for p, n in covered.items() if n != math.prod(plan.shapes[p].shape))
    if incomplete:  # a table bug rather than a bad file; never write half-filled parameters
        raise CheckpointMismatchError(f"parameters left unfilled: {incomplete}")

    def fill(path, index, out):
        for slot, target, region in parts[path]:
            src, dst = [], []
            for (lo, hi, single), part in zip(region, index, strict=True):
                a, b = max(lo, part.start), min(hi, part.stop)
                if a >= b:
                    break  # this tensor lies outside the chunk
                dst.append(a - part.start if single else slice(a - part.start, b - part.start))
                if not single:
                    src.append(slice(a - lo, b - lo))
            else:
                tensor = np.asarray(state_dict[plan.stored_keys[slot.torch_key]])
                piece = slot.transform.to_jax(tensor, target)[tuple(src)]  # a view of the mapped file
                _copy(out[(*dst, ...)], piece)  # the Ellipsis keeps a 0-d out a view
                tell(piece.size * tensor.itemsize)

    return fill


def convert_checkpoint(src: str, dst: str, *, model: str | None = None, dtype: str = "float32",
                       force: bool = False, progress: bool = True, source_sha256: bool = False,
                       allow_non_finite: bool = False) -> dict:
    """Converts a PyTorch checkpoint file (any naming; .pt, safetensors, sharded, hf://) into a pe_jax
    checkpoint directory `dst`. Returns the metadata written beside the weights. Weights holding NaN or Inf
    (checked as written, in `dtype`) are refused, naming the source tensors, and nothing is written.

    Args:
        src: the file (or its URL, or hf://ORG/REPO[:FILE]); dst: the new checkpoint directory.
        model: the preset (default: inferred from the shapes); dtype: "float32" or "bfloat16" weights.
        force: replace `dst` (only an empty folder or a pe_jax checkpoint); progress: show a bar.
        source_sha256: also record the source's sha256 (a third of the CPU time; loads verify the checksums).
        allow_non_finite: convert NaN/Inf weights anyway, recorded in pe_jax.json's `non_finite` (loads warn).

    Example:
        >>> convert_checkpoint("PE-Core-B16-224.pt", "pe_b16/")["preset"]  # doctest: +SKIP
        'PE-Core-B16-224'
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    check_destination(dst, force)  # refuse before any expensive work; again under the lock, and at the end
    local = resolve(src)
    state_dict = open_state_dict(local)
    files = state_dict.files() if hasattr(state_dict, "files") else [local]
    # Hash on a thread (hashlib releases the GIL) from the start, overlapping the preset match and the
    # writing: the file is read once from disk. A failed conversion stops it rather than waiting for it.
    stop = threading.Event()
    digest = (concurrent.futures.ThreadPoolExecutor(1).submit(sha256_of_files, files, stop=stop)
              if source_sha256 else None)
    try:
        key_shapes = {k: tensor_shape(state_dict, k) for k in state_dict}
        preset, cfg, plan = match_preset(key_shapes, model, dtype)
        with _staging(dst, force) as tmp:
            total = sum(math.prod(key_shapes[plan.stored_keys[s.torch_key]]) * 4 for s in plan.slots)
            non_finite: set = set()
            with _progress(total, f"converting {os.path.basename(local)}", progress) as bar:
                sums = write_state_chunks(os.path.join(tmp, STATE_DIR), plan.shapes,
                                          _chunk_filler(plan, state_dict, bar.update), non_finite=non_finite)
            check_finite(src, plan, state_dict, non_finite, allow_non_finite)
            source_format = f"{state_dict.format}/{plan.naming}" if hasattr(state_dict, "format") else plan.naming
            meta = {
                "preset": preset,
                "config": config_to_dict(cfg),
                "source_file": os.path.basename(src if not src.startswith("hf://") else local),
                "source": src,
                "source_format": source_format,
                "source_bytes": sum(os.path.getsize(f) for f in files),
                "source_sha256": digest.result() if digest else None,
                "dtype": dtype,
                "unused_tensors": unused_tensors(key_shapes, plan),
                "non_finite": sorted(".".join(p) for p in non_finite),  # [] : checked, none
                "pe_jax_version": pe_jax.__version__,
                "params": params_metadata(plan.shapes),
                "content_hash": write_checksums(tmp, sums),  # checksums.json, from the chunks as written
            }
            with open(os.path.join(tmp, METADATA_FILE), "w") as f:
                json.dump(meta, f, indent=1)
    finally:
        stop.set()
    return meta


from pe_jax.convert.export import export_checkpoint  # noqa: E402 (its former home)

__all__ = ["convert_checkpoint", "export_checkpoint", "match_preset"]
