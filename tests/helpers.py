"""Independent references for the tests: locuslab's official model code and BN randomisation."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def official_convmixer(dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 1000,
                       act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """locuslab/convmixer's `ConvMixer` as published (with the activation as a parameter)."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                act(),
                nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, kernel_size=1),
            act(),
            nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )


def randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=generator)))
    return model


def copy_by_position(src: nn.Module, dst: nn.Module) -> None:
    """Copy tensors in module order, ignoring names: the two layouts list the same tensors in the same order."""
    src_state, dst_state = src.state_dict(), dst.state_dict()
    assert len(src_state) == len(dst_state)
    dst.load_state_dict({k: v.clone() for k, v in zip(dst_state, src_state.values(), strict=True)})


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Runs `python -m MODULE ARGS` with its address space capped at MEMORY_MB: a reader that allocates what a
# crafted file declares fails at once instead of swapping the machine.
_BOUNDED = """
import importlib, resource, sys
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""


def run_bounded(module: str, *args: object, memory_mb: int = 6144, timeout: float = 120):
    """A CLI run in a child process bounded in memory and time (a regression fails the test, not the suite);
    returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _BOUNDED, str(memory_mb), module, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc, code: int = 1) -> str:
    """The single `error:` line a CLI must print for bad input, checked: exit `code`, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), \
        (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def assert_bad_image_named_once(proc, bad, stop_line: str) -> None:
    """Under torchrun, a bad image on one process: that process names it in one `error:` line; the other says
    its peer ended (or `stop_line`, when torchrun stopped it first); no gloo traceback."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert sum(f"{bad}: cannot read the image" in line for line in lines) == 1, proc.stderr[-3000:]
    assert all("cannot read the image" in line or "another process of this run ended" in line
               or line == stop_line for line in lines), lines
    assert "pair.cc" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
