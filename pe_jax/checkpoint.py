"""Loading checkpoints into models by path: PyTorch safetensors (any of the three namings)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from pe_jax.weights import load_torch_state_dict


class SafetensorsDict(Mapping):
    """A read-only, memory-mapped view of a safetensors file: tensors are read when asked for."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = os.fspath(path)
        try:
            self._file = safe_open(self.path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from None
        self._keys = list(self._file.keys())

    def __getitem__(self, key):
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_state_dict(path: str | os.PathLike) -> Mapping:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return SafetensorsDict(path)
    raise ValueError(f"{path}: unsupported checkpoint format (expected a .safetensors file)")


def load(model, checkpoint):
    """Returns `model` (typically an `nnx.eval_shape` skeleton) filled from `checkpoint`.

    `checkpoint` is a path or an in-memory PyTorch state dict (a mapping of key -> array).
    """
    if isinstance(checkpoint, Mapping):
        return load_torch_state_dict(model, checkpoint)
    return load_torch_state_dict(model, open_state_dict(checkpoint))
