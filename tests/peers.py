"""The PyTorch peers (timm `vit_pe_*`, open_clip `PE-Core-*`) built offline with random, non-trivial weights."""

from __future__ import annotations

from functools import partial
from unittest import mock

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F

torch.set_num_threads(2)

# pe_jax preset -> (timm model, open_clip model)
TIMM_NAMES = {
    "PE-Core-T16-384": "vit_pe_core_tiny_patch16_384",
    "PE-Core-S16-384": "vit_pe_core_small_patch16_384",
    "PE-Core-B16-224": "vit_pe_core_base_patch16_224",
    "PE-Core-L14-336": "vit_pe_core_large_patch14_336",
    "PE-Core-G14-448": "vit_pe_core_gigantic_patch14_448",
    "PE-Lang-L14-448": "vit_pe_lang_large_patch14_448",
    "PE-Lang-G14-448": "vit_pe_lang_gigantic_patch14_448",
    "PE-Spatial-T16-512": "vit_pe_spatial_tiny_patch16_512",
    "PE-Spatial-S16-512": "vit_pe_spatial_small_patch16_512",
    "PE-Spatial-B16-512": "vit_pe_spatial_base_patch16_512",
    "PE-Spatial-L14-448": "vit_pe_spatial_large_patch14_448",
    "PE-Spatial-G14-448": "vit_pe_spatial_gigantic_patch14_448",
}
OPEN_CLIP_NAMES = {
    "PE-Core-T16-384": "PE-Core-T-16-384",
    "PE-Core-S16-384": "PE-Core-S-16-384",
    "PE-Core-B16-224": "PE-Core-B-16",
    "PE-Core-L14-336": "PE-Core-L-14-336",
    "PE-Core-G14-448": "PE-Core-bigG-14-448",
}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter to random, non-trivial values (default inits leave biases 0 and norms 1).

    timm's `head.bias` stays zero: the reference projection has no bias, so converted weights carry 0.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("head.bias"):
            r = torch.zeros_like(p)
        elif name.endswith("logit_scale"):
            r = torch.rand(p.shape, generator=g) * 2 + 2.0
        elif leaf in ("gamma", "gamma_1", "gamma_2"):
            r = 0.5 + 0.5 * torch.rand(p.shape, generator=g)
        elif p.ndim == 1 and leaf == "weight":  # norm scales
            r = 1.0 + 0.3 * r
        elif p.ndim <= 1:  # biases, class embedding
            r = 0.3 * r
        elif any(k in name for k in ("pos", "cls_token", "latent", "probe", "token_embedding")):
            r = 0.5 * r
        elif name.endswith(("proj", "text_projection")) and p.ndim == 2:  # x @ W parameters [in, out]
            r = r * p.shape[0] ** -0.5
        else:  # weights [out, in, ...]
            r = r * float(np.prod(p.shape[1:])) ** -0.5
        p.copy_(r.to(p.dtype))
    return module.eval()


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def make_timm(preset: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    return randomize_(timm.create_model(TIMM_NAMES[preset], pretrained=False, **kwargs), seed)


def make_open_clip(preset: str, seed: int = 0, vision_depth: int | None = None, text_layers: int | None = None):
    name = OPEN_CLIP_NAMES[preset]
    kwargs = {}
    if text_layers is not None:
        kwargs["text_cfg"] = dict(open_clip.get_model_config(name)["text_cfg"], layers=text_layers)
    create = timm.create_model if vision_depth is None else partial(timm.create_model, depth=vision_depth)
    with mock.patch.object(open_clip.timm_model.timm, "create_model", create):
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    return randomize_(model, seed)


def timm_at_resolution(preset: str, native: dict[str, np.ndarray], size: tuple[int, int], **kwargs):
    """A timm tower patched to behave as the reference at a non-native input size.

    timm rescales the RoPE grid to the pretraining grid and resamples position embeddings bicubic with
    antialias; the reference does neither. Building at the new size with `ref_feat_shape` equal to the new
    grid disables the rescaling, and the position embedding is pre-resampled the reference's way
    (bilinear, align_corners=False, class row kept).
    """
    patch = 14 if "14" in TIMM_NAMES[preset].rsplit("_", 2)[-2] else 16
    grid = (size[0] // patch, size[1] // patch)
    # ref_feat_shape = the new grid turns the rescaling off (passing None would be dropped silently).
    model = timm.create_model(TIMM_NAMES[preset], pretrained=False, img_size=size, ref_feat_shape=grid, **kwargs)
    sd = {k: torch.from_numpy(v) for k, v in native.items()}
    pos = sd["pos_embed"]
    n_prefix = 1 if "cls_token" in sd else 0
    g = int(round((pos.shape[1] - n_prefix) ** 0.5))
    grid_part = pos[:, n_prefix:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid_part = F.interpolate(grid_part, size=grid, mode="bilinear", align_corners=False)
    sd["pos_embed"] = torch.cat([pos[:, :n_prefix], grid_part.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], 1)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def run_torch(model, images_nhwc: np.ndarray, method: str | None = None) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.inference_mode():
        out = getattr(model, method)(x) if method else model(x)
    return out.numpy()


def compare(ours, theirs) -> tuple[float, float]:
    """(max abs difference, relative L2 difference)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = ours - theirs
    return float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(theirs))
