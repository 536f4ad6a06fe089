"""Images and datasets shared by training and evaluation: decoding, the ImageFolder layout, the embedded
digits tree, generated images, and the samplers that make runs reproducible across process counts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import DataError
from .runtime import DistEnv

CACHE = Path.home() / ".cache" / "convmixer_pt"
DIGITS_CACHE = CACHE / "digits"
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, rank, ...), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def load_image(path: str | Path) -> Image.Image:
    """PIL decode to RGB; a file PIL cannot read, or one that would decompress to more pixels than PIL's
    limit (a decompression bomb), becomes one DataError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None


class Decoded:
    """`transform(load_image(path))`: a PIL transform (timm's, torchvision's) as a path transform."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, path: str | Path) -> Any:
        return self.transform(load_image(path))


class ImageFolder(Dataset):
    """`root/<class>/<image>` with torchvision's rules (class folders sorted by name, files sorted, its image
    extensions); items are (transform(path), label). `samples` lists (path, label) in index order."""

    def __init__(self, root: str | Path, transform: Callable[[str], Any]) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        try:
            self.classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError:
            raise DataError(f"{root}: no images found: it holds no class folders (expected the ImageFolder "
                            "layout DIR/<class>/<image>)") from None
        self.samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise DataError(f"{root}: no images found in its {len(self.classes)} class folders "
                            f"({', '.join(IMG_EXTENSIONS)})")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(path), label


def write_digits_imagefolder(root: str | Path) -> Path:
    """scikit-learn's 8x8 digits as grayscale PNGs in `root/{train,val}/{0..9}/`, written once.

    The split is fixed (stratified, 20% val, seed 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split


    def write(tmp: Path) -> None:
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        index = np.arange(len(images))
        train_idx, val_idx = train_test_split(index, test_size=DIGITS_VAL_FRACTION,
                                              random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(idx):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")

    return _build_tree(Path(root), write)


def _build_tree(root: Path, write: Callable[[Path], None]) -> Path:
    """Write a tree with `write(tmp)` beside `root` and rename it into place, so an interrupted write never
    leaves a half tree that looks complete; a complete tree (train/ and val/) is kept as it is."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(tmp)
        if root.exists():  # an incomplete tree from elsewhere: replace it
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_generated_imagefolder(root: str | Path, classes: int, train_images: int, val_images: int,
                                seed: int = 0) -> Path:
    """JPEG photographs' stand-ins in `root/{train,val}/<class>/`: sizes from 160 to 480 pixels a side,
    low-frequency random content tinted by class, so that decoding, resizing and every augmentation run as
    on ImageNet without a dataset. Written once; the same arguments give the same files."""

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        palette = rng.uniform(0, 255, (classes, 3))
        for split, count in (("train", train_images), ("val", val_images)):
            for i in range(count):
                label = i % classes
                h, w = (int(v) for v in rng.integers(160, 481, 2))
                coarse = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
                smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float64)
                pixels = 0.6 * smooth + 0.4 * palette[label] + rng.normal(0, 8, smooth.shape)
                folder = tmp / split / f"c{label:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)

    return _build_tree(Path(root), write)


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
