"""The ILSVRC2012 validation images, from their flat release folder into the ImageFolder layout.

ImageNet's class index i is the i-th synset folder in sorted order (n01440764 = 0, ...), which is what
an ImageFolder over `<out>/<synset>/<image>` yields. Ground truth comes in two common forms:

- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the synset first in each prediction string.
- The devkit's `ILSVRC2012_validation_ground_truth.txt`: one ILSVRC2012_ID (1-1000) per line for images
  1, 2, ... 50000. These ids are *not* the sorted class order; they map to synsets through the devkit's
  `data/meta.mat` (read with scipy) or through a text file listing the 1000 synsets in ILSVRC2012_ID order.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError, about
from ..files import input_problem, plain_name, umask

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_WNID_RE = re.compile(r"^n\d{8}$")


class PrepareError(UserError):
    """Input that cannot be turned into the ImageFolder layout."""


def read_kaggle_solution(path: str | Path) -> dict[str, str]:
    """Image id (file name without extension) -> synset, from `LOC_val_solution.csv`."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise PrepareError(f"{path}: expected the header ImageId,PredictionString (Kaggle's "
                               f"LOC_val_solution.csv), found {','.join(header or [])!r}")
        labels = {}
        for lineno, row in enumerate(reader, start=2):
            wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
            if not _WNID_RE.match(wnid):
                raise PrepareError(f"{path}, line {lineno}: the prediction string does not start with a "
                                   f"synset id like n01440764 ({','.join(row)!r})")
            labels[row[0].strip()] = wnid
    return labels


def read_meta_mat(path: str | Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 leaf classes, from the devkit's `meta.mat`."""
    import scipy.io

    path = Path(path)
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{path}: not the devkit's meta.mat (no readable 'synsets' table: {e})") from None
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def read_synsets(path: str | Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset from a text file with one synset per line in ILSVRC2012_ID order (line 1 = id 1);
    anything after the synset on a line (its words) is ignored."""
    path = Path(path)
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = next((w for w in wnids if not _WNID_RE.match(w)), None)
    if bad is not None or not wnids:
        raise PrepareError(f"{path}: expected one synset id like n01440764 per line, found {bad!r}")
    if len(wnids) > 2 and wnids == sorted(wnids):
        # The devkit's id 1 is n02119789 (kit fox): a sorted list is the class-index order (e.g. Kaggle's
        # LOC_synset_mapping.txt), and using it here would give every image a wrong label.
        raise PrepareError(f"{path}: lists the synsets in sorted order, which is not the ILSVRC2012_ID order "
                           "of the devkit ground truth; use the devkit's meta.mat (--meta) instead")
    return {i: w for i, w in enumerate(wnids, start=1)}


def read_devkit_ground_truth(path: str | Path, id_to_wnid: Mapping[int, str]) -> dict[str, str]:
    """Image id -> synset, from `ILSVRC2012_validation_ground_truth.txt` (line n is image n)."""
    path = Path(path)
    labels = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            wnid = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise PrepareError(f"{path}, line {lineno}: {line.strip()!r} is not an ILSVRC2012_ID between "
                               f"1 and {len(id_to_wnid)}") from None
        labels[f"ILSVRC2012_val_{lineno:08d}"] = wnid
    return labels


def read_labels(path: str | Path, meta: str | Path | None = None, synsets: str | Path | None = None) -> dict[str, str]:
    """Image id -> synset from either ground-truth format, recognised from the file's first line."""
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise PrepareError(f"{path}: {problem}")
    with open(path) as f:
        first = f.readline()
    if first.startswith("ImageId"):
        return read_kaggle_solution(path)
    if not first.strip().isdigit():
        raise PrepareError(f"{path}: neither Kaggle's LOC_val_solution.csv nor the devkit's "
                           f"ILSVRC2012_validation_ground_truth.txt (first line {first.strip()!r})")
    if (meta is None) == (synsets is None):
        raise PrepareError(f"{path}: the devkit ground truth holds ILSVRC2012_IDs; give exactly one of "
                           "--meta (the devkit's data/meta.mat) or --synsets (synsets in ILSVRC2012_ID order)")
    return read_devkit_ground_truth(path, read_meta_mat(meta) if meta is not None else read_synsets(synsets))


def image_id(name: str) -> str:
    """`ILSVRC2012_val_00000001.JPEG` -> `ILSVRC2012_val_00000001` (the key both label formats use)."""
    return name.rsplit(".", 1)[0]


def build_image_folder(images: str | Path, labels: Mapping[str, str], out: str | Path, copy: bool = False) -> int:
    """Link (or copy) every labelled image to `out/<synset>/<name>`; returns the number of images.

    Every image must have a label and every label an image, and every label must be a plain folder name
    (a devkit's class id `../x` would put images outside `out`). The tree is built beside `out` and renamed
    onto it at the end, so a failure leaves nothing behind.
    """
    images, out = Path(images), Path(out)
    for key, wnid in labels.items():
        with about(f"the label of {key}"):
            plain_name(wnid, "class id")
    if not images.is_dir():
        raise PrepareError(f"{images}: no such directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out}: already exists and is not empty")
    files = {image_id(p.name): p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    unlabelled = sorted(set(files) - set(labels))
    missing = sorted(set(labels) - set(files))
    if missing:
        raise PrepareError(f"{images}: {len(missing)} labelled image(s) are not there, e.g. {missing[0]}")
    if unlabelled:
        raise PrepareError(f"{images}: {len(unlabelled)} image(s) have no label, e.g. {files[unlabelled[0]].name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for key, src in sorted(files.items()):
            dst = stage / labels[key] / src.name
            dst.parent.mkdir(exist_ok=True)
            if copy:
                shutil.copyfile(src, dst)
            else:
                os.symlink(src.resolve(), dst)
        stage.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the tree gets what the umask gives, as mkdir would
        if out.exists():
            out.rmdir()
        stage.replace(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return len(files)
