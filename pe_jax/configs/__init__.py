"""Finetuning recipes: each file's `get_config()` returns a `pe_jax.train.config.FinetuneConfig`.

Run one with `pe-jax finetune --config configs/NAME.py --workdir DIR [--set key=value ...]` (installed as
`pe_jax.configs`, so `--config NAME` works from anywhere).
"""
