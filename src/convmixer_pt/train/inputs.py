"""The trainer's inputs, built from its config: timm's transforms, the datasets and the loaders.

ImageNet and the embedded digits run take the same path: an ImageFolder tree (`train/<class>/*`,
`val/<class>/*`) read with PIL, transformed by timm's `create_transform`. The synthetic dataset skips
decoding (random tensors of the configured size) so a GPU can be exercised without any data.

Training images leave the loader's workers as timm's trainer sends them (its `use_prefetcher` path): uint8
crops, collated without a float copy; normalization and random erasing run on the training device
(`DeviceInputs`). The erasing boxes are drawn in the worker with the rest of the sample's augmentation (from
its seed, see `data.Seeded`), and the erased pixels come from a generator seeded per sample, so that a run
resumes exactly and a sample is augmented alike whatever process or batch it lands in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose
from torchvision.transforms import functional as TF

from ..data import (
    CACHE,
    DIGITS_CACHE,
    Decoded,
    Encoded,
    GlobalBatchSampler,
    ImageFolder,
    RankSampler,
    Seeded,
    ShardDataset,
    SyntheticImages,
    derive_seed,
    load_image,
    shelter_loader_worker,
    write_digits_imagefolder,
    write_generated_imagefolder,
)
from ..errors import DataError
from ..runtime import DistEnv, barrier, usable_cores
from .augment import BICUBIC, BILINEAR, GEOMETRY, SLOT, PlanRecorder, decode_plan, fill_color, replay, resize
from .config import ConfigError, TrainConfig

GENERATED_CLASSES = 10  # classes of the generated JPEG tree unless num_classes says otherwise


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's RandAugment posterize for any number of bits kept, 0 included (a black image, what Pillow < 13
    computed); Pillow 13 refuses 0, which the paper's increasing-severity policy (`inc1`) draws whenever a
    magnitude of mean 9 and std 0.5 is clipped at 10. For 1 to 7 bits the same table as ImageOps.posterize."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - bits_to_keep) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def guard_posterize(transform: Any) -> Any:
    """`transform` with every timm posterize op of its (Rand/Auto)Augment replaced by `posterize`, in this
    transform only (timm's module is left as it is)."""
    for step in getattr(transform, "transforms", [transform]):
        for op in getattr(step, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


class ErasingBoxes:
    """What timm's `RandomErasing` erases, drawn as it draws it and recorded instead of filled in: it stands for
    an image tensor of `shape` (channels, height, width)."""

    dtype = torch.float32

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.boxes: list[tuple[int, int, int, int]] = []  # (top, left, height, width)

    def size(self) -> tuple[int, int, int]:
        return self.shape

    def __setitem__(self, key: tuple[slice, slice, slice], value: Any) -> None:
        _, rows, cols = key
        self.boxes.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start))


def erasing_plan_size(count: int) -> int:
    """The integers of a sample's erasing plan for up to `count` boxes: the pixels' seed, then a box each."""
    return 1 + 4 * count


class TrainCrop:
    """A training sample in a loader worker: decode, timm's RandomResizedCrop, flip and RandAugment, as timm's
    trainer computes them; the result is the RGB crop and its plan: the erasing plan (`erase_size` integers: a
    seed for the erased pixels, then (top, left, height, width) per box, zeros for no box), drawn after the crop.

    With `reduced`, a JPEG is decoded at the smallest of PIL's DCT scales (1/2, 1/4, 1/8) at which the crop's
    region still has at least the output's pixels in each direction: the crop is drawn on the full-size
    geometry first (the same draws as without), then its box is mapped onto the reduced image. Other images,
    and JPEG crops that need the full resolution, take the same path as without.

    With `augment` (a `PlanRecorder`: `augment_on_device`), the worker stops after cutting out the crop's
    region: the resize, the flip (probability `flip`) and RandAugment are drawn here, where timm draws them, and
    done on the device (`DeviceInputs`). The result is the region (a crop decoded reduced is resized here, to
    the output size) and a plan that goes on with augment.GEOMETRY and RandAugment's records."""

    def __init__(self, crop: RandomResizedCropAndInterpolation, rest: Callable[[Image.Image], Image.Image],
                 eraser: RandomErasing | None, erase_count: int, reduced: bool = False,
                 augment: PlanRecorder | None = None, flip: float = 0.0) -> None:
        self.crop, self.rest, self.eraser, self.reduced = crop, rest, eraser, reduced
        self.augment, self.flip = augment, flip
        self.erase_size = erasing_plan_size(erase_count)
        self.plan_size = self.erase_size + (GEOMETRY + SLOT * augment.slots if augment else 0)

    def __call__(self, source: str | Path | Encoded) -> tuple[Image.Image, tuple[int, ...]]:
        drawn: list[Any] = []
        img = load_image(source, lambda opened: drawn.extend(self.draw(opened)))
        if self.augment is None:
            img = self.rest(self.resize(img, *drawn))
            return img, self.erasing_plan(img.height, img.width)
        (i, j, h, w), interpolation, scale = drawn
        region = img.crop((j, i, j + w, i + h)) if scale == 1 else self.resize(img, *drawn)
        flipped = self.flip > 0 and bool(torch.rand(1) < self.flip)  # torchvision's RandomHorizontalFlip draw
        augmentation = self.augment()
        geometry = (int(flipped), TF.pil_modes_mapping[interpolation], region.height, region.width)
        return region, self.erasing_plan(*self.crop.size) + geometry + augmentation

    def resize(self, img: Image.Image, box: tuple[int, int, int, int], interpolation: Any,
               scale: float) -> Image.Image:
        """The crop `box` (top, left, height, width on the full-size image) of `img`, decoded at 1/`scale`,
        resized to the output size: at full size timm's own crop and resize."""
        i, j, h, w = box
        if scale == 1:
            return TF.resized_crop(img, i, j, h, w, list(self.crop.size), interpolation)
        return img.resize(self.crop.size[::-1], TF.pil_modes_mapping[interpolation],
                          box=(j / scale, i / scale, (j + w) / scale, (i + h) / scale))

    def draw(self, img: Image.Image) -> tuple[tuple[int, int, int, int], Any, float]:
        """The crop's box on the full-size image and its interpolation, drawn as timm's transform draws them,
        and the scale at which to decode (asked of PIL here, before decoding)."""
        params = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, list | tuple):
            interpolation = random.choice(interpolation)
        scale: float = 1
        if self.reduced and img.format == "JPEG":
            (_, _, h, w), (out_h, out_w) = params, self.crop.size
            factor = next((f for f in (8, 4, 2) if h >= f * out_h and w >= f * out_w), 1)
            if factor > 1:
                full_width = img.width
                drafted = img.draft("RGB", (img.width // factor, img.height // factor))
                if drafted is not None:  # PIL decodes this image only at full size
                    scale = full_width / drafted[1][2]
        return params, interpolation, scale

    def erasing_plan(self, height: int, width: int) -> tuple[int, ...]:
        boxes = ErasingBoxes((3, height, width))
        if self.eraser is not None:
            self.eraser(boxes)
        plan = [random.getrandbits(63), *(v for box in boxes.boxes for v in box)]
        return tuple(plan + [0] * (self.erase_size - len(plan)))


def collate_train(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, plans) of a training batch. `TrainCrop` samples become one uint8 (N, H, W, 3) tensor,
    each crop's bytes copied once (timm's `fast_collate` copies through a CHW view); regions of different
    sizes (`augment_on_device`) are concatenated into one flat uint8 tensor, their sizes in the plans. Tensors
    (the synthetic dataset's, already normalized) are stacked, with empty plans."""
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    first = batch[0][0]
    if not isinstance(first, tuple):
        return torch.stack([x for x, _ in batch]), labels, torch.zeros(len(batch), 0, dtype=torch.int64)
    plans = torch.tensor([plan for (_, plan), _ in batch], dtype=torch.int64)
    sizes = {crop.size for (crop, _), _ in batch}
    if len(sizes) == 1:
        width, height = sizes.pop()
        images = torch.empty(len(batch), height, width, 3, dtype=torch.uint8)
        pixels = images.numpy()
        for k, ((crop, _), _) in enumerate(batch):
            pixels[k] = np.asarray(crop)
        return images, labels, plans
    images = torch.empty(sum(3 * crop.width * crop.height for (crop, _), _ in batch), dtype=torch.uint8)
    pixels, start = images.numpy(), 0
    for (crop, _), _ in batch:
        end = start + 3 * crop.width * crop.height
        pixels[start:end] = np.asarray(crop).reshape(-1)
        start = end
    return images, labels, plans


class DeviceInputs:
    """The training device's half of the input pipeline: a uint8 batch made as its plans say (`pixels`), then
    normalized as timm's prefetcher normalizes it ((x - 255 mean) / (255 std) in float32), in NCHW or
    channels_last, then erased where its plans say, with pixels as timm's `re_mode` makes them ('pixel':
    per-pixel normal, 'rand': one normal colour per box, 'const': zeros) from a generator seeded by the
    sample's plan. Float batches (synthetic) pass unchanged."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.device, self.mode = device, cfg.re_mode
        self.mean = torch.tensor([255 * m for m in cfg.mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in cfg.std], device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.erase_size, self.fill = erasing_plan_size(cfg.re_count), fill_color(cfg.mean)
        self.on_device, self.size = cfg.augment_on_device, (cfg.input_size, cfg.input_size)

    def pixels(self, images: torch.Tensor, plans: list[list[int]]) -> torch.Tensor:
        """The uint8 (N, 3, H, W) batch before normalization: the collated crops as they are, or with
        `augment_on_device` the regions resized, flipped and RandAugmented as Pillow would (`augment`)."""
        if not self.on_device:
            return images.permute(0, 3, 1, 2)
        geometry = [plan[self.erase_size:self.erase_size + GEOMETRY] for plan in plans]
        if images.dim() == 1:
            ends = np.cumsum([3 * h * w for _, _, h, w in geometry]).tolist()
            regions = [images[end - 3 * h * w:end].view(h, w, 3).permute(2, 0, 1)
                       for end, (_, _, h, w) in zip(ends, geometry, strict=True)]
        else:
            regions = [img.permute(2, 0, 1) for img in images]
        x = resize(regions, [interpolation for _, interpolation, _, _ in geometry], self.size)
        flipped = [k for k, (flip, *_) in enumerate(geometry) if flip]
        if flipped:
            x[flipped] = x[flipped].flip(-1)
        return replay(x, [decode_plan(plan[self.erase_size + GEOMETRY:]) for plan in plans], self.fill)

    def __call__(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images
        plans = plans.tolist()
        # The layout changes while the pixels are bytes: a quarter of the memory traffic of floats.
        x = self.pixels(images, plans).contiguous(memory_format=self.memory_format)
        x = x.float().sub_(self.mean).div_(self.std)
        for k, plan in enumerate(plans):
            boxes = [plan[b:b + 4] for b in range(1, self.erase_size, 4) if plan[b + 2] > 0]
            if not boxes:
                continue
            g = torch.Generator(self.device).manual_seed(plan[0])
            for top, left, h, w in boxes:
                region = x[k, :, top:top + h, left:left + w]
                if self.mode == "pixel":
                    region.copy_(torch.empty(region.shape, device=self.device).normal_(generator=g))
                elif self.mode == "rand":
                    region.copy_(torch.empty(3, 1, 1, device=self.device).normal_(generator=g).expand_as(region))
                else:
                    region.zero_()
        return x


def build_transforms(cfg: TrainConfig) -> tuple[TrainCrop, object]:
    """The training sample's worker side (`TrainCrop`: timm's RandomResizedCrop, flip, RandAugment, or with
    `augment_on_device` the crop's region and the draws of the rest; erasing drawn) and timm's eval
    pipeline."""
    common = dict(input_size=cfg.input_size, mean=tuple(cfg.mean), std=tuple(cfg.std))
    try:
        primary, secondary, _ = create_transform(
            is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
            use_prefetcher=True, separate=True, **common)
    except (AssertionError, KeyError, ValueError) as e:  # timm's checks of the auto_augment string
        raise ConfigError(f"auto_augment {cfg.auto_augment!r}: timm cannot build it ({type(e).__name__}: {e}); "
                          "the paper's policy is rand-m9-mstd0.5-inc1") from None
    crop, *flip = primary.transforms
    # The boxes only: they are drawn alike in every mode, and 'const' fills them at no cost (DeviceInputs
    # makes the configured mode's pixels).
    eraser = RandomErasing(cfg.re_prob, mode="const", max_count=cfg.re_count, device="cpu") \
        if cfg.re_prob > 0 else None
    secondary = guard_posterize(secondary).transforms
    evaluate = create_transform(is_training=False, interpolation=cfg.eval_interpolation, crop_pct=cfg.crop_pct,
                                **common)
    if not cfg.augment_on_device:
        return TrainCrop(crop, Compose([*flip, *secondary]), eraser, cfg.re_count,
                         reduced=cfg.reduced_decoding), evaluate
    if not cfg.auto_augment or len(secondary) != 1:
        moved = ", ".join(type(t).__name__ for t in secondary) or "nothing"
        raise ConfigError(f"augment_on_device needs timm's RandAugment or AutoAugment alone after the flip; "
                          f"auto_augment {cfg.auto_augment!r} gives {moved}"
                          + ("" if cfg.auto_augment else " (timm's colour jitter, on while RandAugment is off)"))
    interpolations = crop.interpolation if isinstance(crop.interpolation, list | tuple) else [crop.interpolation]
    if any(TF.pil_modes_mapping[i] not in (BILINEAR, BICUBIC) for i in interpolations):
        raise ConfigError(f"augment_on_device resizes with bilinear or bicubic interpolation only, not "
                          f"interpolation {cfg.interpolation!r}")
    return TrainCrop(crop, Compose([]), eraser, cfg.re_count, reduced=cfg.reduced_decoding,
                     augment=PlanRecorder(secondary[0], posterize), flip=cfg.hflip), evaluate


def data_root(cfg: TrainConfig, env: DistEnv) -> Path:
    """Where the ImageFolder tree is; for digits, written on first use by the first process."""
    if cfg.dataset in ("digits", "generated"):
        classes = cfg.num_classes or GENERATED_CLASSES
        default = DIGITS_CACHE if cfg.dataset == "digits" else \
            CACHE / f"generated-{classes}x{cfg.synthetic_train_size}+{cfg.synthetic_val_size}-seed{cfg.seed}"
        root = Path(cfg.data_dir).expanduser() if cfg.data_dir else default
        if env.is_main:
            if cfg.dataset == "digits":
                write_digits_imagefolder(root)
            else:
                write_generated_imagefolder(root, classes, cfg.synthetic_train_size, cfg.synthetic_val_size,
                                            cfg.seed)
        barrier(env)
        return root
    if not cfg.data_dir:
        raise DataError("no data folder given: pass --data-dir DIR (with DIR/train and DIR/val, or with shards "
                        "DIR/train.json and DIR/val.json), or use --dataset digits, generated or synthetic")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    return root


def build_datasets(cfg: TrainConfig, env: DistEnv) -> tuple[Seeded, Dataset, int]:
    """(train, val, number of classes); the class lists of both splits and the config must agree. The train
    set is `Seeded`: its loader asks for samples with their augmentation seeds."""
    if cfg.dataset == "synthetic":
        n = cfg.num_classes or 1000
        return (Seeded(SyntheticImages(cfg.synthetic_train_size, cfg.input_size, n, derive_seed(cfg.seed, 1))),
                SyntheticImages(cfg.synthetic_val_size, cfg.input_size, n, derive_seed(cfg.seed, 2)), n)
    root = data_root(cfg, env)
    train_tf, eval_tf = build_transforms(cfg)
    if cfg.dataset == "shards":
        train = ShardDataset(root / f"{cfg.train_split}.json", train_tf)
        val = ShardDataset(root / f"{cfg.val_split}.json", Decoded(eval_tf))
    else:
        train = ImageFolder(root / cfg.train_split, train_tf)
        val = ImageFolder(root / cfg.val_split, Decoded(eval_tf))
    if train.classes != val.classes:
        raise DataError(f"{root}: the classes of {cfg.train_split} ({len(train.classes)}) and "
                        f"{cfg.val_split} ({len(val.classes)}) differ")
    n = len(train.classes)
    if cfg.num_classes is not None and cfg.num_classes != n:
        raise DataError(f"{root}: has {n} classes but the model is configured for num_classes="
                        f"{cfg.num_classes}")
    return Seeded(train), val, n


def default_workers(device: torch.device, cores: int, processes_here: int) -> int:
    """Loader workers per training process when the config leaves them to the machine: the cores this process
    may use (`cores` among `processes_here` training processes) less one for the training process itself on
    a GPU, which mostly waits on the device; on the CPU the model's own threads need the cores, and one worker
    decodes while they compute. Never more than the cores (PyTorch warns above that), at most 16."""
    share = max(1, cores // max(1, processes_here))
    return min(16, max(1, share - 1)) if device.type == "cuda" else min(1, share - 1)


def build_loaders(cfg: TrainConfig, train: Seeded, val: Dataset, env: DistEnv
                  ) -> tuple[DataLoader, DataLoader, GlobalBatchSampler]:
    """The train loader (its sampler, returned too, is set to each epoch and its first step), the val loader.

    Workers follow the machine unless configured (`default_workers`); each keeps at least 4 batches of the
    process in flight in all (PyTorch's default is 2 per worker), which smooths the uneven cost of RandAugment's
    operations when there are only one or two workers. Batches go to pinned memory only for a CUDA device,
    where that lets the copy to the device run asynchronously."""
    shards = train.dataset.shard_sizes if isinstance(train.dataset, ShardDataset) else None
    sampler = GlobalBatchSampler(len(train), cfg.batch_size, cfg.grad_accum, env, cfg.seed, shards=shards)
    if sampler.steps == 0:
        raise DataError(f"the training set has {len(train)} images, fewer than one global batch of "
                        f"{sampler.global_batch} (batch_size x grad_accum x processes)")
    pin = env.device.type == "cuda"
    workers = cfg.workers if cfg.workers is not None else \
        default_workers(env.device, usable_cores(), env.local_world_size)
    prefetch = dict(prefetch_factor=max(2, -(-4 // workers))) if workers else {}
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                              collate_fn=collate_train, pin_memory=pin, drop_last=True,
                              worker_init_fn=shelter_loader_worker, **prefetch)
    val_loader = DataLoader(val, batch_size=cfg.batch_size, sampler=RankSampler(len(val), env),
                            num_workers=workers, pin_memory=pin, worker_init_fn=shelter_loader_worker,
                            **prefetch)
    return train_loader, val_loader, sampler
