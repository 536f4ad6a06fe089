"""Datasets, timm transforms and the samplers that make training reproducible across process counts.

ImageNet and the embedded digits run take the same path: an ImageFolder tree (`train/<class>/*`,
`val/<class>/*`) read with PIL, transformed by timm's `create_transform`. The synthetic dataset skips
decoding (random tensors of the configured size) so a GPU can be exercised without any data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from .config import ConfigError, TrainConfig
from .distributed import DistEnv, barrier

DIGITS_CACHE = Path.home() / ".cache" / "convmixer_pt" / "digits"
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """Data that cannot be used, with a message meant for the user."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, rank, ...), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def error_line(error: BaseException) -> str:
    """The user-facing sentence of an error, also when a DataLoader worker re-raised it inside its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.") else last
    return lines[0] if lines else type(error).__name__


def load_image(path: str) -> Image.Image:
    """PIL decode to RGB; a file PIL cannot read becomes one DataError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None


def write_digits_imagefolder(root: str | Path) -> Path:
    """scikit-learn's 8x8 digits as grayscale PNGs in `root/{train,val}/{0..9}/`, written once.

    The split is fixed (stratified, 20% val, seed 0). The tree is built beside `root` and renamed into
    place, so an interrupted write never leaves a half tree that looks complete.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(index, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED,
                                          stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(idx):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
        if root.exists():  # an incomplete tree from elsewhere: replace it
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class SyntheticImages(Dataset):
    """Random normalised images of a fixed size; image i is the same in every epoch and process."""

    def __init__(self, size: int, input_size: int, num_classes: int, seed: int) -> None:
        self.size, self.input_size, self.num_classes, self.seed = size, input_size, num_classes, seed
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, i))
        return torch.randn(3, self.input_size, self.input_size, generator=g), i % self.num_classes


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
    return train, evaluate


def _image_folder(root: Path, transform: object) -> ImageFolder:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_image)
    except FileNotFoundError as e:  # torchvision's message for a folder with no classes or no images
        raise DataError(f"{root}: no images found ({e})") from None


def data_root(cfg: TrainConfig, env: DistEnv) -> Path:
    """Where the ImageFolder tree is; for digits, written on first use by the first process."""
    if cfg.dataset == "digits":
        root = Path(cfg.data_dir).expanduser() if cfg.data_dir else DIGITS_CACHE
        if env.is_main:
            write_digits_imagefolder(root)
        barrier(env)
        return root
    if not cfg.data_dir:
        raise DataError("no data folder given: pass --data-dir DIR (with DIR/train and DIR/val), or use "
                        "--dataset digits or --dataset synthetic")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    return root


def build_datasets(cfg: TrainConfig, env: DistEnv) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes); the class lists of both splits and the config must agree."""
    if cfg.dataset == "synthetic":
        n = cfg.num_classes or 1000
        return (SyntheticImages(cfg.synthetic_train_size, cfg.input_size, n, derive_seed(cfg.seed, 1)),
                SyntheticImages(cfg.synthetic_val_size, cfg.input_size, n, derive_seed(cfg.seed, 2)), n)
    root = data_root(cfg, env)
    train_tf, eval_tf = build_transforms(cfg)
    train = _image_folder(root / cfg.train_split, train_tf)
    val = _image_folder(root / cfg.val_split, eval_tf)
    if train.classes != val.classes:
        raise DataError(f"{root}: the class folders of {cfg.train_split}/ ({len(train.classes)}) and "
                        f"{cfg.val_split}/ ({len(val.classes)}) differ")
    n = len(train.classes)
    if cfg.num_classes is not None and cfg.num_classes != n:
        raise DataError(f"{root}: has {n} classes but the model is configured for num_classes="
                        f"{cfg.num_classes}")
    return train, val, n


class GlobalBatchSampler(Sampler[int]):
    """Per-epoch shuffled training indices, this process's share of every global batch.

    A global batch (batch_size x world_size x grad_accum images) is the same set of images whatever the
    process count: process r takes chunks r*accum .. r*accum+accum-1 of it. So 10 GPUs x 64, 8 GPUs x 80,
    and 8 GPUs x 40 x 2 accumulation steps see the same batches. The incomplete last global batch is dropped.
    """

    def __init__(self, size: int, batch_size: int, grad_accum: int, env: DistEnv, seed: int,
                 shuffle: bool = True) -> None:
        self.size, self.batch_size, self.grad_accum = size, batch_size, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = env.rank, env.world_size, seed, shuffle
        self.global_batch = batch_size * grad_accum * env.world_size
        self.steps = size // self.global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size * self.grad_accum

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        share = self.batch_size * self.grad_accum
        for step in range(self.steps):
            start = step * self.global_batch + self.rank * share
            yield from order[start:start + share].tolist()


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ...: every image on exactly one process, no padding duplicates."""

    def __init__(self, size: int, env: DistEnv) -> None:
        self.indices = list(range(env.rank, size, env.world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def build_loaders(cfg: TrainConfig, train: Dataset, val: Dataset, env: DistEnv
                  ) -> tuple[DataLoader, DataLoader, GlobalBatchSampler, torch.Generator]:
    """Loaders plus the train sampler and the generator that seeds the train workers (reseed per epoch)."""
    sampler = GlobalBatchSampler(len(train), cfg.batch_size, cfg.grad_accum, env, cfg.seed)
    if sampler.steps == 0:
        raise DataError(f"the training set has {len(train)} images, fewer than one global batch of "
                        f"{sampler.global_batch} (batch_size x grad_accum x processes)")
    pin = env.device.type == "cuda"
    workers_gen = torch.Generator()
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                              pin_memory=pin, drop_last=True, generator=workers_gen,
                              persistent_workers=False)
    val_loader = DataLoader(val, batch_size=cfg.batch_size, sampler=ShardSampler(len(val), env),
                            num_workers=cfg.workers, pin_memory=pin, generator=torch.Generator())
    return train_loader, val_loader, sampler, workers_gen
