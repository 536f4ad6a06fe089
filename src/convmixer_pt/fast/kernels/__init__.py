"""Triton kernels for ConvMixer's depthwise convolution and the BatchNorm around it (import Triton)."""

from . import batchnorm, common, depthwise, depthwise_nhwc, residual

__all__ = ["batchnorm", "common", "depthwise", "depthwise_nhwc", "residual"]
