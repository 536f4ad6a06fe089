"""The tests' one image-tree generator: ImageFolder trees of real PNG/JPEG files, whose content depends on the
class (so a model can learn them), in varied sizes, aspect ratios, modes and formats where asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (height, width, mode, format): wide, tall, square, tiny, grayscale, RGBA and palette images, JPEG and PNG.
VARIED = (
    (90, 120, "RGB", "JPEG"),
    (200, 71, "L", "PNG"),
    (67, 67, "RGBA", "PNG"),
    (300, 250, "RGB", "JPEG"),
    (45, 31, "P", "PNG"),
    (64, 160, "L", "JPEG"),
    (240, 180, "RGB", "PNG"),
)


def class_image(rng: np.random.Generator, height: int, width: int, label: int) -> np.ndarray:
    """RGB uint8: low-frequency random content (so resampling filters give clearly different pixels) and noise,
    pulled towards a colour that depends on the class."""
    coarse = rng.uniform(0, 255, (max(height // 16, 2), max(width // 16, 2), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float64)
    tint = np.zeros(3)
    tint[label % 3] = 255
    return np.clip(0.4 * smooth + 0.5 * tint + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray, mode: str, fmt: str) -> Path:
    img = Image.fromarray(pixels, "RGB")
    img = img.convert("P", palette=Image.ADAPTIVE) if mode == "P" else img.convert(mode)
    path = path.with_suffix(".jpg" if fmt == "JPEG" else ".png")
    img.save(path, fmt)
    return path


def make_image_folder(root: Path, classes: int = 4, images: int = 13, seed: int = 0,
                      specs: tuple[tuple[int, int, str, str], ...] = VARIED,
                      names: list[str] | None = None) -> list[tuple[Path, int]]:
    """`images` files spread round-robin over `classes` folders (synset-like names unless `names`), image i
    shaped by `specs[i % len(specs)]`; returns (path, label) in sorted order."""
    rng = np.random.default_rng(seed)
    names = names or [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    samples = []
    for i in range(images):
        label = i % classes
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        h, w, mode, fmt = specs[i % len(specs)]
        samples.append((write_image(folder / f"img{i:03d}", class_image(rng, h, w, label), mode, fmt), label))
    return sorted(samples)


def make_train_val(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3,
                   size: int = 20, seed: int = 0) -> Path:
    """`root/{train,val}/c<K>/*.png`: square RGB images, the trainer's input layout."""
    names = [f"c{c}" for c in range(classes)]
    for k, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        make_image_folder(root / split, classes, classes * count, seed=seed + k,
                          specs=((size, size, "RGB", "PNG"),), names=names)
    return root
