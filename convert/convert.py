"""PyTorch checkpoint file -> pe_jax (Orbax) checkpoint, streaming; and back (export).

Conversion reads each tensor once from a memory-mapped source and writes it into a memory-mapped buffer
of the stacked parameter it belongs to, so the state dict is never held in anonymous memory; Orbax then
writes those buffers in place. Output is built in a temporary directory beside DST and renamed into place
only when complete, so an error or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
from flax import nnx

import pe_jax
from pe_jax.checkpoint import (
    METADATA_FILE,
    STATE_DIR,
    model_from_metadata,
    params_metadata,
    read_metadata,
    restore_params,
    write_state,
)
from pe_jax.config import available_configs, clip_config, config_to_dict, vision_config
from pe_jax.convert.readers import open_state_dict, resolve
from pe_jax.modeling import CLIP, VisionTransformer
from pe_jax.weights import (
    NAMINGS,
    CheckpointMismatchError,
    detect_naming,
    fill_params,
    plan_load,
    tensor_shape,
    torch_state_dict,
)

DTYPES = ("float32", "bfloat16")


def sha256_of(paths: list[str], chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def _has_text_tower(keys) -> bool:
    return any(k.split("module.", 1)[-1] in ("token_embedding.weight", "text.token_embedding.weight") for k in keys)


def _skeleton(name: str, clip: bool, dtype: str):
    if clip:
        cfg = clip_config(name, param_dtype=dtype)
        return cfg, nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    cfg = vision_config(name, param_dtype=dtype)
    return cfg, nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))


def match_preset(key_shapes: dict, model: str | None = None, dtype: str = "float32"):
    """(preset, config, skeleton, plan) for a state dict: `model` checked, or inferred from the shapes."""
    clip = _has_text_tower(key_shapes)
    kind = "clip" if clip else "vision"
    if model is not None:
        if model not in available_configs(kind):
            raise ValueError(f"--model {model!r} is not a {kind} preset; {kind} presets: "
                             f"{', '.join(available_configs(kind))}")
        cfg, skeleton = _skeleton(model, clip, dtype)
        try:
            return model, cfg, skeleton, plan_load(skeleton, key_shapes)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"the checkpoint does not fit --model {model}: {e}") from None
    failures = []
    for name in available_configs(kind):
        cfg, skeleton = _skeleton(name, clip, dtype)
        try:
            return name, cfg, skeleton, plan_load(skeleton, key_shapes)
        except CheckpointMismatchError as e:
            failures.append((str(e).count("\n"), name, str(e)))
    _, name, message = min(failures)
    raise CheckpointMismatchError(f"no {kind} preset matches these tensor shapes; pass --model. "
                                  f"Closest is {name}: {message}")


@contextlib.contextmanager
def _staging(dst: str, force: bool):
    """A temporary sibling of `dst`, renamed to `dst` on success and removed on any failure."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {parent}")
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise PermissionError(f"cannot write to {parent}: {e.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
    try:
        yield tmp
        if os.path.lexists(dst):  # --force: move the old one aside first so dst is never half-written
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".old", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False)


def convert_checkpoint(src: str, dst: str, *, model: str | None = None, dtype: str = "float32",
                       force: bool = False, progress: bool = True) -> dict:
    """Converts a PyTorch checkpoint file (any naming; .pt, safetensors, sharded, hf://) into a pe_jax
    checkpoint directory `dst`. Returns the metadata written beside the weights."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    if os.path.lexists(dst) and not force:  # refuse before any expensive work
        raise FileExistsError(f"{os.path.abspath(dst)} exists; pass --force to replace it")
    local = resolve(src)
    state_dict = open_state_dict(local)
    key_shapes = {k: tensor_shape(state_dict, k) for k in state_dict}
    preset, cfg, skeleton, plan = match_preset(key_shapes, model, dtype)
    files = state_dict.files() if hasattr(state_dict, "files") else [local]
    # Hash on a thread (hashlib releases the GIL) while tensors stream: the file is read once from disk.
    digest = concurrent.futures.ThreadPoolExecutor(1).submit(sha256_of, files)

    with _staging(dst, force) as tmp:
        buffers = os.path.join(tmp, "_buffers")
        os.mkdir(buffers)

        def allocate(path, shape, dt):  # file-backed: pages go to the page cache, not anonymous memory
            return np.lib.format.open_memmap(os.path.join(buffers, ".".join(path) + ".npy"), "w+", dt, shape)

        total = sum(math.prod(key_shapes[plan.stored_keys[s.torch_key]]) * 4 for s in plan.slots)
        with _progress(total, f"converting {os.path.basename(local)}", progress) as bar:
            params = fill_params(plan, state_dict, allocate=allocate, progress=bar.update)
        write_state(os.path.join(tmp, STATE_DIR), params)
        del params
        shutil.rmtree(buffers)
        meta = {
            "preset": preset,
            "config": config_to_dict(cfg),
            "source_file": os.path.basename(src if not src.startswith("hf://") else local),
            "source": src,
            "source_format": f"{state_dict.format}/{plan.naming}" if hasattr(state_dict, "format") else plan.naming,
            "source_sha256": digest.result(),
            "dtype": dtype,
            "pe_jax_version": pe_jax.__version__,
            "params": params_metadata(plan.shapes),
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def export_checkpoint(ckpt: str, out: str, *, format: str = "original", force: bool = False) -> list[str]:
    """Writes the pe_jax checkpoint `ckpt` as a safetensors file `out` in a PyTorch naming. Returns its keys."""
    from safetensors.numpy import save_file

    if format not in NAMINGS:
        raise ValueError(f"unknown format {format!r}; use one of {NAMINGS}")
    meta = read_metadata(ckpt)
    model = restore_params(model_from_metadata(meta), ckpt)
    if format == "timm" and isinstance(model, CLIP):
        model = model.visual  # timm holds the vision tower alone
    state_dict = torch_state_dict(model, format)
    out = os.path.abspath(out)
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=os.path.dirname(out))
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return sorted(state_dict)


__all__ = ["convert_checkpoint", "export_checkpoint", "match_preset", "detect_naming"]
