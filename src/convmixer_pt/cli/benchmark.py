"""Measure this project's ConvMixer against timm's in the same process: img/s, TFLOP/s, ratio, peak memory.

    convmixer-benchmark --model convmixer_1536_20 --mode train infer --json bench.json
    convmixer-benchmark --model convmixer_768_32 --channels-last --channels-last-kernels --fused-bn
    convmixer-benchmark --model convmixer_1536_20 --compile --peer-layouts nchw channels_last
    convmixer-benchmark --device cpu --model convmixer_128_4    # a CPU smoke run, under a minute
    convmixer-benchmark --depthwise-op --dim 1536 --size 32 --kernel 9 --batch-size 64   # one op
    taskset -c 0 convmixer-benchmark --convert --workdir /tmp/bench --json convert.json   # conversion
    taskset -c 0 convmixer-benchmark --shards --workdir /tmp/shards --json shards.json    # tar shards
    convmixer-benchmark --loader --json loader.json     # the training input pipeline per core vs timm's

Each row says what it measures before it starts, then how long it will take. On a CPU the sizes default to a
smoke run (batch 4, 32 x 32 images, 2 repeats of 2 steps); on CUDA to the published configuration.
Training steps are forward + backward + AdamW under autocast; inference is a forward pass under
inference_mode. timm's ConvMixer is the peer: it runs in each --peer-layouts layout (default: the run's),
eager and, with --compile, under torch.compile, beside this project's model eager and compiled; every row's
ratio is against the best peer row. The fast-path flags default to the CONVMIXER_FAST_* environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..evaluation.benchmark import MODES, BenchConfig, depthwise_op_times, format_table
from ..evaluation.benchmark import run as bench
from ..evaluation.convert_benchmark import conversion_times, environment
from ..evaluation.shard_benchmark import shard_read_times
from ..fast import FastOptions
from ..fast.settings import KERNEL_SETS
from ..files import check_output, write_text
from ..runtime import AMP_DTYPES, resolve_device
from ..train.loader_benchmark import PHOTO_SHAPES, generated_photos, loader_times
from ..train.loader_benchmark import format_table as format_loader_table
from ..variants import check_sizes, list_models, variant_arch
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["convmixer_1536_20"], choices=list_models())
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    gpu, cpu, loader = SIZES["cuda"], SIZES["cpu"], SIZES["loader"]
    p.add_argument("--batch-size", type=int,
                   help="images per training step, the --depthwise-op batch and the --loader batch (default: "
                        f"{gpu['batch_size']} on CUDA, {cpu['batch_size']} on a CPU, {loader['batch_size']} with "
                        "--loader)")
    p.add_argument("--infer-batch-size", type=int,
                   help=f"images per inference forward pass (default: {gpu['infer_batch_size']} on CUDA, "
                        f"{cpu['infer_batch_size']} on a CPU)")
    p.add_argument("--img-size", type=int,
                   help=f"input height = width in pixels (default: {gpu['img_size']} on CUDA, the published "
                        f"models' size; {cpu['img_size']} on a CPU; {loader['img_size']} with --loader)")
    p.add_argument("--steps", type=int,
                   help=f"steps per timed repeat (default: {gpu['steps']} on CUDA, {cpu['steps']} on a CPU)")
    p.add_argument("--repeats", type=int,
                   help=f"timed repeats, the median reported (default: {gpu['repeats']} on CUDA, {cpu['repeats']} "
                        f"on a CPU, {loader['repeats']} passes with --loader)")
    p.add_argument("--warmup", type=int,
                   help=f"untimed steps before each row (default: {gpu['warmup']} on CUDA, {cpu['warmup']} on a "
                        "CPU)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--channels-last", action="store_true", help="input and both models in channels_last")
    p.add_argument("--compile", action="store_true",
                   help="also both models under torch.compile (our compiled fast path; timm compiled as a peer)")
    p.add_argument("--peer-layouts", nargs="+", choices=("nchw", "channels_last"),
                   help="layouts timm's model runs in as the peer (default: the run's layout)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if there is one)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction,
                   help="this project's Triton fast path where it can run (CUDA); --no-fast: plain PyTorch")
    p.add_argument("--channels-last-kernels", action=argparse.BooleanOptionalAction,
                   help="channels_last inputs take the channels_last kernels")
    p.add_argument("--fused-bn", action=argparse.BooleanOptionalAction,
                   help="BatchNorm fused with its activation (and the residual add)")
    p.add_argument("--kernel-set", choices=KERNEL_SETS,
                   help="NCHW fp16/bf16 depthwise kernels: direct or mma (tensor cores)")
    p.add_argument("--json", metavar="OUT", help="write the rows as a JSON list")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    p.add_argument("--depthwise-op", action="store_true",
                   help="time one depthwise conv + GELU (PyTorch NCHW / channels_last vs Triton) instead")
    p.add_argument("--dim", type=int, default=1536, help="--depthwise-op channels")
    p.add_argument("--size", type=int, default=32, help="--depthwise-op plane height = width")
    p.add_argument("--kernel", type=int, default=9, help="--depthwise-op kernel size")
    p.add_argument("--convert", action="store_true",
                   help="time checkpoint conversion of --model's official file instead (fresh processes, --repeats "
                        "each; MindSpore's figures where it is installed)")
    p.add_argument("--shards", action="store_true",
                   help="time reading tar shards instead: the trainer's chunked order against one global shuffle "
                        "(--num-shards shards of 1000 small samples, written to --workdir once)")
    p.add_argument("--num-shards", type=int, default=160, help="--shards: how many shards of 1000 samples")
    p.add_argument("--loader", action="store_true",
                   help="time the trainer's input pipeline per core (one process, one thread, CPU time) against "
                        "timm's train.py loader instead, at --img-size, in batches of --batch-size, --repeats passes")
    p.add_argument("--data-dir", help="--loader: an ImageFolder tree to read (default: generated photo-like JPEGs "
                                      "in a temporary folder, removed afterwards)")
    p.add_argument("--num-images", type=int, default=256, help="--loader: images per pass")
    p.add_argument("--workdir", default="convert_benchmark",
                   help="--convert, --shards: the folder in which they make a folder of their own for their files")
    return p


# Sizes by device: a GPU's measure the published configuration; a CPU's keep a small model's benchmark
# (train and infer, timm and ours: four rows) under a minute on two cores. The loader runs on the CPU whatever
# the device: the paper's 224 pixels in batches of 64, five passes (about a minute on two cores).
SIZES = {
    "cuda": dict(batch_size=64, infer_batch_size=256, img_size=224, steps=10, repeats=5, warmup=3),
    "cpu": dict(batch_size=4, infer_batch_size=8, img_size=32, steps=2, repeats=2, warmup=1),
    "loader": dict(batch_size=64, infer_batch_size=256, img_size=224, steps=1, repeats=5, warmup=0),
}


def fill_sizes(args: argparse.Namespace, device: torch.device) -> None:
    """The sizes not given on the command line, for `device`'s kind (for --loader, the loader's)."""
    kind = "loader" if args.loader else "cuda" if device.type == "cuda" else "cpu"
    for name, value in SIZES[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def fast_options(args: argparse.Namespace) -> FastOptions:
    """The flags over the environment's defaults (CONVMIXER_FAST*); the kernels wherever they can run unless
    --no-fast or CONVMIXER_FAST=0."""
    env = FastOptions.from_environment()
    pick = [(args.fast, env.enabled is not False), (args.channels_last_kernels, env.channels_last),
            (args.fused_bn, env.fused_batchnorm), (args.kernel_set, env.kernel_set)]
    enabled, channels_last, fused, kernel_set = (flag if flag is not None else default for flag, default in pick)
    return FastOptions(enabled=enabled, channels_last=channels_last, fused_batchnorm=fused, kernel_set=kernel_set)


def loader_rows(args: argparse.Namespace) -> list[dict]:
    """`--loader`: the rows of `loader_times` on --data-dir, or on JPEGs generated into a temporary folder."""
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    common = dict(images=args.num_images, batch_size=args.batch_size, repeats=args.repeats,
                  input_size=args.img_size, log=log)
    if args.data_dir:
        return loader_times(Path(args.data_dir), **common)
    with tempfile.TemporaryDirectory(prefix="convmixer-loader-") as tmp:
        log(f"writing {args.num_images} photo-like JPEGs ({PHOTO_SHAPES[0][1]}x{PHOTO_SHAPES[0][0]} and "
            f"{PHOTO_SHAPES[1][1]}x{PHOTO_SHAPES[1][0]}) to {tmp}")
        return loader_times(generated_photos(Path(tmp), args.num_images), **common)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        device = torch.device(resolve_device(args.device))
        fill_sizes(args, device)
        if min(args.batch_size, args.infer_batch_size, args.steps, args.repeats, args.dim, args.size,
               args.kernel) < 1 or args.warmup < 0:
            raise UserError("batch sizes, --steps, --repeats, --dim, --size and --kernel must be >= 1 and "
                            "--warmup >= 0")
        if args.num_shards < 1:
            raise UserError(f"--num-shards must be at least 1, got {args.num_shards}")
        patch = max(variant_arch(m)["patch_size"] for m in args.model)
        if args.img_size < patch:
            raise UserError(f"--img-size {args.img_size} is smaller than one {patch}-pixel patch")
        check_sizes({"dim": args.dim, "kernel_size": args.kernel}, args.img_size)
        check_sizes({}, args.size)
        if args.json:
            check_output(args.json, args.force)
        amp = args.amp or ("bf16" if device.type == "cuda" else "none")
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # CUDA events, do_bench and Triton launches use the current device
        if args.depthwise_op and device.type != "cuda":
            raise UserError("--depthwise-op needs a CUDA device")
        if args.num_images < 1:
            raise UserError(f"--num-images must be at least 1, got {args.num_images}")
        if args.loader:
            rows = loader_rows(args)
            print(format_loader_table(rows))
        elif args.shards:
            rows = shard_read_times(Path(args.workdir), shards=args.num_shards,
                                    log=lambda line: print(line, flush=True))
        elif args.convert:
            if len(args.model) != 1:
                raise UserError("--convert times one --model at a time")
            print(json.dumps(environment()), file=sys.stderr)
            rows = conversion_times(Path(args.workdir), args.model[0], args.repeats,
                                    log=lambda line: print(line, flush=True))
        elif args.depthwise_op:
            rows = depthwise_op_times(args.batch_size, args.dim, args.size, args.kernel,
                                      AMP_DTYPES[amp] or torch.float32, device=str(device))
            for r in rows:
                print(f"{r['impl']:>20}  fwd {r['fwd_ms']:8.3f} ms  fwd+bwd {r['fwd_bwd_ms']:8.3f} ms")
        else:
            fast = fast_options(args)
            configs = [
                BenchConfig(model=m, mode=mode,
                            batch_size=args.batch_size if mode == "train" else args.infer_batch_size,
                            img_size=args.img_size, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                            amp=amp, channels_last=args.channels_last, device=str(device), fast=fast)
                for m in args.model for mode in args.mode
            ]
            peers = None if args.peer_layouts is None else [layout == "channels_last" for layout in args.peer_layouts]
            rows = bench(configs, log=lambda line: print(line, file=sys.stderr, flush=True), compiled=args.compile,
                         peer_layouts=peers)
            print(format_table(rows))
        if args.json:
            write_text(args.json, json.dumps(rows, indent=1), overwrite=args.force)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
