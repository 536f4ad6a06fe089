"""The two eval protocols against their independent references: timm's own eval transform and MindCV's op
list run through MindSpore's dataset pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data
from images import make_image_folder
from PIL import Image

from convmixer_pt.evaluation.protocols import build_transform, resize_size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return root, make_image_folder(root, classes=3, images=9)


def test_resize_size_is_floor_of_size_over_crop_pct() -> None:
    assert resize_size(224, 0.96) == 233
    assert resize_size(224, 0.875) == 256
    assert resize_size(64, 0.96) == 66


@pytest.mark.parametrize("size", [224, 64])
def test_timm_protocol_equals_timm_eval_transform(folder, size: int) -> None:
    _, samples = folder
    ours = build_transform("timm", img_size=size)
    reference = timm.data.create_transform(size, crop_pct=0.96, interpolation="bicubic")
    for path, _ in samples:
        with Image.open(path) as img:
            expected = reference(img.convert("RGB")).numpy()
        got = ours(path)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        np.testing.assert_array_equal(got, expected, err_msg=str(path))


def mindcv_reference_ops(size: int, crop_pct: float) -> list:
    """MindCV's transforms_imagenet_eval as its convmixer configs call it (interpolation: bilinear)."""
    import math

    from mindspore.dataset import vision
    from mindspore.dataset.vision import Inter

    return [
        vision.Decode(),
        vision.Resize(int(math.floor(size / crop_pct)), interpolation=Inter.BILINEAR),
        vision.CenterCrop(size),
        vision.Normalize(mean=[0.485 * 255, 0.456 * 255, 0.406 * 255], std=[0.229 * 255, 0.224 * 255, 0.225 * 255]),
        vision.HWC2CHW(),
    ]


@pytest.mark.mindspore
@pytest.mark.parametrize("size", [224, 64])
def test_mindcv_protocol_equals_mindspore_dataset_pipeline(folder, size: int) -> None:
    import mindspore.dataset as ds

    root, samples = folder
    data = ds.ImageFolderDataset(str(root), decode=False, shuffle=False)
    data = data.map(operations=mindcv_reference_ops(size, 0.96), input_columns="image")
    rows = list(data.create_dict_iterator(output_numpy=True))
    assert [int(r["label"]) for r in rows] == [label for _, label in samples]
    ours = build_transform("mindcv", img_size=size)
    for (path, _), row in zip(samples, rows, strict=True):
        got = ours(path)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        np.testing.assert_array_equal(got, row["image"], err_msg=str(path))


@pytest.mark.mindspore
def test_both_protocols_decode_the_same_pixels(folder) -> None:
    """MindSpore's Decode and PIL give identical RGB arrays for these files, so the protocols differ only
    in resampling."""
    from mindspore.dataset import vision

    _, samples = folder
    for path, _ in samples:
        with Image.open(path) as img:
            pil = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(vision.Decode()(np.fromfile(path, dtype=np.uint8)), pil, err_msg=str(path))


@pytest.mark.mindspore
def test_protocols_differ_where_resampling_differs(folder) -> None:
    _, samples = folder
    path = next(p for p, _ in samples if Image.open(p).size == (250, 300))  # downscaled: antialiasing matters
    diff = np.abs(build_transform("timm")(path) - build_transform("mindcv")(path))
    assert diff.mean() > 0.01


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'pil'"):
        build_transform("pil")
