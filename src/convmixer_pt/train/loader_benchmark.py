"""How fast the trainer's input pipeline runs per core, against timm's own `train.py` loader in the same run.

What is timed is a loader worker's work for a batch: decode, the paper's augmentation, collation (the CPU side;
normalization and erasing run on the training device in the trainer and in timm's, so neither counts them). One
process, one intra-op thread, CPU time (`time.process_time`), every pipeline over the same images in the same
order; the pipelines take turns batch by batch, and the median pass counts, so that a machine shared with other
work slows them alike. Rows:

- `timm`: timm's trainer's loader (`create_transform(..., use_prefetcher=True)`, timm's `ImageDataset`,
  `fast_collate`), the reference;
- `timm_float`: timm's loader without its prefetcher (float tensors, normalization and erasing on the CPU,
  `default_collate`), which is what this trainer ran before it sent uint8 to the device;
- `ours`: the trainer's training set (`Seeded(ImageFolder(TrainCrop))`, each sample's augmentation seeded) and
  `collate_train`;
- `ours_reduced`: the same with `reduced_decoding`;
- `ours_device`, `ours_reduced_device`: those two with `augment_on_device`: the worker decodes, cuts out the
  crop's region and draws the rest; the training device does the resize, the flip and RandAugment
  (`train/augment.py`). The worker's time is the row's; what the device's half costs on this CPU, per image,
  is reported beside it (`device_ms_per_image_here`; in training it runs on the GPU).

timm's RandAugment posterize is guarded in every row as in the trainer (Pillow 13 refuses what timm asks of it
about once in 700 images, see `inputs.posterize`). `identical_pixels` says whether a row's uint8 crops equal
timm's for the same random draws (the first batch, each sample under its own seed).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import default_collate

from ..data import (
    ImageFolder,
    SampleKey,
    Seeded,
    derive_seed,
    load_image,
    seed_rngs,
    seeded_rngs,
    write_generated_imagefolder,
)
from .config import TrainConfig, resolve
from .inputs import DeviceInputs, build_transforms, collate_train, guard_posterize

PIPELINES = ("timm", "timm_float", "ours", "ours_reduced", "ours_device", "ours_reduced_device")
OURS = {"ours": {}, "ours_reduced": dict(reduced_decoding=True), "ours_device": dict(augment_on_device=True),
        "ours_reduced_device": dict(reduced_decoding=True, augment_on_device=True)}
# Training img/s per GPU of this project's model (one H200, bf16, batch 64, docs/performance.md "Model level").
RECORDED_TRAIN_SPEEDS = {"convmixer_1536_20": 289.5, "convmixer_768_32": 555.7, "convmixer_1024_20": 1454.8}
PHOTO_SHAPES = ((375, 500), (500, 375))  # ImageNet's most common sizes


def generated_photos(workdir: Path, images: int, seed: int = 0) -> Path:
    """`images` photo-like JPEGs of ImageNet's typical sizes in 10 class folders: `workdir/train`."""
    write_generated_imagefolder(workdir, 10, images, 1, seed=seed, shapes=PHOTO_SHAPES)
    return workdir / "train"


def _timm_transform(cfg: TrainConfig, prefetcher: bool) -> Callable[[Image.Image], torch.Tensor]:
    from timm.data import create_transform

    return guard_posterize(create_transform(
        input_size=cfg.input_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
        hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std),
        re_prob=0.0 if prefetcher else cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count,
        use_prefetcher=prefetcher))


def _batches(folder: Path, cfg: TrainConfig, batch_size: int, order: list[int], seeds: list[int],
             paths: list[str]) -> dict[str, Callable[[int], float]]:
    """Per pipeline, a function that makes batch k of `order` and returns the CPU seconds it took. Every
    pipeline draws the same augmentation for the same image (timm's are seeded before each sample, outside the
    timed work; ours seed themselves, inside it, as in the trainer), so that all do the same image work."""
    from timm.data import ImageDataset
    from timm.data.loader import fast_collate

    timm_sets = {name: ImageDataset(str(folder), transform=_timm_transform(cfg, prefetcher))
                 for name, prefetcher in (("timm", True), ("timm_float", False))}
    index = {str(Path(p).resolve()): k for k, (p, _) in enumerate(timm_sets["timm"].reader.samples)}
    timm_order = [index[str(Path(paths[i]).resolve())] for i in order]  # the same files in the same order
    ours = {name: Seeded(ImageFolder(folder, build_transforms(replace(cfg, **options))[0]))
            for name, options in OURS.items()}
    keys = [SampleKey(i, seed) for i, seed in zip(order, seeds, strict=True)]  # the trainer's sampler makes these

    def timm_batch(name: str, collate: Callable[[list[Any]], Any]) -> Callable[[int], float]:
        dataset = timm_sets[name]

        def run(k: int) -> float:
            spent, items = 0.0, []
            for i, seed in zip(timm_order[k:k + batch_size], seeds[k:k + batch_size], strict=True):
                seed_rngs(seed)
                start = time.process_time()
                items.append(dataset[i])
                spent += time.process_time() - start
            start = time.process_time()
            collate(items)
            return spent + time.process_time() - start
        return run

    def our_batch(name: str) -> Callable[[int], float]:
        dataset = ours[name]

        def run(k: int) -> float:
            start = time.process_time()
            collate_train(dataset.__getitems__(keys[k:k + batch_size]))  # as the trainer's DataLoader asks
            return time.process_time() - start
        return run

    return dict(timm=timm_batch("timm", fast_collate), timm_float=timm_batch("timm_float", default_collate),
                **{name: our_batch(name) for name in OURS})


def device_replay_ms(folder: Path, cfg: TrainConfig, batch_size: int, order: list[int], seeds: list[int]) -> float:
    """CPU ms per image of `augment_on_device`'s device half (resize, flip and RandAugment, `DeviceInputs.pixels`)
    run on this CPU, over one pass of the benchmark's batches."""
    on = replace(cfg, augment_on_device=True)
    dataset, inputs = Seeded(ImageFolder(folder, build_transforms(on)[0])), DeviceInputs(on, torch.device("cpu"))
    keys = [SampleKey(i, seed) for i, seed in zip(order, seeds, strict=True)]
    spent = 0.0
    for k in range(0, len(keys), batch_size):
        images, _, plans = collate_train(dataset.__getitems__(keys[k:k + batch_size]))
        start = time.process_time()
        inputs.pixels(images, plans.tolist())
        spent += time.process_time() - start
    return 1e3 * spent / len(keys)


def identical_to_timm(cfg: TrainConfig, paths: list[str], seeds: list[int]) -> dict[str, bool]:
    """Per pipeline: are its uint8 crops (before normalization) timm's prefetcher crops for the same draws?"""
    timm_tf, float_tf = _timm_transform(cfg, True), _timm_transform(replace(cfg, re_prob=0.0), False)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    ours = {name: build_transforms(replace(cfg, **options))[0] for name, options in OURS.items()}
    inputs = DeviceInputs(replace(cfg, augment_on_device=True), torch.device("cpu"))
    same = dict.fromkeys(PIPELINES, True)
    for path, seed in zip(paths, seeds, strict=True):
        with Image.open(path) as opened:
            decoded = opened.convert("RGB")  # as timm's ImageDataset decodes
        with seeded_rngs(seed):
            reference = timm_tf(decoded)
        with seeded_rngs(seed):
            floats = float_tf(decoded)
        same["timm_float"] &= torch.equal(((floats * std + mean) * 255).round().to(torch.uint8), reference)
        for name, transform in ours.items():
            with seeded_rngs(seed):
                crop, plan = transform(path)
            pixels = torch.from_numpy(np.array(crop))
            if transform.augment:
                pixels = inputs.pixels(pixels[None], [list(plan)])[0]
            else:
                pixels = pixels.permute(2, 0, 1)
            same[name] &= torch.equal(pixels, reference)
    return same


def reduced_crop_psnr(cfg: TrainConfig, paths: list[str], seeds: list[int]) -> dict[str, Any]:
    """PSNR (dB, 8-bit peak) of the reduced-decoding RandomResizedCrop output against the full decode's for
    the same draws (before flip and RandAugment, whose thresholds would magnify differences), over the crops
    that were decoded reduced; and how many were, per scale."""
    full, reduced = (build_transforms(replace(cfg, reduced_decoding=r))[0] for r in (False, True))
    psnr, scales = [], dict.fromkeys(("1", "2", "4", "8"), 0)
    for path, seed in zip(paths, seeds, strict=True):
        crops = []
        for transform in (full, reduced):
            drawn: list[Any] = []
            with seeded_rngs(seed):
                img = load_image(path, lambda opened, t=transform, d=drawn: d.extend(t.draw(opened)))
            crops.append(transform.resize(img, *drawn))
        scale = drawn[2]
        scales[str(round(scale))] += 1
        if scale != 1:
            mse = np.mean((np.asarray(crops[0], np.float64) - np.asarray(crops[1], np.float64)) ** 2)
            psnr.append(10 * np.log10(255 ** 2 / max(mse, 1e-12)))
    return dict(psnr_db_median=statistics.median(psnr) if psnr else None, psnr_db_min=min(psnr, default=None),
                psnr_db_mean=statistics.fmean(psnr) if psnr else None, decoded_at_scale=scales)


def loader_times(folder: Path, images: int = 256, batch_size: int = 64, repeats: int = 5, input_size: int = 224,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per pipeline (PIPELINES): img/s per core over the first `images` of the ImageFolder `folder` in
    a shuffled order, the median of `repeats` passes; its ratio to timm's (of the medians, and the median of
    the ratios within each repeat, which a change of the machine's load between repeats moves less); the cores
    per GPU it needs to feed this project's model at the training speeds recorded in docs/performance.md (at
    224 pixels; a smaller input trains faster)."""
    cfg = resolve(None, dict(input_size=input_size))  # the paper's recipe
    tree = ImageFolder(folder, transform=lambda path: path)
    paths = [p for p, _ in tree.samples]
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check = order[:batch_size]
        log(f"checking pixels against timm's on {len(check)} images, PSNR of reduced decoding on {len(order)}")
        seeds = [derive_seed(0, i) for i in order]
        same = identical_to_timm(cfg, [paths[i] for i in check], seeds[:len(check)])
        psnr = reduced_crop_psnr(cfg, [paths[i] for i in order], seeds)
        batches = _batches(folder, cfg, batch_size, order, seeds, paths)
        replay_ms = device_replay_ms(folder, cfg, batch_size, order, seeds)
        starts = range(0, len(order), batch_size)
        for run in batches.values():  # warm-up: file cache, lazy imports, allocator
            run(0)
        seconds: dict[str, list[float]] = {name: [] for name in PIPELINES}
        for r in range(repeats):
            spent = dict.fromkeys(PIPELINES, 0.0)
            for b, k in enumerate(starts):  # the pipelines take turns batch by batch
                turn = (r + b) % len(PIPELINES)
                for name in PIPELINES[turn:] + PIPELINES[:turn]:
                    spent[name] += batches[name](k)
            for name in PIPELINES:
                seconds[name].append(spent[name])
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {len(order) / spent[n]:.0f}" for n in PIPELINES)
                + " img/s per core")
    finally:
        torch.set_num_threads(threads)
    import timm

    rate = {name: len(order) / statistics.median(seconds[name]) for name in PIPELINES}
    rows = []
    for name in PIPELINES:
        rows.append(dict(
            pipeline=name, identical_pixels=same[name], img_per_s_per_core=rate[name],
            ms_cpu_per_image=1e3 / rate[name], ratio_to_timm=rate[name] / rate["timm"],
            paired_ratio_to_timm=statistics.median(t / o for t, o in zip(seconds["timm"], seconds[name], strict=True)),
            cores_per_gpu={model: speed / rate[name] for model, speed in RECORDED_TRAIN_SPEEDS.items()},
            passes_s=seconds[name], images=len(order), batch_size=batch_size, input_size=input_size,
            recipe=dict(auto_augment=cfg.auto_augment, interpolation=cfg.interpolation, hflip=cfg.hflip,
                        re_prob=cfg.re_prob, re_mode=cfg.re_mode),
            **(psnr if name == "ours_reduced" else {}),
            **(dict(device_ms_per_image_here=replay_ms) if name.endswith("_device") else {}),
            cpu=platform.processor() or platform.machine(), load_average=os.getloadavg(), torch=torch.__version__,
            timm=timm.__version__, pillow=PIL.__version__))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    models = list(RECORDED_TRAIN_SPEEDS)
    header = ("pipeline", "identical", "ms/img", "img/s/core", "x timm", "paired", *(f"cores/GPU {m[10:]}"
                                                                                      for m in models),
              "device ms/img here")
    lines = [header] + [(r["pipeline"], "yes" if r["identical_pixels"] else "no", f"{r['ms_cpu_per_image']:.2f}",
                         f"{r['img_per_s_per_core']:.0f}", f"{r['ratio_to_timm']:.2f}",
                         f"{r['paired_ratio_to_timm']:.2f}",
                         *(f"{r['cores_per_gpu'][m]:.1f}" for m in models),
                         f"{r['device_ms_per_image_here']:.2f}" if "device_ms_per_image_here" in r else "-")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
