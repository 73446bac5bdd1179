"""The demo's PyTorch check: an open_clip `PE-Core-*` model of the same architecture as a pe_jax CLIP, loaded
with its weights in open_clip naming, must make the same zero-shot predictions. Needs torch, timm and open_clip
(`pip install -e ".[test]"`); `available()` says whether they are importable; `import pe_jax` never imports
this module.
"""

from __future__ import annotations

import importlib.util
import json
import os
from unittest import mock

import numpy as np

from pe_jax.config import CLIPConfig

# open_clip's PE-Core model config of each published (vision width, patch) family
_OPEN_CLIP = {(192, 16): "PE-Core-T-16-384", (384, 16): "PE-Core-S-16-384", (768, 16): "PE-Core-B-16",
              (1024, 14): "PE-Core-L-14-336"}


def open_clip_model(cfg: CLIPConfig, base: str = "PE-Core-T-16-384"):
    """An open_clip CLIP (random weights) with the architecture of `cfg`, any width, depth or resolution.

    open_clip builds PE towers from fixed timm model names, so the timm constructor is given the config's
    sizes; the RoPE reference grid is set to the actual grid, as the reference computes RoPE.
    """
    import open_clip
    import timm

    v, t = cfg.vision, cfg.text
    name = _OPEN_CLIP.get((v.width, v.patch_size), base)
    grid = v.image_size // v.patch_size
    tower = dict(patch_size=v.patch_size, embed_dim=v.width, depth=v.layers, num_heads=v.heads,
                 mlp_ratio=v.mlp_dim / v.width, img_size=v.image_size, ref_feat_shape=(grid, grid),
                 attn_pool_num_heads=v.attn_pooler_heads, attn_pool_mlp_ratio=float(v.attn_pooler_mlp_ratio))
    if v.ls_init_value is not None or not v.use_cls_token or v.pool_type != "attn":
        raise ValueError("open_clip_model covers PE-Core-like towers: class token, attention pooling, no LayerScale")
    base_cfg = open_clip.get_model_config(name)
    vision_cfg = dict(base_cfg["vision_cfg"], image_size=v.image_size)
    text_cfg = dict(base_cfg["text_cfg"], width=t.width, heads=t.heads, layers=t.layers,
                    context_length=t.context_length, vocab_size=t.vocab_size, mlp_ratio=t.mlp_dim / t.width)
    if v.output_dim != t.output_dim:
        raise ValueError(f"vision and text output dims differ ({v.output_dim} vs {t.output_dim})")
    create = timm.create_model

    def create_tower(model_name, **kwargs):
        return create(model_name, **{**kwargs, **tower})

    with mock.patch.object(open_clip.timm_model.timm, "create_model", create_tower):
        return open_clip.create_model(name, pretrained=None, embed_dim=v.output_dim, vision_cfg=vision_cfg,
                                      text_cfg=text_cfg).eval()


def load_exported(cfg: CLIPConfig, safetensors_path: str):
    """The open_clip model of `cfg` with the weights of an open_clip-named safetensors file (strict)."""
    import torch
    from safetensors.torch import load_file

    model = open_clip_model(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in load_file(safetensors_path).items()}, strict=True)
    return model.eval()


_NEEDS = ("torch", "timm", "open_clip")


def available() -> bool:
    """Whether torch, timm and open_clip are installed (found on the path; `unavailable` also imports them).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return all(importlib.util.find_spec(m) is not None for m in _NEEDS)


def unavailable() -> str | None:
    """None where torch, timm and open_clip are installed and import; else why the check cannot run, in a few
    words. Imports them: an install that is present but broken (a torch whose libraries do not load) must skip
    the check before the demo trains, not fail after it.

    Example:
        >>> reason = unavailable()  # e.g. "torch, timm and open_clip are not installed; ..."
        >>> reason is None or isinstance(reason, str)
        True
    """
    if not available():
        return "torch, timm and open_clip are not installed; pip install -e '.[test]'"
    for name in _NEEDS:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure of a broken install (ImportError, OSError, RuntimeError, ...)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"{name} is installed but does not import: {type(e).__name__}: {first}"
    return None


def open_clip_agreement(workdir: str) -> tuple[int, int]:
    """Writes a finished demo run's weights in open_clip naming, loads them into open_clip strictly and
    compares the zero-shot predictions on the held-out images: (images predicted alike, images)."""
    import torch
    from safetensors.numpy import save_file

    from pe_jax.checkpoints.load import torch_state_dict
    from pe_jax.evals import zero_shot
    from pe_jax.pretrained import resolve_model
    from pe_jax.train.config import config_from_dict
    from pe_jax.train.evaluate import Evaluator
    from pe_jax.train.tasks import ContrastiveTask

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    model = resolve_model(os.path.join(workdir, "model")).load()
    exported = os.path.join(workdir, "open_clip_model.safetensors")
    save_file(torch_state_dict(model, "open_clip"), exported, metadata={"format": "pt"})
    evaluator = Evaluator(cfg, model.config.vision.image_size, model.config.text.context_length)
    ours = evaluator.logits(ContrastiveTask(model))

    torch_model = load_exported(model.config, exported)
    with torch.inference_mode():
        images = torch.from_numpy(evaluator.images.transpose(0, 3, 1, 2).copy())
        image_features = torch_model.encode_image(images, normalize=True).numpy()
        tokens = torch.from_numpy(evaluator.prompt_tokens()).long()
        text_features = torch_model.encode_text(tokens, normalize=True).numpy()
    theirs = zero_shot.classify(image_features, zero_shot.average_templates(text_features, len(evaluator.classnames)))
    agree = int((np.argmax(ours, 1) == np.argmax(theirs, 1)).sum())
    return agree, len(ours)
