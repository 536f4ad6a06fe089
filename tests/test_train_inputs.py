"""The trainer's inputs: the paper's augmentation runs on real decoded images without ever raising."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from timm.data import create_transform

from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.inputs import build_transforms, posterize
from convmixer_pt.train.loop import run

RECIPE = dict(input_size=32, auto_augment="rand-m9-mstd0.5-inc1", interpolation="random", re_prob=0.25,
              re_mode="pixel")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """scikit-learn's sample photograph, decoded from its JPEG, made small."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((80, 60))


def draw(transform, img: Image.Image, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(img)


def test_recipe_augmentation_never_raises(photo) -> None:
    """timm's transform for `rand-m9-mstd0.5-inc1` asks Pillow 13 to posterize to 0 bits now and then, which
    it refuses; the trainer's transform, the same in every other respect, never raises on the same draws."""
    raw = create_transform(is_training=True, **RECIPE)
    ours, _ = build_transforms(config.resolve(None, dict(input_size=32)))
    failing = []
    for seed in range(3000):
        try:
            draw(raw, photo, seed)
        except ValueError as e:
            assert "bits must be between" in str(e)
            failing.append(seed)
    assert failing, "timm's transform no longer fails: the guard may be dropped"
    for seed in failing + list(range(200)):
        out = draw(ours, photo, seed)
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    ok = next(s for s in range(3000) if s not in failing)
    assert torch.equal(draw(ours, photo, ok), draw(raw, photo, ok))  # the same pipeline where timm's works


def test_posterize_is_pillows_for_1_to_7_bits_and_black_for_0(photo) -> None:
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(photo, bits)), np.asarray(ImageOps.posterize(photo, bits)))
    assert posterize(photo, 8) is photo
    assert not np.asarray(posterize(photo, 0)).any()
    gray = photo.convert("L")
    assert np.array_equal(np.asarray(posterize(gray, 3)), np.asarray(ImageOps.posterize(gray, 3)))


@pytest.mark.slow
def test_paper_recipe_trains_on_decoded_images(tmp_path) -> None:
    """The shipped ImageNet config as is (RandAugment inc1, random erasing, mixup/cutmix, smoothing), on
    decoded JPEGs made for the test, a tiny model: one epoch through the whole pipeline on the CPU."""
    cfg = config.resolve("configs/convmixer_1536_20.yaml", dict(
        dataset="generated", data_dir=str(tmp_path / "jpegs"), synthetic_train_size=320, synthetic_val_size=40,
        num_classes=4, device="cpu", batch_size=16, epochs=1, workers=0, input_size=32, progress=False,
        model_args=dict(dim=16, depth=1), output=str(tmp_path / "run")))
    progress = run(cfg, init_distributed("cpu"))
    assert progress.epoch == 1 and progress.step == 320 // 16
    assert sorted(p.suffix for p in (tmp_path / "jpegs" / "train").glob("*/*"))[0] == ".jpg"
