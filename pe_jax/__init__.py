"""pe_jax: Meta's Perception Encoder (PE-Core CLIP, PE-Lang, PE-Spatial) in JAX / Flax NNX."""

import importlib

from pe_jax import deprecated as _deprecated

__version__ = "0.1.0"

# Public names -> the module defining them. Imported on first use (PEP 562), so that `pe-jax --help` and
# a conversion's file scan and hashing start before jax and flax have loaded (~1.5 s).
_EXPORTS = {
    "load_model": "pretrained", "resolve_model": "pretrained", "ResolvedModel": "pretrained",
    "save": "checkpoints.orbax",
    "CLIPConfig": "config", "TextConfig": "config", "VisionConfig": "config", "available_configs": "config",
    "clip_config": "config", "vision_config": "config",
    "CLIP": "modeling", "TextTransformer": "modeling", "VisionTransformer": "modeling",
    "CheckpointMismatchError": "checkpoints.params", "detect_naming": "checkpoints.naming",
    "load_torch_state_dict": "checkpoints.load", "torch_state_dict": "checkpoints.load",
    "PeJaxError": "errors",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pe_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pe_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)

_deprecated.install()  # old module names (pe_jax.sources, pe_jax.embed_output, ...) still import
