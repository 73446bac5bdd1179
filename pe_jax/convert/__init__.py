"""Weight conversion: PyTorch checkpoint files <-> Orbax checkpoints (installed as pe_jax.convert)."""
