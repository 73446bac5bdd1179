"""pe_jax: Meta's Perception Encoder (PE-Core CLIP, PE-Lang, PE-Spatial) in JAX / Flax NNX."""

from pe_jax.checkpoint import load_model, save
from pe_jax.config import CLIPConfig, TextConfig, VisionConfig, available_configs, clip_config, vision_config
from pe_jax.modeling import CLIP, TextTransformer, VisionTransformer
from pe_jax.weights import CheckpointMismatchError, detect_naming, load_torch_state_dict, torch_state_dict

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointMismatchError",
    "TextConfig",
    "TextTransformer",
    "VisionConfig",
    "VisionTransformer",
    "available_configs",
    "clip_config",
    "detect_naming",
    "load_model",
    "load_torch_state_dict",
    "save",
    "torch_state_dict",
    "vision_config",
]
