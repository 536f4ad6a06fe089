"""The trainer's inputs, built from its config: timm's transforms, the datasets and the loaders.

ImageNet and the embedded digits run take the same path: an ImageFolder tree (`train/<class>/*`,
`val/<class>/*`) read with PIL, transformed by timm's `create_transform`. The synthetic dataset skips
decoding (random tensors of the configured size) so a GPU can be exercised without any data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import DataLoader, Dataset

from ..data import (
    CACHE,
    DIGITS_CACHE,
    Decoded,
    GlobalBatchSampler,
    ImageFolder,
    RankSampler,
    Seeded,
    ShardDataset,
    SyntheticImages,
    derive_seed,
    shelter_loader_worker,
    write_digits_imagefolder,
    write_generated_imagefolder,
)
from ..errors import DataError
from ..runtime import DistEnv, barrier
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


def build_transforms(cfg: TrainConfig) -> tuple[object, object]:
    """timm's training pipeline (RandomResizedCrop, flip, RandAugment, erasing) and its eval pipeline."""
    common = dict(input_size=cfg.input_size, mean=tuple(cfg.mean), std=tuple(cfg.std))
    try:
        train = create_transform(
            is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
            re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count, **common)
    except (AssertionError, KeyError, ValueError) as e:  # timm's checks of the auto_augment string
        raise ConfigError(f"auto_augment {cfg.auto_augment!r}: timm cannot build it ({type(e).__name__}: {e}); "
                          "the paper's policy is rand-m9-mstd0.5-inc1") from None
    evaluate = create_transform(is_training=False, interpolation=cfg.eval_interpolation, crop_pct=cfg.crop_pct,
                                **common)
    return guard_posterize(train), evaluate


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
        train = ShardDataset(root / f"{cfg.train_split}.json", Decoded(train_tf))
        val = ShardDataset(root / f"{cfg.val_split}.json", Decoded(eval_tf))
    else:
        train = ImageFolder(root / cfg.train_split, Decoded(train_tf))
        val = ImageFolder(root / cfg.val_split, Decoded(eval_tf))
    if train.classes != val.classes:
        raise DataError(f"{root}: the classes of {cfg.train_split} ({len(train.classes)}) and "
                        f"{cfg.val_split} ({len(val.classes)}) differ")
    n = len(train.classes)
    if cfg.num_classes is not None and cfg.num_classes != n:
        raise DataError(f"{root}: has {n} classes but the model is configured for num_classes="
                        f"{cfg.num_classes}")
    return Seeded(train), val, n


def build_loaders(cfg: TrainConfig, train: Seeded, val: Dataset, env: DistEnv
                  ) -> tuple[DataLoader, DataLoader, GlobalBatchSampler]:
    """The train loader (its sampler, returned too, is set to each epoch and its first step), the val loader."""
    shards = train.dataset.shard_sizes if isinstance(train.dataset, ShardDataset) else None
    sampler = GlobalBatchSampler(len(train), cfg.batch_size, cfg.grad_accum, env, cfg.seed, shards=shards)
    if sampler.steps == 0:
        raise DataError(f"the training set has {len(train)} images, fewer than one global batch of "
                        f"{sampler.global_batch} (batch_size x grad_accum x processes)")
    pin = env.device.type == "cuda"
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                              pin_memory=pin, drop_last=True, worker_init_fn=shelter_loader_worker)
    val_loader = DataLoader(val, batch_size=cfg.batch_size, sampler=RankSampler(len(val), env),
                            num_workers=cfg.workers, pin_memory=pin, worker_init_fn=shelter_loader_worker)
    return train_loader, val_loader, sampler
