"""RandAugment on the training device (`augment_on_device`): every op is Pillow's to the bit on decoded photos,
the whole pipeline is timm's trainer's for the same draws, and a run trains alike with and without it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from images import make_image_folder
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import ImageDataset, auto_augment, create_transform
from timm.data.loader import fast_collate

from convmixer_pt.data import ImageFolder, SampleKey, Seeded, seeded_rngs
from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import augment, config
from convmixer_pt.train.config import ConfigError
from convmixer_pt.train.inputs import (
    DeviceInputs,
    build_transforms,
    collate_train,
    erasing_plan_size,
    guard_posterize,
    posterize,
)
from convmixer_pt.train.loop import run

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # the GPU check runs these on CUDA too
FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean
CASES = {
    "auto_contrast": [0.0], "equalize": [0.0], "invert": [0.0],
    "rotate": [0.0, 90.0, -90.0, 180.0, 29.7, -13.25, 0.4, 720.0 - 3.5],
    "posterize": [0, 1, 2, 4, 7, 8], "solarize": [0, 1, 128, 200, 256], "solarize_add": [0, 37, 110],
    "color": [0.1, 0.55, 1.0, 1.9], "contrast": [0.1, 0.9, 1.7], "brightness": [0.1, 0.63, 1.9],
    "sharpness": [0.1, 1.0, 1.45, 1.9],
    "shear_x": [-0.3, 0.013, 0.27], "shear_y": [-0.21, 0.3], "translate_x_rel": [-0.45, 0.1, 0.333],
    "translate_y_rel": [-0.2, 0.45], "translate_x_abs": [-57.5, 100.0], "translate_y_abs": [-3.0, 81.25],
}


@pytest.fixture(scope="module")
def crops() -> list[Image.Image]:
    """Crops of scikit-learn's two sample photographs (decoded from their JPEGs): square, wide, tall, and one
    of a single colour."""
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    return [china.crop((100, 50, 324, 274)), flower.crop((200, 100, 261, 147)), china.crop((0, 300, 37, 427)),
            Image.new("RGB", (20, 20), (7, 200, 255))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", augment.KINDS)
def test_every_op_is_pillows_to_the_bit(crops, kind, device) -> None:
    """Each op replayed on a batch (all samples at once, each with its own argument and interpolation) equals
    timm's op function on the PIL image."""
    timm_fn = posterize if kind == "posterize" else getattr(auto_augment, kind)
    resamples = (augment.BILINEAR, augment.BICUBIC) if kind in augment.GEOMETRIC else (0,)
    for img in crops:
        cases = [(arg, r) for arg in CASES[kind] for r in resamples]
        batch = torch.from_numpy(np.stack([np.asarray(img)] * len(cases))).permute(0, 3, 1, 2).to(device)
        out = augment.replay(batch, [[(kind, float(arg), r)] for arg, r in cases], FILL).cpu()
        for (arg, r), got in zip(cases, out, strict=True):
            args = () if kind in ("auto_contrast", "equalize", "invert") else (arg,)
            expected = np.asarray(timm_fn(img, *args, fillcolor=FILL, resample=r))
            assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (kind, arg, r, img.size)


@pytest.mark.parametrize("device", DEVICES)
def test_resize_is_pillows_to_the_bit(device) -> None:
    """Regions of many sizes resized in one batch, up and down, bilinear and bicubic, rows or columns first,
    equal Pillow's `Image.resize` (timm's RandomResizedCrop after its crop)."""
    china = Image.fromarray(load_sample_images().images[0])
    cases = [((73, 296), (224, 224)), ((296, 73), (224, 224)), ((375, 375), (224, 224)), ((224, 224), (224, 224)),
             ((400, 130), (64, 64)), ((5, 7), (64, 64)), ((130, 400), (64, 64)), ((250, 201), (224, 224))]
    for out in {size for _, size in cases}:
        for resample in (augment.BILINEAR, augment.BICUBIC):
            regions = [china.crop((11, 3, 11 + w, 3 + h)) for (w, h), size in cases if size == out]
            got = augment.resize([torch.from_numpy(np.array(r)).permute(2, 0, 1).to(device) for r in regions],
                                 [resample] * len(regions), out).cpu()
            for region, pixels in zip(regions, got, strict=True):
                expected = np.asarray(region.resize(out[::-1], resample))
                assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected), (region.size, out, resample)
    assert augment.vertical_first(73, 296, 224, 224) and not augment.vertical_first(296, 73, 224, 224)


def photos(root: Path) -> Path:
    """A class tree of JPEGs cut from the sample photographs, and the test's varied images (PNG, grayscale,
    RGBA, palette)."""
    names = ["china", "flower"]
    make_image_folder(root, classes=2, images=6, names=names)
    for name, a in zip(names, load_sample_images().images, strict=True):
        for j in range(4):
            Image.fromarray(a).crop((60 * j, 40 * j, 60 * j + 300, 40 * j + 220)).save(
                root / name / f"photo{j}.jpg", quality=90)
    return root


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1", "original-mstd0.5"])
def test_the_device_path_is_timms_trainer(tmp_path, policy, device) -> None:
    """With augment_on_device the worker sends unaugmented crops and plans; replayed on the device they are the
    uint8 batch of timm's train.py loader (ImageDataset, create_transform(use_prefetcher=True), fast_collate)
    for the same seeds, and the normalized, erased batch is the one the worker-side path gives."""
    folder = photos(tmp_path / "train")
    cfg = config.resolve(None, dict(input_size=64, auto_augment=policy))
    on = replace(cfg, augment_on_device=True)
    ours = {flag: Seeded(ImageFolder(folder, build_transforms(c)[0])) for flag, c in ((False, cfg), (True, on))}
    theirs = ImageDataset(str(folder), transform=guard_posterize(create_transform(
        is_training=True, use_prefetcher=True, input_size=64, auto_augment=policy, interpolation="random")))
    assert [Path(p).name for p, _ in theirs.reader.samples] == [Path(p).name for p, _ in ours[True].dataset.samples]
    inputs, worker = DeviceInputs(on, torch.device(device)), DeviceInputs(cfg, torch.device(device))
    for seed in range(3):
        keys = [SampleKey(i, 100 * seed + i) for i in range(len(theirs))]
        worker_side, labels, plans = collate_train([ours[False][k] for k in keys])
        device_side, _, device_plans = collate_train([ours[True][k] for k in keys])
        erase = erasing_plan_size(cfg.re_count)
        assert torch.equal(device_plans[:, :erase], plans)  # the erasing draws come after the same RandAugment
        assert any(augment.decode_plan(p[erase + augment.GEOMETRY:]) for p in device_plans.tolist())
        assert device_side.dim() == 1  # the crops' regions, of many sizes
        reference = []
        for k in keys:
            with seeded_rngs(k.seed):
                reference.append(theirs[k.index])
        expected, _ = fast_collate(reference)
        assert torch.equal(inputs.pixels(device_side.to(device), device_plans.tolist()).cpu(), expected)
        assert torch.equal(worker_side.permute(0, 3, 1, 2), expected)
        assert torch.equal(inputs(device_side, device_plans), worker(worker_side, plans))


@pytest.mark.parametrize("policy, named", [(None, "ColorJitter"), ("augmix-m5-w4-d2", "AugMixAugment"),
                                           ("3a", "ColorJitter")])
def test_augment_on_device_refuses_what_it_cannot_replay(policy, named, monkeypatch) -> None:
    cfg = config.resolve(None, dict(input_size=32, auto_augment=policy, augment_on_device=True, color_jitter=0))
    with pytest.raises(ConfigError, match="augment_on_device") as e:
        build_transforms(cfg)
    assert named in str(e.value), str(e.value)
    three_augment = auto_augment.rand_augment_transform("rand-m9-t3a", dict(img_mean=FILL))
    with pytest.raises(ConfigError, match="timm's op Desaturate cannot run on the device"):
        augment.PlanRecorder(three_augment, posterize)
    monkeypatch.setattr(augment, "PILLOW", (12, 3))  # an older Pillow resizes in another order
    with pytest.raises(ConfigError, match=r"reproduces Pillow 13's arithmetic .* pip install 'pillow>=13'"):
        build_transforms(config.resolve(None, dict(input_size=32, augment_on_device=True)))


def test_a_run_trains_alike_with_augmentation_on_the_device(tmp_path) -> None:
    """The paper's recipe on decoded JPEGs, one epoch of a tiny model on the CPU: the same weights whether
    RandAugment runs in the loader's workers or on the device."""
    photos(tmp_path / "data" / "train")
    photos(tmp_path / "data" / "val")
    weights = []
    for flag in (False, True):
        cfg = config.resolve(None, dict(
            data_dir=str(tmp_path / "data"), device="cpu", batch_size=8, epochs=1, workers=0, input_size=32,
            progress=False, augment_on_device=flag, model="convmixer_128_4", model_args=dict(dim=8, depth=1),
            output=str(tmp_path / f"run{flag}")))
        run(cfg, init_distributed("cpu"))
        weights.append(torch.load(tmp_path / f"run{flag}" / "last.pth", weights_only=False)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
