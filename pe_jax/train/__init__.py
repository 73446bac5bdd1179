"""Finetuning: tasks and losses, optimizers, the sharded train step, its config, the grain pipeline and the loop."""
