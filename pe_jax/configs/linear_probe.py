"""A linear probe: the vision tower frozen, only a linear head trains (no optimizer state for the tower).

  pe-jax finetune --config linear_probe --workdir runs/probe \
      --set model.checkpoint=ckpt/ --set data.train=train/ --set data.eval=val/
"""

from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="classification",
        model=ModelSpec(preset="PE-Core-B16-224", checkpoint=None, overrides=dict(dtype="bfloat16")),
        data=DataSpec(train="train/", eval="val/", augment=False, workers=8),
        optim=OptimSpec(optimizer="adamw", learning_rate=1e-3, warmup_steps=100, weight_decay=0.0, b2=0.999),
        freeze="encoder",
        head="linear",
        batch_size=256,
        steps=2_000,
        log_every=20,
        eval_every=500,
        checkpoint_every=500,
    )
