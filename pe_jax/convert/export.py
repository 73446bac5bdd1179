"""pe_jax checkpoint -> a safetensors file in a PyTorch naming (and a finetune's classifier beside it)."""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import numpy as np

from pe_jax.convert.outputs import check_destination, check_parent, write_file
from pe_jax.errors import UsageError
from pe_jax.storage.atomic import StorageError


def export_checkpoint(ckpt: str, out: str, *, format: str = "original", force: bool = False,
                      verify: bool | None = None, dtype: str | None = None) -> list[str]:
    """Writes the pe_jax checkpoint `ckpt` as a safetensors file `out` in a PyTorch naming. Returns its keys.

    Args:
        ckpt: a pe_jax checkpoint directory.
        out: the .safetensors file to write.
        format: a naming of NAMINGS; timm and the towers inside other models (perception_lm, pe_video,
            pe_audio_video) hold the vision tower alone.
        force: replace `out` if it exists.
        verify: check the checkpoint's checksums first (default: PE_JAX_VERIFY, on).
        dtype: "float32", "bfloat16" or "float16" tensors; default: the checkpoint's dtype.

    Example:
        >>> export_checkpoint("plm-tower", "tower.safetensors", format="perception_lm")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    from pe_jax.checkpoints.load import torch_state_dict
    from pe_jax.checkpoints.naming import NAMINGS
    from pe_jax.modeling import CLIP
    from pe_jax.pretrained import resolve_model

    if format not in NAMINGS:
        raise UsageError(f"unknown format {format!r}; use one of {NAMINGS}")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise UsageError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    check_parent(check_destination(out, force, file=True))  # before loading; again under the lock, and at the end
    model = resolve_model(ckpt).load(verify=verify)  # verify=False: trusted storage, checksums not checked
    if format not in ("original", "open_clip") and isinstance(model, CLIP):
        model = model.visual  # timm (and the models holding a timm tower) hold the vision tower alone
    if dtype == "bfloat16":
        import ml_dtypes  # numpy's bfloat16

        dtype = ml_dtypes.bfloat16
    state_dict = torch_state_dict(model, format, dtype=dtype)
    classifier = _classifier(ckpt)  # read before anything is written: a bad head.npz writes nothing
    write_file(out, force, functools.partial(_save_safetensors, save_file, state_dict, out))
    if classifier is not None:
        tensors, meta = classifier
        side = (out[: -len(".safetensors")] if out.endswith(".safetensors") else out) + ".classifier.safetensors"
        write_file(side, force, functools.partial(_save_safetensors, save_file, tensors, side, metadata=meta))
        logging.getLogger(__name__).warning(
            "%s: its trained classifier (%s head, %d classes) has no place in %s naming (timm's head.* is the "
            "CLIP projection): written beside as %s (torch nn.Linear / nn.Sequential(Linear, GELU, Linear) keys; "
            "class names, layer and pooling in its metadata)", ckpt, meta["head"], len(json.loads(meta["classnames"])),
            format, side)
    return sorted(state_dict)


def _classifier(ckpt: str) -> tuple[dict, dict] | None:
    """A classification finetune's head (`head.npz`, `classes.json` beside the weights) as torch tensors
    ([out, in] weights) and string metadata; None for a checkpoint without one."""
    from pe_jax.storage.files import read_capped

    if not os.path.exists(os.path.join(ckpt, "head.npz")):
        return None
    try:
        classes = json.loads(read_capped(os.path.join(ckpt, "classes.json")))
        with np.load(os.path.join(ckpt, "head.npz")) as npz:
            head = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{ckpt}: its classifier (head.npz, classes.json) is unreadable: {e}") from None
    # nn.Linear's keys, or nn.Sequential(Linear, GELU, Linear)'s for the MLP head
    names = {"hidden": "0.", "out": "2."} if "hidden.kernel" in head else {"out": ""}
    tensors = {}
    for layer, prefix in names.items():
        tensors[f"{prefix}weight"] = np.ascontiguousarray(head[f"{layer}.kernel"].T)
        tensors[f"{prefix}bias"] = head[f"{layer}.bias"]
    meta = {"classnames": json.dumps(classes.get("classnames")), "head": str(classes.get("head")),
            "layer_idx": json.dumps(classes.get("layer_idx")), "pooling": json.dumps(classes.get("pooling"))}
    return tensors, meta


def _save_safetensors(save_file, state_dict: dict, out: str, path: str, metadata: dict | None = None):
    """save_file to `path`, with its write errors (a full disk) as OSError naming `out`: the Rust writer raises
    SafetensorError ("... No space left on device (os error 28)")."""
    try:
        save_file(state_dict, path, metadata={"format": "pt", **(metadata or {})})
    except OSError:
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise StorageError(int(code[1]), f"cannot write {out}: {os.strerror(int(code[1]))}", out) from None
