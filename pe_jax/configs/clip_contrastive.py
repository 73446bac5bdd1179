"""Contrastive image-text finetuning of a PE-Core CLIP (softmax CLIP loss, learnable logit scale).

  pe-jax finetune --config clip_contrastive --workdir runs/clip \
      --set model.checkpoint=ckpt/ --set data.train='shards/{000..099}.tar' --set data.eval=val/

Options: --set loss=sigmoid (SigLIP, adds a logit bias); --set freeze=text (locked-text tuning, the text
tower frozen) or freeze=vision; --set mesh=fsdp=8 for a sharded job; bf16 compute with fp32 master
weights is the default here.
"""

from pe_jax.train.config import DataSpec, FinetuneConfig, ModelSpec, OptimSpec


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task="contrastive",
        model=ModelSpec(preset="PE-Core-B16-224", checkpoint=None,
                        overrides=dict(dtype="bfloat16", param_dtype="float32", remat_policy="nothing_saveable")),
        data=DataSpec(train="pairs.jsonl", eval=None, augment=False, workers=8),
        optim=OptimSpec(optimizer="adamw", learning_rate=1e-5, warmup_steps=500, weight_decay=0.05, b2=0.98),
        loss="softmax",
        freeze="none",
        batch_size=256,
        steps=10_000,
        log_every=20,
        eval_every=1000,
        checkpoint_every=1000,
        keep_checkpoints=2,
    )
