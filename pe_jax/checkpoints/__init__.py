"""Checkpoints: the PyTorch key table (naming), file readers, Orbax directories, and loading into a model."""
