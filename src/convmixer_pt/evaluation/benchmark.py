"""Throughput of this project's ConvMixer against timm's, measured in one process on one device.

Why both in one run: GPU throughput moves with the card, clocks, driver and library versions, so a ratio is
only meaningful when both sides are measured under the same conditions. Timing follows the usual rules:
synthetic data already on the device, warm-up steps first (they include torch.compile's compilation), CUDA
events around the timed steps (host clock after a synchronisation elsewhere), the median over repeats.

Per model and mode the rows are timm's ConvMixer, the peer, in each layout asked for, eager and (with
`compiled`) under torch.compile, then this project's model eager and compiled. Every row's ratio is against
the best peer row: timm at its fastest configuration among those measured, not at the one that suits us.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..factory import create_model
from ..fast import FastOptions
from ..runtime import autocast
from ..variants import ACTIVATIONS, VARIANTS, variant_arch

IMPLS = ("timm", "convmixer_pt")
MODES = ("train", "infer")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    mode: str
    batch_size: int
    img_size: int = 224
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    amp: str = "bf16"
    channels_last: bool = False
    compile: bool = False
    device: str = "cuda"
    # Our model's fast path; by default the Triton kernels wherever they can run (CUDA), plain PyTorch elsewhere.
    fast: FastOptions = field(default_factory=lambda: FastOptions(enabled=True))
    num_classes: int = 1000


def forward_macs(model: str, img_size: int, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass for one image: the convolutions and the classifier."""
    arch = variant_arch(model)
    dim, depth, k, p = arch["dim"], arch["depth"], arch["kernel_size"], arch["patch_size"]
    hw = (img_size // p) ** 2
    stem = hw * dim * in_chans * p * p
    block = hw * (dim * k * k + dim * dim)
    return stem + depth * block + dim * num_classes


def build(impl: str, cfg: BenchConfig) -> nn.Module:
    """The model of `impl` with the architecture of `cfg.model` (timm's registry name where it has one)."""
    if impl == "convmixer_pt":
        return create_model(cfg.model, num_classes=cfg.num_classes, fast=cfg.fast)
    if impl != "timm":
        raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    import timm
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    timm_name = VARIANTS[cfg.model]["timm_name"] if cfg.model in VARIANTS else None
    if timm_name is not None:
        return timm.create_model(timm_name, pretrained=False, num_classes=cfg.num_classes)
    arch = variant_arch(cfg.model)
    return TimmConvMixer(arch["dim"], arch["depth"], arch["kernel_size"], arch["patch_size"],
                         num_classes=cfg.num_classes, act_layer=ACTIVATIONS[arch["act"]].torch)


def _step_fn(model: nn.Module, cfg: BenchConfig) -> Callable[[], None]:
    """One training step (forward, backward, AdamW under AMP) or one inference forward pass."""
    device = torch.device(cfg.device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device, generator=gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(torch.device(cfg.device), cfg.amp):
                model(x)

        return infer
    model.train()
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def train() -> None:
        with autocast(torch.device(cfg.device), cfg.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return train


def time_per_step(step: Callable[[], None], cfg: BenchConfig,
                  log: Callable[[str], None] | None = None) -> float:
    """Median over `repeats` of the mean time of `steps` consecutive steps, in seconds, after warm-up; `log`
    gets an estimate of the time the timed steps will take, from the warm-up's."""
    cuda = torch.device(cfg.device).type == "cuda"
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(cfg.device)
    if log is not None and cfg.warmup > 0:
        per_step = (time.perf_counter() - t0) / cfg.warmup  # the first step's start-up included: an upper bound
        log(f"  warm-up {per_step:.2f} s/step; about {per_step * cfg.steps * cfg.repeats:.0f} s for "
            f"{cfg.repeats} x {cfg.steps} timed steps")
    times = []
    for _ in range(cfg.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(cfg.steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / cfg.steps)
        else:
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                step()
            times.append((time.perf_counter() - t0) / cfg.steps)
    return statistics.median(times)


def _versions(device: torch.device) -> dict[str, Any]:
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(device_name=name, torch=torch.__version__, timm=timm.__version__, triton=triton_version)


def measure(impl: str, cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One row: throughput, achieved TFLOP/s (training counted as 3x the forward) and peak memory; `log` gets the
    estimate of `time_per_step`."""
    device = torch.device(cfg.device)
    gc.collect()
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)  # CUDA events and Triton launches use the current device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(impl, cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        torch._dynamo.reset()  # otherwise a second shape recompiles with dynamic shapes, unlike a user's run
        model = torch.compile(model)
    seconds = time_per_step(_step_fn(model, cfg), cfg, log)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    flops = 2 * forward_macs(cfg.model, cfg.img_size, cfg.num_classes) * cfg.batch_size
    flops *= 3 if cfg.mode == "train" else 1
    del model
    row = dict(impl=impl, **asdict(cfg))
    kernels_ran = cfg.fast.enabled is not False and impl == "convmixer_pt" and device.type == "cuda"
    row.update(fast=asdict(cfg.fast) if impl == "convmixer_pt" else None,
               dw_kernel=_dw_kernel(cfg.fast, cfg.channels_last) if kernels_ran else None,
               fused_bn=cfg.fast.fused_batchnorm if kernels_ran else None,
               step_ms=seconds * 1e3,
               img_per_s=cfg.batch_size / seconds, tflops=flops / seconds / 1e12, peak_mem_mib=peak,
               **_versions(device))
    return row


def row_label(row: dict[str, Any]) -> str:
    """'timm channels_last compiled', 'convmixer_pt NCHW eager', ...: which configuration a row measured."""
    return f"{row['impl']} {'channels_last' if row['channels_last'] else 'NCHW'} " \
           f"{'compiled' if row['compile'] else 'eager'}"


def plan(cfg: BenchConfig, compiled: bool = False,
         peer_layouts: Sequence[bool] | None = None) -> list[tuple[str, BenchConfig]]:
    """The rows of one model and mode: timm in each of `peer_layouts` (channels_last or not; default the
    config's layout), eager and, with `compiled`, compiled; then this project's model the same two ways in
    the config's layout."""
    compile_modes = (False, True) if compiled else (False,)
    layouts = (cfg.channels_last,) if peer_layouts is None else tuple(dict.fromkeys(peer_layouts))
    peers = [("timm", replace(cfg, channels_last=cl, compile=c)) for cl in layouts for c in compile_modes]
    return peers + [("convmixer_pt", replace(cfg, compile=c)) for c in compile_modes]


def run(configs: list[BenchConfig], log: Callable[[str], None] | None = None, compiled: bool = False,
        peer_layouts: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """The rows of `plan` for every config; every row gets its ratio to the best peer row of its model and
    mode (`ratio_to_best_peer`, and `best_peer`, that row's label)."""
    rows = []
    todo = [(cfg, impl, row_cfg) for cfg in configs for impl, row_cfg in plan(cfg, compiled, peer_layouts)]
    done = 0
    for cfg in configs:
        group = []
        for impl, row_cfg in plan(cfg, compiled, peer_layouts):
            done += 1
            what = "forward + backward + AdamW steps" if cfg.mode == "train" else "forward passes"
            if log is not None:
                log(f"[{done}/{len(todo)}] {row_label(dict(impl=impl, **asdict(row_cfg)))} {cfg.model} {cfg.mode}: "
                    f"{what} of {cfg.batch_size} images at {cfg.img_size}x{cfg.img_size} on {cfg.device}, "
                    f"{row_cfg.warmup} warm-up + {row_cfg.repeats} x {row_cfg.steps} timed")
            row = measure(impl, row_cfg, log)
            group.append(row)
            if log is not None:
                log(f"  {row['img_per_s']:.1f} img/s ({row['step_ms']:.1f} ms/step)")
        best = max((r for r in group if r["impl"] == "timm"), key=lambda r: r["img_per_s"])
        for row in group:
            row.update(ratio_to_best_peer=row["img_per_s"] / best["img_per_s"], best_peer=row_label(best))
        rows.extend(group)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "mode", "layout", "batch", "impl", "compiled", "img/s", "TFLOP/s", "x best peer", "peak MiB")
    lines = [header]
    for r in rows:
        mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append((r["model"], r["mode"], "NHWC" if r["channels_last"] else "NCHW", str(r["batch_size"]),
                      r["impl"], "yes" if r["compile"] else "no", f"{r['img_per_s']:.1f}", f"{r['tflops']:.2f}",
                      f"{r['ratio_to_best_peer']:.2f}", mem))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def _dw_kernel(options: FastOptions, channels_last: bool) -> str | None:
    """The depthwise kernel set the fast path runs ('mma', 'direct' or 'channels_last'), or None where the
    blocks run the plain modules (no Triton, or channels_last inputs without the channels_last kernels)."""
    try:
        from ..fast import kernels  # noqa: F401  (Triton is an optional dependency)
    except ImportError:
        return None
    if channels_last:
        return "channels_last" if options.channels_last else None
    return options.kernel_set


def depthwise_op_times(batch: int, dim: int, size: int, kernel: int, dtype: torch.dtype = torch.bfloat16,
                       act: str = "gelu", device: str = "cuda") -> list[dict[str, Any]]:
    """Milliseconds of act(depthwise conv) forward and forward+backward: PyTorch NCHW and channels_last
    against the Triton kernels (both NCHW sets and channels_last), one ConvMixer block's worth (what the
    model-level numbers are made of)."""
    import triton.testing

    from ..fast.kernels.depthwise import depthwise_conv2d

    conv = nn.Conv2d(dim, dim, kernel, groups=dim, padding="same").to(device)
    x0 = torch.randn(batch, dim, size, size, device=device, dtype=dtype)
    act_fn = getattr(F, act)

    def torch_op(x: torch.Tensor) -> torch.Tensor:
        return act_fn(F.conv2d(x, conv.weight.to(dtype), conv.bias.to(dtype), padding="same", groups=dim))

    def triton_op(x: torch.Tensor, kernel_set: str = "direct") -> torch.Tensor:
        return depthwise_conv2d(x, conv.weight, conv.bias, act, kernel_set)

    x_cl = x0.contiguous(memory_format=torch.channels_last)
    variants = {  # name: (input, op)
        "torch_nchw": (x0, torch_op),
        "torch_channels_last": (x_cl, torch_op),
        "triton_direct": (x0, triton_op),
        "triton_mma": (x0, lambda x: triton_op(x, "mma")),
        "triton_channels_last": (x_cl, triton_op),
    }
    rows = []
    for name, (x, fn) in variants.items():
        xg = x.detach().requires_grad_()
        grad = torch.randn_like(x)

        def fwd_bwd(fn=fn, xg=xg, grad=grad) -> None:
            torch.autograd.backward(fn(xg), grad, inputs=[xg, conv.weight, conv.bias])

        fwd = triton.testing.do_bench(lambda fn=fn, x=x: fn(x), return_mode="median")
        both = triton.testing.do_bench(fwd_bwd, return_mode="median")
        rows.append(dict(op="depthwise+act", impl=name, batch=batch, dim=dim, size=size, kernel=kernel,
                         dtype=str(dtype), fwd_ms=fwd, fwd_bwd_ms=both))
    return rows
