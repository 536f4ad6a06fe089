"""The trainer's inputs: the paper's augmentation runs on real decoded images without ever raising; the crops
are timm's trainer's pixel for pixel, normalized and erased on the device as timm's prefetcher does; reduced-size
decoding; the loader's workers follow the machine."""

from __future__ import annotations

import random
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from images import VARIED, make_image_folder
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from timm.data import ImageDataset, create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

from convmixer_pt.data import ImageFolder, SampleKey, Seeded, load_image, seeded_rngs
from convmixer_pt.runtime import DistEnv, init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.inputs import (
    DeviceInputs,
    ErasingBoxes,
    build_loaders,
    build_transforms,
    collate_train,
    default_workers,
    posterize,
)
from convmixer_pt.train.loop import run

RECIPE = dict(input_size=32, auto_augment="rand-m9-mstd0.5-inc1", interpolation="random", re_prob=0.25,
              re_mode="pixel")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """scikit-learn's sample photograph, decoded from its JPEG, made small."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((80, 60))


def draw(transform, img, seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(img)


def test_recipe_augmentation_never_raises(photo, tmp_path) -> None:
    """timm's transform for `rand-m9-mstd0.5-inc1` asks Pillow 13 to posterize to 0 bits now and then, which
    it refuses; the trainer's transform, the same in every other respect, never raises on the same draws."""
    raw = create_transform(is_training=True, use_prefetcher=True, **RECIPE)
    ours, _ = build_transforms(config.resolve(None, dict(input_size=32)))
    path = tmp_path / "photo.png"
    photo.save(path)
    failing = []
    for seed in range(3000):
        try:
            draw(raw, photo, seed)
        except ValueError as e:
            assert "bits must be between" in str(e)
            failing.append(seed)
    assert failing, "timm's transform no longer fails: the guard may be dropped"
    for seed in failing + list(range(200)):
        crop, plan = draw(ours, path, seed)
        assert crop.size == (32, 32) and len(plan) == 5
    ok = next(s for s in range(3000) if s not in failing)
    assert torch.equal(chw(draw(ours, path, ok)[0]), draw(raw, photo, ok))  # the same pipeline where timm's works


def chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_crops_are_timms_trainers_pixels_for_the_same_draws(tmp_path) -> None:
    """The loader's uint8 batch equals what timm's train.py loader collates (its ImageDataset, `create_transform(
    ..., use_prefetcher=True)`, `fast_collate`) when every sample draws from the same seeds: JPEG and PNG,
    grayscale, RGBA and palette images, the paper's recipe at 32 pixels."""
    make_image_folder(tmp_path / "train", classes=3, images=21)
    cfg = config.resolve(None, dict(input_size=32))
    ours = Seeded(ImageFolder(tmp_path / "train", build_transforms(cfg)[0]))
    theirs = ImageDataset(str(tmp_path / "train"), transform=create_transform(is_training=True, use_prefetcher=True,
                                                                               **RECIPE))
    assert [Path(p).name for p, _ in theirs.reader.samples] == [Path(p).name for p, _ in ours.dataset.samples]
    compared = 0
    for seed in range(4):
        keys = [SampleKey(i, 1000 * seed + i) for i in range(len(ours))]
        images, labels, plans = collate_train([ours[k] for k in keys])
        try:
            reference = []
            for k in keys:
                with seeded_rngs(k.seed):
                    reference.append(theirs[k.index])
        except ValueError:  # timm's posterize with 0 bits (see above): another seed
            continue
        expected, expected_labels = fast_collate(reference)
        assert images.dtype == torch.uint8 and images.shape == (len(keys), 32, 32, 3)
        assert torch.equal(images.permute(0, 3, 1, 2), expected) and torch.equal(labels, expected_labels)
        assert plans.shape == (len(keys), 5)
        compared += 1
    assert compared >= 2


def test_erasing_boxes_are_timms(photo) -> None:
    """The boxes drawn in the worker are those timm's RandomErasing erases for the same draws (1 to 3 boxes)."""
    for count in (1, 3):
        eraser = RandomErasing(1.0, mode="const", max_count=count, device="cpu")
        for seed in range(20):
            random.seed(seed)
            reference = eraser(torch.ones(3, 40, 30))
            random.seed(seed)
            boxes = ErasingBoxes((3, 40, 30))
            eraser(boxes)
            mask = torch.ones(3, 40, 30)
            for top, left, h, w in boxes.boxes:
                mask[:, top:top + h, left:left + w] = 0
            assert 1 <= len(boxes.boxes) <= count and torch.equal(mask, reference)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_device_inputs_normalize_as_timms_prefetcher_and_erase_per_sample(mode) -> None:
    cfg = config.resolve(None, dict(input_size=16, re_mode=mode, re_count=2))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    none = torch.zeros(4, 9, dtype=torch.int64)
    out = DeviceInputs(cfg, torch.device("cpu"))(images, none)
    prefetcher = PrefetchLoader([(images.permute(0, 3, 1, 2), torch.zeros(4))], mean=tuple(cfg.mean),
                                std=tuple(cfg.std), device=torch.device("cpu"))
    expected, _ = next(iter(prefetcher))
    assert out.is_contiguous() and torch.equal(out, expected)
    plans = torch.tensor([[7, 2, 3, 5, 6, 0, 0, 0, 0], [0] * 9, [7, 2, 3, 5, 6, 10, 0, 4, 16],
                          [8, 2, 3, 5, 6, 0, 0, 0, 0]])
    erased = DeviceInputs(cfg, torch.device("cpu"))(images, plans)
    inside = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    inside[0, :, 2:7, 3:9] = inside[2, :, 2:7, 3:9] = inside[2, :, 10:14, 0:16] = inside[3, :, 2:7, 3:9] = True
    inside = inside.expand_as(out)
    assert torch.equal(erased[~inside], out[~inside])  # untouched outside the boxes, sample 1 not at all
    box = erased[0, :, 2:7, 3:9]
    if mode == "const":
        assert not box.any()
    else:
        assert not torch.equal(box, out[0, :, 2:7, 3:9])
        assert (box == box[:, :1, :1]).all() == (mode == "rand")
        assert torch.equal(box, erased[2, :, 2:7, 3:9])  # the same seed, the same pixels, wherever in the batch
        assert mode == "const" or not torch.equal(box, erased[3, :, 2:7, 3:9])  # another seed
    alone = DeviceInputs(cfg, torch.device("cpu"))(images[2:3], plans[2:3])
    assert torch.equal(alone[0], erased[2])


def test_channels_last_and_float_batches(tmp_path) -> None:
    cfg = config.resolve(None, dict(input_size=16, channels_last=True))
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    out = DeviceInputs(cfg, torch.device("cpu"))(images, torch.zeros(2, 5, dtype=torch.int64))
    assert out.is_contiguous(memory_format=torch.channels_last)
    floats = torch.randn(2, 3, 16, 16)
    assert DeviceInputs(cfg, torch.device("cpu"))(floats, torch.zeros(2, 0, dtype=torch.int64)) is floats


def photo_jpeg(tmp_path: Path, size: tuple[int, int] = (640, 427)) -> Path:
    """scikit-learn's sample photograph as a JPEG of `size`."""
    path = tmp_path / f"photo{size[0]}.jpg"
    Image.fromarray(load_sample_image("flower.jpg")).resize(size).save(path, quality=90)
    return path


def test_reduced_decoding_draws_the_same_crop_and_decodes_less(tmp_path) -> None:
    """With reduced decoding the crop boxes and every later draw are those of a full decode; a JPEG whose crop
    has 2x, 4x, 8x the output's pixels is decoded at 1/2, 1/4, 1/8 and its crop is close to the full decode's;
    crops that need the full resolution, and PNGs, are the full decode's to the bit."""
    jpeg = photo_jpeg(tmp_path)
    png = tmp_path / "photo.png"
    Image.open(jpeg).save(png)
    scales, psnr = set(), []
    for size in (24, 100):  # 8x needs a crop of 192 pixels a side at 24; 1x one below 200 at 100
        cfg = config.resolve(None, dict(input_size=size, scale=[0.02, 1.0], auto_augment=None, hflip=0.0))
        full, reduced = (build_transforms(replace(cfg, reduced_decoding=r))[0] for r in (False, True))
        for seed in range(40):
            drawn = []
            with seeded_rngs(seed):
                img = load_image(jpeg, lambda opened, d=drawn, t=reduced: d.extend(t.draw(opened)))
            (_, _, h, w), _, factor = drawn
            assert factor in (1, 2, 4, 8) and img.size == (-(-640 // factor), -(-427 // factor))
            assert factor == next((f for f in (8, 4, 2) if h >= size * f and w >= size * f), 1)
            scales.add(factor)
            a, plan_a = draw(full, jpeg, seed)
            b, plan_b = draw(reduced, jpeg, seed)
            assert plan_a == plan_b  # the erasing boxes (drawn after the crop) and their seed
            if factor == 1:
                assert np.array_equal(np.asarray(a), np.asarray(b))
            else:
                mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                psnr.append(10 * np.log10(255 ** 2 / mse))
            assert np.array_equal(np.asarray(draw(reduced, png, seed)[0]), np.asarray(draw(full, png, seed)[0]))
    assert scales == {1, 2, 4, 8} and min(psnr) > 25 and np.median(psnr) > 30, (scales, min(psnr), np.median(psnr))


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_workers_stay_within_pytorchs_suggestion(monkeypatch, cores, device) -> None:
    """Default workers never exceed the cores the process may use (PyTorch warns above that), leave the model's
    threads (CPU) or the training process (GPU) a core, and share the cores among a machine's processes."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    for processes in (1, 2, 8):
        workers = default_workers(torch.device(device), cores, processes)
        assert 0 <= workers <= max(1, cores // processes)
        share = cores // processes
        assert workers <= share - 1 or share <= 1  # a core left to the training process where it has two
        loader = DataLoader(list(range(4)), num_workers=workers)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.check_worker_number_rationality()
    assert default_workers(torch.device("cuda"), 16, 1) == 15 and default_workers(torch.device("cpu"), 2, 1) == 1


def test_build_loaders_default_workers_on_two_cores(monkeypatch, tmp_path) -> None:
    """On a 2-core machine the trainer's default loaders start without PyTorch's worker warning."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    make_image_folder(tmp_path / "train", classes=2, images=8, specs=VARIED[:1])
    cfg = config.resolve(None, dict(input_size=16, batch_size=4, mixup=0.0, cutmix=0.0))
    train = Seeded(ImageFolder(tmp_path / "train", build_transforms(cfg)[0]))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    train_loader, val_loader, _ = build_loaders(cfg, train, train, env)
    assert train_loader.num_workers == 1 and train_loader.prefetch_factor == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels, plans = next(iter(train_loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 16, 16, 3) and plans.shape == (4, 5)


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
