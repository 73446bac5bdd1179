"""The retrieval demo: a PE vision tower finetuned for instance retrieval on generated products
(`pe_jax.demo.products`: 240 training and 80 held-out products, 8 views each, 64 px), evaluated by
leave-one-out retrieval over the held-out products, which training never sees.

  pe-jax demo --workdir runs/shapes                        # the backbone: the shapes demo's CLIP
  pe-jax finetune --config demo_retrieval --workdir runs/products --set model.checkpoint=runs/shapes/model
  pe-jax eval retrieval --checkpoint runs/products/model --queries runs/products/data/heldout \
      --labels label --layers 0,1,2,-1 --pooling attn,mean,cls -k 1,5,10

Without model.checkpoint the same small tower trains from random init. `prepare` generates the products into
WORKDIR/data the first time.
"""

import dataclasses
import os

from pe_jax.configs.demo_shapes import TINY
from pe_jax.demo import generate_once, products
from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="retrieval",
        model=ModelSpec(preset="PE-Core-T16-384", overrides=TINY),
        data=DataSpec(train="data/train", eval="data/heldout", workers=2, augment=False),  # set by prepare
        optim=OptimSpec(learning_rate=1e-3, warmup_steps=20, weight_decay=0.05, b2=0.98, end_lr_fraction=0.05),
        metric_loss="supcon",
        classes_per_batch=16,
        batch_size=64,
        steps=300,
        log_every=10,
        eval_every=100,
        checkpoint_every=100,
        keep_checkpoints=1,
        best_metric="eval_mAP@10",
    )


def prepare(cfg: FinetuneConfig, workdir: str, progress: bool = False) -> FinetuneConfig:
    """Generates the products once (atomically) and points the config at them."""
    size = cfg.model.overrides.get("vision_image_size", 64)
    data = generate_once(os.path.join(workdir, "data"),
                         lambda tmp: products.generate(tmp, image_size=size, seed=cfg.seed, progress=progress))
    paths = dict(train=os.path.join(data, "train"), eval=os.path.join(data, "heldout"))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))
