"""The PyTorch side of a pe_jax model: an open_clip `PE-Core-*` model of the same architecture, for weights
exported with `pe-jax export --format open_clip`. Needs torch, timm and open_clip (`pip install pe-jax[test]`);
`import pe_jax` never imports this module.
"""

from __future__ import annotations

from unittest import mock

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
