"""The MindSpore side's model: ConvMixer as a MindSpore cell with MindCV's parameter names (imports MindSpore)."""

from .model import MSConvMixer

__all__ = ["MSConvMixer"]
