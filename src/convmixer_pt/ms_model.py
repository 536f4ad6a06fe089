"""ConvMixer as a MindSpore Cell whose parameter names are MindCV's, so `.ckpt` files move between the two.

Names: `network.0.*` patch conv, `network.2.*` BatchNorm, block i under `network.{3+i}` (`.0.fn.0`,
`.0.fn.2`, `.1`, `.3`), pooling and flatten (no parameters), classifier `network.{depth+5}.*`. The GELU is the
exact (erf) one the published weights were trained with; MindSpore's `nn.GELU()` default is the tanh
approximation.

Importing this module imports MindSpore; `import convmixer_pt` does not.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .checkpoint import CheckpointError, file_format, misfit_error, mismatch_problems, unreadable
from .keymap import MS_PREFIX
from .model import variant_arch

ACTIVATIONS: dict[str, Callable[[], nn.Cell]] = {
    "gelu": lambda: nn.GELU(approximate=False),
    "gelu_tanh": lambda: nn.GELU(approximate=True),  # MindSpore's default; only for showing the difference
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

_CRC_TRAILER = b"crc_num"  # MindSpore appends b"crc_num" + 10 bytes of CRC32 when saving with crc_check=True


@cache
def quiet_numpy_bridge() -> None:
    """Trigger, once and silently, MindSpore's failing NumPy-1 C-API probe.

    MindSpore 2.10's wheel is built against NumPy 1.x; under NumPy 2 the first operator called with a
    Tensor made from a Python scalar (exact GELU does so) prints an ImportError traceback on stderr and
    carries on. Nothing here depends on that bridge; the noise would only bury real messages.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with contextlib.redirect_stderr(devnull):
                Tensor([0.0], ms.float32) + Tensor(1.0, ms.float32)
                sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def make_act(act: str) -> nn.Cell:
    try:
        return ACTIVATIONS[act]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}") from None


class Residual(nn.Cell):
    """`fn(x) + x`, named `fn` as in MindCV and every PyTorch checkpoint."""

    def __init__(self, fn: nn.Cell) -> None:
        super().__init__()
        self.fn = fn

    def construct(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class GlobalAvgPool(nn.Cell):
    """Mean over height and width, keeping them as 1x1 (MindCV's pooling cell has no parameters either)."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.mean(x, (2, 3), keep_dims=True)


class MSConvMixer(nn.Cell):
    """The ConvMixer of `convmixer_pt.model.ConvMixer`, in MindSpore, in inference mode."""

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        quiet_numpy_bridge()
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.in_chans, self.num_classes, self.act = in_chans, num_classes, act
        # PyTorch's BatchNorm momentum 0.1 is MindSpore's 0.9 (MindSpore weights the old statistic).
        self.network = nn.SequentialCell([
            nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, pad_mode="valid", has_bias=True),
            make_act(act),
            nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
            *[nn.SequentialCell([
                Residual(nn.SequentialCell([
                    nn.Conv2d(dim, dim, kernel_size, group=dim, pad_mode="same", has_bias=True),
                    make_act(act),
                    nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
                ])),
                nn.Conv2d(dim, dim, 1, pad_mode="valid", has_bias=True),
                make_act(act),
                nn.BatchNorm2d(dim, eps=1e-5, momentum=0.9),
            ]) for _ in range(depth)],
            GlobalAvgPool(),
            nn.Flatten(),
            nn.Dense(dim, num_classes),
        ])
        self.set_train(False)

    @property
    def arch(self) -> dict[str, Any]:
        return dict(dim=self.dim, depth=self.depth, kernel_size=self.kernel_size, patch_size=self.patch_size,
                    in_chans=self.in_chans, num_classes=self.num_classes, act=self.act)

    def construct(self, x: Tensor) -> Tensor:
        return self.network(x)

    def stages(self, x: Tensor) -> list[Tensor]:
        """Outputs after the stem and after each block, then the logits: where two models part ways."""
        cells = list(self.network.cell_list)
        x = cells[2](cells[1](cells[0](x)))
        outs = [x]
        for block in cells[3:3 + self.depth]:
            x = block(x)
            outs.append(x)
        for cell in cells[3 + self.depth:]:
            x = cell(x)
        outs.append(x)
        return outs


def check_crc(path: Path) -> None:
    """Verify the CRC32 a `.ckpt` carries, if it carries one.

    Done here because MindSpore's `crc_check=True` reports a mismatch as a possible permission problem
    (and logs it), and warns about files without a CRC.
    """
    data = path.read_bytes()
    if data[-17:-10] != _CRC_TRAILER:
        return
    if binascii.crc32(data[:-17]) != int.from_bytes(data[-10:], "big"):
        raise CheckpointError(f"{path}: its CRC32 does not match its content; the file is corrupt")


def read_ms_params(path: str | Path) -> dict[str, Parameter]:
    """The `network.*` parameters of a MindSpore `.ckpt`, CRC-checked when the file carries a CRC.

    Entries outside `network.` (optimizer moments, step counters) are training state and are left out,
    as the wrappers of a PyTorch training checkpoint are.
    """
    path = Path(path)
    if file_format(path) != "mindspore":
        raise CheckpointError(f"{path}: is not a MindSpore checkpoint")
    if not path.name.endswith(".ckpt"):
        raise CheckpointError(f"{path}: MindSpore only reads checkpoints whose name ends in .ckpt; rename it")
    check_crc(path)
    try:
        raw = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as e:
        raise unreadable(path, "a MindSpore checkpoint", e) from None
    params = {k: v for k, v in raw.items() if k.startswith(MS_PREFIX) and isinstance(v, Parameter)}
    if not params:
        raise CheckpointError(f"{path}: holds no `network.*` parameters (found {', '.join(list(raw)[:8])})")
    return params


def load_params_strict(net: nn.Cell, params: Mapping[str, Tensor], source: str) -> None:
    """Load every parameter of `net` from `params`: same names, shapes and dtypes, nothing left over."""
    problems = mismatch_problems(dict(net.parameters_and_names()), params, compare_dtype=True)
    if not problems:
        as_params = {k: v if isinstance(v, Parameter) else Parameter(v, name=k) for k, v in params.items()}
        not_loaded, not_used = ms.load_param_into_net(net, as_params, strict_load=True)
        if not_loaded or not_used:
            problems.append(f"MindSpore left {len(not_loaded)} model parameter(s) unloaded "
                            f"({', '.join(not_loaded[:8])}) and {len(not_used)} checkpoint tensor(s) unused "
                            f"({', '.join(not_used[:8])})")
    if problems:
        raise misfit_error(net, source, problems)


def create_ms_model(
    name: str,
    num_classes: int = 1000,
    checkpoint_path: str | Path | None = None,
    **overrides: Any,
) -> MSConvMixer:
    """Build a registered variant in MindSpore, as `convmixer_pt.create_model` does in PyTorch.

    A checkpoint is loaded strictly: every name, shape and dtype must match (a float16 file is refused
    rather than silently cast; convert it with `--dtype float32`).
    """
    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    net = MSConvMixer(**kwargs)
    if checkpoint_path is not None:
        load_params_strict(net, read_ms_params(checkpoint_path), str(checkpoint_path))
    return net
