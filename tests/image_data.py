"""Small generated image trees for the evaluation tests: varied sizes, aspect ratios, modes and formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (height, width, mode, format): wide, tall, square, tiny, grayscale, RGBA and palette images, JPEG and PNG.
IMAGE_SPECS = (
    (90, 120, "RGB", "JPEG"),
    (200, 71, "L", "PNG"),
    (67, 67, "RGBA", "PNG"),
    (300, 250, "RGB", "JPEG"),
    (45, 31, "P", "PNG"),
    (64, 160, "L", "JPEG"),
    (240, 180, "RGB", "PNG"),
)


def smooth_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Random low-frequency content plus noise, so resampling filters give clearly different pixels."""
    coarse = rng.uniform(0, 255, (max(height // 16, 2), max(width // 16, 2), channels))
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8).squeeze()).resize((width, height), Image.BILINEAR),
                      dtype=np.float64).reshape(height, width, channels)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_image(path: Path, height: int, width: int, mode: str, fmt: str, rng: np.random.Generator) -> Path:
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "P": 3}[mode]
    arr = smooth_image(rng, height, width, channels)
    img = Image.fromarray(arr.squeeze(), "L" if channels == 1 else "RGB" if channels == 3 else "RGBA")
    if mode == "P":
        img = img.convert("P", palette=Image.ADAPTIVE)
    path = path.with_suffix(".jpg" if fmt == "JPEG" else ".png")
    img.save(path, fmt)
    return path


def make_image_folder(root: Path, classes: int = 4, images: int = 13, seed: int = 0) -> list[tuple[Path, int]]:
    """`images` files spread round-robin over `classes` synset-named folders; (path, label) in sorted order."""
    rng = np.random.default_rng(seed)
    names = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    samples = []
    for i in range(images):
        label = i % classes
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        h, w, mode, fmt = IMAGE_SPECS[i % len(IMAGE_SPECS)]
        samples.append((write_image(folder / f"img{i:03d}", h, w, mode, fmt, rng), label))
    return sorted(samples)
