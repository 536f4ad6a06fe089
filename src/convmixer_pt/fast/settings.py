"""The fast path's settings: one options object, resolved once when a model is built.

Environment variables give the defaults, read here and nowhere else, at construction: CONVMIXER_FAST (0/off
turns the kernels off for CUDA inputs), CONVMIXER_FAST_CHANNELS_LAST, CONVMIXER_FAST_BATCHNORM (1/on) and
CONVMIXER_DW_KERNEL (direct | mma). A bad value is a SettingError naming the variable, on every device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .. import errors

ENABLED_ENV = "CONVMIXER_FAST"
CHANNELS_LAST_ENV = "CONVMIXER_FAST_CHANNELS_LAST"
BATCHNORM_ENV = "CONVMIXER_FAST_BATCHNORM"
KERNEL_SET_ENV = "CONVMIXER_DW_KERNEL"
KERNEL_SETS = ("direct", "mma")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingError(errors.SettingError):
    """A fast-path option or one of its environment variables holds an unknown value."""


@dataclass(frozen=True)
class FastOptions:
    """How a model's blocks run.

    enabled: None runs the Triton kernels for CUDA inputs, True wherever they can run (CUDA, or the CPU when
    the kernels were imported under TRITON_INTERPRET=1, as the tests run them), False never.
    channels_last: channels_last inputs take the channels_last kernels (else the plain modules, i.e. cuDNN).
    fused_batchnorm: each BatchNorm runs fused with the activation before it (and the residual add after it).
    kernel_set: for fp16/bf16 NCHW, "direct" (one FMA per tap on CUDA cores) or "mma" (tensor cores).
    """

    enabled: bool | None = None
    channels_last: bool = False
    fused_batchnorm: bool = False
    kernel_set: str = "direct"

    def __post_init__(self) -> None:
        if self.enabled is not None and type(self.enabled) is not bool:
            raise SettingError(f"enabled {self.enabled!r} is not one of None, True, False")
        for name in ("channels_last", "fused_batchnorm"):
            if type(getattr(self, name)) is not bool:
                raise SettingError(f"{name} {getattr(self, name)!r} is not one of True, False")
        if self.kernel_set not in KERNEL_SETS:
            raise SettingError(f"kernel_set {self.kernel_set!r} is not one of {', '.join(map(repr, KERNEL_SETS))}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> FastOptions:
        """The defaults the environment variables set."""
        environ = os.environ if environ is None else environ
        kernel_set = environ.get(KERNEL_SET_ENV, "").strip().lower() or "direct"
        if kernel_set not in KERNEL_SETS:
            raise SettingError(f"{KERNEL_SET_ENV}={kernel_set!r} is not one of {', '.join(map(repr, KERNEL_SETS))}")
        return cls(enabled=None if _flag(environ, ENABLED_ENV, True) else False,
                   channels_last=_flag(environ, CHANNELS_LAST_ENV, False),
                   fused_batchnorm=_flag(environ, BATCHNORM_ENV, False),
                   kernel_set=kernel_set)


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingError(f"{name}={value!r} is not one of 1/true/on or 0/false/off")


def resolve(fast: bool | FastOptions | None) -> FastOptions:
    """The options of `create_model(..., fast=...)`: an options object as given; True, False or None set
    `enabled` over the environment's defaults for the rest (True and False also over CONVMIXER_FAST)."""
    if isinstance(fast, FastOptions):
        return fast
    if fast is not None and not isinstance(fast, bool):
        raise SettingError(f"fast must be True, False, None or a FastOptions, got {fast!r}")
    defaults = FastOptions.from_environment()
    if fast is None:
        return defaults
    return FastOptions(enabled=fast, channels_last=defaults.channels_last,
                       fused_batchnorm=defaults.fused_batchnorm, kernel_set=defaults.kernel_set)
