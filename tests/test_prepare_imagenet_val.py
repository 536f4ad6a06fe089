"""The flat ILSVRC2012 val folder becomes the ImageFolder layout from either ground-truth format."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from convmixer_pt.evaluation.imagenet_val import PrepareError, build_image_folder, read_labels

ROOT = Path(__file__).resolve().parents[1]
# Devkit order: ILSVRC2012_ID 1, 2, 3 are not in sorted synset order (as in the real devkit, id 1 = n02119789).
DEVKIT_WNIDS = ["n02119789", "n01440764", "n04596742"]
TRUTH = [2, 1, 3, 1, 2]  # ILSVRC2012_ID of images 1..5


@pytest.fixture()
def flat(tmp_path) -> Path:
    images = tmp_path / "val"
    images.mkdir()
    for i in range(1, len(TRUTH) + 1):
        (images / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(f"image {i}".encode())
    return images


def expected_layout() -> dict[str, str]:
    return {f"ILSVRC2012_val_{i:08d}.JPEG": DEVKIT_WNIDS[t - 1] for i, t in enumerate(TRUTH, start=1)}


def layout(out: Path) -> dict[str, str]:
    return {p.name: p.parent.name for p in out.glob("*/*")}


def write_meta_mat(path: Path) -> None:
    """A devkit-like meta.mat: the leaf synsets with their ids, plus one non-leaf entry that must be skipped."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, f"class {i}", 0) for i, w in enumerate(DEVKIT_WNIDS, start=1)]
    rows.append((len(rows) + 1, "n00001740", "entity", 2))
    scipy.io.savemat(path, {"synsets": np.array(rows, dtype=dtype)})


def test_kaggle_solution_csv(flat, tmp_path) -> None:
    csv_path = tmp_path / "LOC_val_solution.csv"
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i:08d},{DEVKIT_WNIDS[t - 1]} 10 20 30 40 {DEVKIT_WNIDS[t - 1]} 1 2 3 4"
        for i, t in reversed(list(enumerate(TRUTH, start=1)))]
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "imagefolder"
    assert build_image_folder(flat, read_labels(csv_path), out) == len(TRUTH)
    assert layout(out) == expected_layout()
    link = out / "n02119789" / "ILSVRC2012_val_00000002.JPEG"
    assert link.is_symlink() and link.read_bytes() == b"image 2"


@pytest.mark.parametrize("mapping", ["meta", "synsets"])
def test_devkit_ground_truth(flat, tmp_path, mapping: str) -> None:
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("\n".join(map(str, TRUTH)) + "\n")
    if mapping == "meta":
        write_meta_mat(tmp_path / "meta.mat")
        labels = read_labels(truth, meta=tmp_path / "meta.mat")
    else:
        (tmp_path / "synsets.txt").write_text("".join(f"{w} words\n" for w in DEVKIT_WNIDS))
        labels = read_labels(truth, synsets=tmp_path / "synsets.txt")
    out = tmp_path / "imagefolder"
    build_image_folder(flat, labels, out, copy=True)
    assert layout(out) == expected_layout()
    copied = out / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    assert not copied.is_symlink() and copied.read_bytes() == b"image 1"


def test_sorted_synsets_file_is_refused(tmp_path) -> None:
    truth = tmp_path / "gt.txt"
    truth.write_text("1\n2\n3\n")
    (tmp_path / "synsets.txt").write_text("".join(f"{w}\n" for w in sorted(DEVKIT_WNIDS)))
    with pytest.raises(PrepareError, match="sorted order, which is not the ILSVRC2012_ID order"):
        read_labels(truth, synsets=tmp_path / "synsets.txt")
    with pytest.raises(PrepareError, match="give exactly one of --meta"):
        read_labels(truth)


def test_missing_or_unlabelled_images_leave_nothing_behind(flat, tmp_path) -> None:
    labels = {Path(k).stem: v for k, v in expected_layout().items()}
    out = tmp_path / "imagefolder"
    with pytest.raises(PrepareError, match="1 labelled image\\(s\\) are not there, e.g. ILSVRC2012_val_00000009"):
        build_image_folder(flat, {**labels, "ILSVRC2012_val_00000009": "n01440764"}, out)
    del labels["ILSVRC2012_val_00000003"]
    with pytest.raises(PrepareError, match="1 image\\(s\\) have no label, e.g. ILSVRC2012_val_00000003.JPEG"):
        build_image_folder(flat, labels, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]


def test_cli_error_is_one_line(flat, tmp_path) -> None:
    bad = tmp_path / "labels.txt"
    bad.write_text("image label\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_imagenet_val.py"), "--images", str(flat),
                           "--labels", str(bad), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: neither Kaggle's LOC_val_solution.csv nor the devkit's "
        "ILSVRC2012_validation_ground_truth.txt (first line 'image label')"]
    assert not (tmp_path / "out").exists()


def test_a_class_id_that_is_not_a_plain_folder_name_is_refused(flat, tmp_path) -> None:
    """A devkit meta.mat whose class id is `../outside/ESCAPED` put images outside --out and reported success."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(1, DEVKIT_WNIDS[0], "a", 0), (2, "../outside/ESCAPED", "b", 0), (3, DEVKIT_WNIDS[2], "c", 0)]
    scipy.io.savemat(tmp_path / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
    (tmp_path / "truth.txt").write_text("\n".join(map(str, TRUTH)) + "\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_imagenet_val.py"), "--images", str(flat),
                           "--labels", str(tmp_path / "truth.txt"), "--meta", str(tmp_path / "meta.mat"),
                           "--out", str(tmp_path / "out" / "val")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: the label of ILSVRC2012_val_00000001: class id '../outside/ESCAPED': not a plain name (no '/', not "
        "'.' or '..'), so it could leave the output folder"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_the_tree_gets_the_umasks_permissions(flat, tmp_path, mask) -> None:
    labels = {Path(k).stem: v for k, v in expected_layout().items()}
    previous = os.umask(mask)
    try:
        build_image_folder(flat, labels, tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert layout(tmp_path / "out") == expected_layout()
