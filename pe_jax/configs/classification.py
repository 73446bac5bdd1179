"""Full finetuning of a PE vision tower with a classification head and layer-wise learning-rate decay.

  pe-jax finetune --config classification --workdir runs/cls \
      --set model.checkpoint=ckpt/ --set data.train=train/ --set data.eval=val/

The head sits on the pooled embedding; --set layer_idx=-4 puts it on the mean patch tokens of an
intermediate block instead (PE's best features are inside the network); --set head=mlp for an MLP head.
"""

from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="classification",
        model=ModelSpec(preset="PE-Core-B16-224", checkpoint=None,
                        overrides=dict(dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable")),
        data=DataSpec(train="train/", eval="val/", augment=True, workers=8),
        optim=OptimSpec(optimizer="adamw", learning_rate=5e-4, warmup_steps=500, weight_decay=0.05, b2=0.999,
                        layer_decay=0.75),
        head="linear",
        layer_idx=None,
        batch_size=256,
        steps=10_000,
        log_every=20,
        eval_every=1000,
        checkpoint_every=1000,
        best_metric="eval_top1",
    )
