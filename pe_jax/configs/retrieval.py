"""Finetuning a PE vision tower for instance (product) retrieval: metric learning on labelled images.

  pe-jax finetune --config retrieval --workdir runs/retrieval \
      --set model.checkpoint=ckpt/ --set data.train=products/train/ --set data.eval=products/heldout/

data.train and data.eval are folders with one subfolder per product (or CSVs of path,label); the held-out
products must be others than the trained ones (the run refuses shared classes). Batches are 16 products x 4
images (class-balanced, deterministic, resumable); the loss is supervised contrastive (--set
metric_loss=arcface | cosface | multi_similarity for the others). The eval is leave-one-out retrieval over the
held-out images, mAP@10 keeping the best checkpoint. --set layer_idx=-4 --set pooling=mean trains (and
retrieves with) the mean patch tokens of an intermediate block instead of the head's embedding.
"""

from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="retrieval",
        model=ModelSpec(preset="PE-Core-B16-224", checkpoint=None,
                        overrides=dict(dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable")),
        data=DataSpec(train="train/", eval="heldout/", augment=True, workers=8),
        optim=OptimSpec(optimizer="adamw", learning_rate=1e-5, warmup_steps=200, weight_decay=0.05, b2=0.999,
                        layer_decay=0.75),
        metric_loss="supcon",
        classes_per_batch=16,
        batch_size=64,
        steps=3_000,
        log_every=20,
        eval_every=500,
        checkpoint_every=500,
        best_metric="eval_mAP@10",
    )
