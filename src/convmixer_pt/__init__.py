"""ConvMixer for PyTorch with exact PyTorch <-> MindSpore checkpoint conversion.

Layers, each importing only those below it (docs/architecture.md):
errors, files, variants (the registry), runtime, data < fast (kernels < settings, dispatch, ops) < model,
mindspore (the MindSpore cell) < weights (keymap < torch_io, ms_files < ms_io < ms_net < formats < parity <
convert, mindir) < factory, timm_models < evaluation, export < train < cli. MindSpore is an optional extra: only
running the MindSpore model needs it.

`import convmixer_pt.timm_models` registers the variants in timm's model registry (this module does not: it
would import timm.models).
"""

from .errors import CheckpointError, UserError
from .factory import create_model, create_ms_model
from .model import ConvMixer
from .variants import VARIANTS, list_models, variant_arch
from .weights.formats import load_model_weights, read_weights
from .weights.torch_io import read_state_dict

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConvMixer",
    "UserError",
    "create_model",
    "create_ms_model",
    "list_models",
    "load_model_weights",
    "read_state_dict",
    "read_weights",
    "variant_arch",
]
__version__ = "0.1.0"
