"""The offline demo: a small PE-Core CLIP trained from scratch on coloured shapes (`pe_jax.demo.shapes`), then
zero-shot classification among 12 colour x shape combinations it never saw (chance 1/12).

  pe-jax demo                     # this recipe end to end
  pe-jax finetune --config demo_shapes --workdir runs/shapes

`prepare` generates the dataset into WORKDIR/data the first time.
"""

import dataclasses
import os

from pe_jax.demo import generate_once, shapes
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec

TINY = dict(vision_image_size=64, vision_patch_size=16, vision_width=128, vision_heads=4, vision_layers=4,
            vision_mlp_dim=512, vision_output_dim=128,
            text_width=128, text_heads=4, text_layers=2, text_mlp_dim=512, text_output_dim=128, text_context_length=16)


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="contrastive",
        model=ModelSpec(preset="PE-Core-T16-384", overrides=TINY),
        data=DataSpec(train="", eval="", workers=2, eval_templates=shapes.EVAL_TEMPLATES),
        optim=OptimSpec(learning_rate=1e-3, warmup_steps=40, weight_decay=0.1, b2=0.98, end_lr_fraction=0.05),
        batch_size=128,
        steps=500,
        seed=0,
        log_every=10,
        eval_every=100,
        checkpoint_every=100,
    )


def prepare(cfg: FinetuneConfig, workdir: str, progress: bool = False) -> FinetuneConfig:
    """Generates the shapes dataset once (atomically) and points the config at it."""
    size = cfg.model.overrides.get("vision_image_size", 64)
    data = generate_once(os.path.join(workdir, "data"),
                         lambda tmp: shapes.generate(tmp, image_size=size, seed=cfg.seed, progress=progress))
    paths = dict(train=os.path.join(data, "train.jsonl"), eval=os.path.join(data, "eval.csv"))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))
