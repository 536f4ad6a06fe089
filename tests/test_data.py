"""The digits ImageFolder cache, timm's eval transform, the samplers and the image loader's errors."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.datasets import load_digits

from convmixer_pt.data import (
    SHARDS_PER_CHUNK,
    GlobalBatchSampler,
    RankSampler,
    SampleKey,
    Seeded,
    SyntheticImages,
    chunked_order,
    load_image,
    write_digits_imagefolder,
    write_generated_imagefolder,
)
from convmixer_pt.errors import DataError, UserError
from convmixer_pt.runtime import DistEnv
from convmixer_pt.train import config
from convmixer_pt.train.inputs import build_transforms


def env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))


def test_digits_tree_holds_every_digit_once(tmp_path: Path) -> None:
    root = write_digits_imagefolder(tmp_path / "digits")
    digits = load_digits()
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == len(digits.images) == 1797
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    val = Counter(p.parent.name for p in files if p.parts[-3] == "val")
    assert sum(val.values()) == 360 and min(val.values()) >= 35  # stratified 20%
    for path in files[::97]:
        index, label = int(path.stem), int(path.parent.name)
        img = Image.open(path)
        assert img.mode == "L" and img.size == (8, 8) and digits.target[index] == label
        np.testing.assert_array_equal(np.asarray(img), np.round(digits.images[index] * 255 / 16))
    stamp = (root / "val").stat().st_mtime_ns
    assert write_digits_imagefolder(root) == root and (root / "val").stat().st_mtime_ns == stamp


def test_a_generated_data_folder_never_empties_a_folder(tmp_path: Path, capsys) -> None:
    """`convmixer-train --dataset digits|generated --data-dir EXISTING` emptied EXISTING (`--data-dir .` the
    current folder) before writing its images there. Now a folder with anything in it that this command did not
    write (its marker) is refused in one line and left as it was."""
    from trainutil import TINY, cli_args

    from convmixer_pt.cli import train as train_cli

    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "thesis.tex").write_text("four years")
    (mine / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    for dataset in ("digits", "generated"):
        values = dict(TINY, dataset=dataset, data_dir=str(mine), output=str(tmp_path / dataset), epochs=1)
        assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 1
        assert capsys.readouterr().err == (f"error: {mine}: exists and was not written by this command (no "
                                           ".convmixer-generated in it); give a new or empty folder (nothing in it "
                                           "was changed)\n")
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["photos", "photos/a.jpg", "thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "four years"
    # Someone's own train/val tree is not taken for the generated one either (it used to be reused as it was).
    (mine / "train").mkdir()
    (mine / "val").mkdir()
    with pytest.raises(UserError, match="was not written by this command"):
        write_generated_imagefolder(mine, 2, 2, 2)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_generated_data_folder_is_made_where_nothing_is_with_the_umasks_permissions(tmp_path: Path,
                                                                                      mask: int) -> None:
    """Created in a staging folder (mkdtemp: 0700) and renamed: the folder itself was left 0700."""
    previous = os.umask(mask)
    try:
        fresh = write_generated_imagefolder(tmp_path / "fresh", 2, 2, 2)
        (tmp_path / "empty").mkdir()
        empty = write_generated_imagefolder(tmp_path / "empty", 2, 2, 2)
    finally:
        os.umask(previous)
    for root in (fresh, empty):
        assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask
        assert len(list(root.glob("*/*/*.jpg"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fresh"]  # no staging folder left
    # Its own folder is reused; the same folder asked for with other arguments is refused, never rewritten.
    stamp = (fresh / "train").stat().st_mtime_ns
    assert write_generated_imagefolder(fresh, 2, 2, 2) == fresh and (fresh / "train").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="holds another generated folder than convmixer_pt generated images: 3 "):
        write_generated_imagefolder(fresh, 3, 2, 2)
    assert len(list(fresh.glob("*/*/*.jpg"))) == 4


def test_eval_transform_is_resize_then_center_crop(tmp_path: Path) -> None:
    cfg = config.apply(config.TrainConfig(), dict(input_size=32, crop_pct=0.875))
    _, evaluate = build_transforms(cfg)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    # Independent reference: shorter side to floor(32 / 0.875) = 36 with PIL bicubic, center crop 32.
    ref = TF.center_crop(TF.resize(img, 36, interpolation=TF.InterpolationMode.BICUBIC), 32)
    ref = TF.normalize(TF.to_tensor(ref), cfg.mean, cfg.std)
    torch.testing.assert_close(evaluate(img), ref)


def test_train_transform_output_shape(tmp_path: Path) -> None:
    train, _ = build_transforms(config.TrainConfig(input_size=24))
    Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    crop, plan = train(tmp_path / "a.png")
    assert crop.size == (24, 24) and crop.mode == "RGB" and len(plan) == 5


def test_global_batches_do_not_depend_on_the_process_layout() -> None:
    size = 50
    one = GlobalBatchSampler(size, batch_size=4, grad_accum=2, env=env(0, 1), seed=3)
    two = [GlobalBatchSampler(size, batch_size=4, grad_accum=1, env=env(r, 2), seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in (one, *two):
            s.set_epoch(epoch)
        order = list(one)
        assert len(order) == len(one) == 48 and len(set(order)) == 48  # 6 steps of 8, no repeats
        parts = [list(s) for s in two]
        for step in range(6):  # process r gets chunk r of each global batch
            assert parts[0][4 * step:4 * step + 4] == order[8 * step:8 * step + 4]
            assert parts[1][4 * step:4 * step + 4] == order[8 * step + 4:8 * step + 8]
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # reshuffled every epoch
    one.set_epoch(0, start_step=4)  # resumed after 4 steps: the rest of the same epoch
    assert list(one) == first[4 * 8:] and len(one) == 16
    assert [key.index for key in first] != [key.seed for key in first]


def test_an_epoch_from_shards_reads_a_few_shards_at_a_time() -> None:
    """Every sample once per epoch; each global batch from at most two runs of shards; a new order each
    epoch, the same on one process and on two."""
    sizes = [7] * 30 + [3]  # 213 samples, the last shard short
    starts = np.cumsum([0, *sizes])
    shard_of = {i: int(np.searchsorted(starts, i, side="right")) - 1 for i in range(sum(sizes))}
    orders = []
    for epoch in range(2):
        one = GlobalBatchSampler(sum(sizes), 8, 1, env(0, 1), seed=5, shards=sizes)
        one.set_epoch(epoch)
        keys = [k.index for k in one]
        two = []
        for r in range(2):
            half = GlobalBatchSampler(sum(sizes), 4, 1, env(r, 2), seed=5, shards=sizes)
            half.set_epoch(epoch)
            two.append([k.index for k in half])
        assert [i for b in range(len(keys) // 8) for r in range(2) for i in two[r][4 * b:4 * b + 4]] == keys
        full = chunked_order(sizes, SHARDS_PER_CHUNK, torch.Generator().manual_seed(epoch))
        assert sorted(full) == list(range(sum(sizes)))
        for b in range(0, len(keys), 8):
            assert len({shard_of[i] for i in keys[b:b + 8]}) <= 2 * SHARDS_PER_CHUNK
        places: dict[int, list[int]] = {}
        for place, i in enumerate(full):
            places.setdefault(shard_of[i], []).append(place)
        # a shard is read within its run of shards: its samples lie within that run's places
        assert max(p[-1] - p[0] for p in places.values()) < 7 * SHARDS_PER_CHUNK
        assert max(p[-1] - p[0] for p in places.values()) > 7 * 4  # and are shuffled across the run
        orders.append(keys)
    assert orders[0] != orders[1]


def test_a_seeded_sample_is_augmented_alike_wherever_it_is_decoded() -> None:
    """The same key gives the same augmentation before and after other draws and leaves the caller's
    generators as they were."""
    import random

    class Draws(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[float, float, float]:
            return random.random(), float(np.random.rand()), float(torch.rand(()))

    data = Seeded(Draws())
    first = data[SampleKey(1, 77)]
    random.random(), np.random.rand(3), torch.rand(5)
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    assert data[SampleKey(1, 77)] == first and data[SampleKey(1, 78)] != first
    # A DataLoader's batch (`__getitems__`): each sample as alone, whatever comes before it in the batch.
    keys = [SampleKey(2, 5), SampleKey(1, 77), SampleKey(1, 78)]
    assert data.__getitems__(keys) == [data[k] for k in keys] and data.__getitems__(keys[1:2]) == [first]
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])


@pytest.mark.parametrize("size, world", [(10, 3), (7, 2), (1, 4)])
def test_shard_sampler_covers_each_index_once(size: int, world: int) -> None:
    shards = [list(RankSampler(size, env(r, world))) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))


def test_synthetic_images_are_reproducible() -> None:
    a, b = SyntheticImages(4, 16, 10, seed=1), SyntheticImages(4, 16, 10, seed=1)
    assert torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], a[2][0]) and a[3][1] == 3


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=f"{path}: cannot read the image"):
        load_image(str(path))


def test_image_errors_carry_no_object_reprs(tmp_path: Path) -> None:
    # PIL names encoded bytes `<_io.BytesIO object at 0x7f...>`; the message names the sample instead.
    from convmixer_pt.data import Encoded

    with pytest.raises(DataError) as info:
        load_image(Encoded("train-000.tar:img7", b"not an image at all"))
    assert str(info.value) == "train-000.tar:img7: cannot read the image (cannot identify image file)"
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "absent.jpg")
    assert str(info.value) == f"{tmp_path / 'absent.jpg'}: cannot read the image (No such file or directory)"
