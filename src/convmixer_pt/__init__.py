"""ConvMixer for PyTorch with exact PyTorch <-> MindSpore checkpoint conversion."""

from .checkpoint import CheckpointError, load_model_weights, read_state_dict
from .model import VARIANTS, ConvMixer, create_model, list_models, variant_arch

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConvMixer",
    "create_model",
    "list_models",
    "load_model_weights",
    "read_state_dict",
    "variant_arch",
]
__version__ = "0.1.0"
