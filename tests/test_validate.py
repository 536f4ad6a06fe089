"""Evaluation: counting against known answers, PyTorch / MindSpore / timm agreeing image by image,
torchrun counting each image once, and clear CLI errors."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from helpers import assert_bad_image_named_once, randomize_bn
from images import make_image_folder
from PIL import Image
from timm.models.convmixer import ConvMixer as TimmConvMixer

from convmixer_pt import UserError, create_model
from convmixer_pt.errors import DataError
from convmixer_pt.evaluation.loop import EvalResult, evaluate, merge
from convmixer_pt.evaluation.validation import ValidationError, validate
from convmixer_pt.runtime import init_distributed

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = [sys.executable, str(ROOT / "scripts" / "validate.py")]
NAME, SIZE, CLASSES, IMAGES = "convmixer_128_4", 32, 4, 13  # 13 images: not divisible by 2 ranks
ARCH = dict(dim=128, depth=4, kernel_size=5, patch_size=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    return root, make_image_folder(root, classes=CLASSES, images=IMAGES)


def timm_batch(samples) -> torch.Tensor:
    transform = timm.data.create_transform(SIZE, crop_pct=0.96, interpolation="bicubic")
    return torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in samples])


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    """A random convmixer_128_4 with non-trivial BN statistics, as .pth and converted .ckpt. Its head is set
    on the test images' standardised features, so that predictions vary from image to image."""
    from convmixer_pt.weights.convert import convert

    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = randomize_bn(create_model(NAME, num_classes=CLASSES), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(timm_batch(data[1])), pre_logits=True)
        weight = torch.randn(CLASSES, feats.shape[1]) / feats.std(0)
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-weight @ feats.mean(0))
    pth, ckpt = out / "small.pth", out / "small.ckpt"
    torch.save(model.state_dict(), pth)
    convert(pth, ckpt)
    return model, pth, ckpt


def timm_reference(model: torch.nn.Module, samples) -> list[list[int]]:
    """Top-k class indices per image from timm's own ConvMixer under timm's own eval transform."""
    ref = TimmConvMixer(num_classes=CLASSES, **ARCH).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        return ref(timm_batch(samples)).topk(CLASSES, dim=1).indices.tolist()


def run_validate(ckpt: Path, root: Path, **kw) -> tuple[dict, list[dict]]:
    return validate(NAME, ckpt, root, img_size=SIZE, batch_size=5, workers=0, device="cpu", progress=False, **kw)


def test_counts_top1_top5_on_known_rankings() -> None:
    """A stub predictor ranks the true class of image i at position rank[i] (-1: not among the first 7)."""
    ranks = [0, 0, 1, 4, 5, -1, 0, 2, 6, 3, -1]
    labels = [i % 10 for i in range(len(ranks))]

    def ranking(label: int, rank: int) -> list[int]:
        others = [c for c in range(10) if c != label]
        return others[:rank] + [label] + others[rank:] if rank >= 0 else others[:7]

    orders = [ranking(lab, r) for lab, r in zip(labels, ranks, strict=True)]
    logits = torch.full((len(ranks), 10), -1.0)
    for i, order in enumerate(orders):
        logits[i, order] = 10.0 - torch.arange(len(order), dtype=torch.float32)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return logits[images.long()]  # the "image" is its own index

    idx = torch.arange(len(ranks))
    loader = [(idx[s:s + 3], torch.tensor(labels)[s:s + 3]) for s in range(0, len(ranks), 3)]
    (result,) = evaluate([predict], loader, init_distributed("cpu"), torch.device("cpu"), indices=list(range(11)))
    assert result.count == 11
    assert result.top1_hits == 3 and result.top5_hits == 7
    assert result.top1 == pytest.approx(100 * 3 / 11) and result.top5 == pytest.approx(100 * 7 / 11)
    assert [row[0] for row in result.rows] == list(range(11))
    assert [row[2] for row in result.rows] == [order[:5] for order in orders]
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="sum").item()
    assert result.loss == pytest.approx(expected_loss / 11, rel=1e-6)

    halves = merge([EvalResult(count=2, top1_hits=1, top5_hits=2, loss_sum=0.5, seconds=1.0, rows=[(1, 0, [0])]),
                    EvalResult(count=3, top1_hits=0, top5_hits=3, loss_sum=1.0, seconds=2.0, rows=[(0, 1, [1])])])
    assert (halves.count, halves.top1_hits, halves.top5_hits, halves.seconds) == (5, 1, 5, 2.0)
    assert halves.loss == pytest.approx(0.3)
    assert [row[0] for row in halves.rows] == [0, 1]


@pytest.mark.mindspore
def test_pytorch_mindspore_and_timm_agree_image_by_image(data, checkpoints) -> None:
    root, samples = data
    model, pth, ckpt = checkpoints
    expected = timm_reference(model, samples)
    preds = [k[0] for k in expected]
    assert len(set(preds)) > 1, "the test model must not predict one class for everything"
    labels = [label for _, label in samples]
    top1 = 100 * np.mean([p == lab for p, lab in zip(preds, labels, strict=True)])
    top5 = 100 * np.mean([lab in k[:5] for k, lab in zip(expected, labels, strict=True)])
    for ckpt_path, framework in ((pth, "torch"), (ckpt, "mindspore")):
        report, rows = run_validate(ckpt_path, root, protocol="timm")
        assert report["framework"] == framework
        assert [r["path"] for r in rows] == [str(p.relative_to(root)) for p, _ in samples]
        assert [r["label"] for r in rows] == labels
        assert [r["pred"] for r in rows] == preds, framework
        assert report["count"] == IMAGES
        assert report["top1"] == pytest.approx(top1, abs=1e-3) and report["top5"] == pytest.approx(top5, abs=1e-3)


@pytest.mark.mindspore
def test_mindcv_protocol_gives_the_same_predictions_in_both_frameworks(data, checkpoints) -> None:
    root, _ = data
    _, pth, ckpt = checkpoints
    torch_report, torch_rows = run_validate(pth, root, protocol="mindcv")
    ms_report, ms_rows = run_validate(ckpt, root, protocol="mindcv")
    assert (torch_report["framework"], ms_report["framework"]) == ("torch", "mindspore")
    assert torch_rows == ms_rows
    forced, forced_rows = run_validate(ckpt, root, protocol="mindcv", framework="torch")
    assert forced["framework"] == "torch"
    assert forced_rows == ms_rows


@pytest.mark.mindspore
def test_act_override_builds_the_tanh_gelu_in_both_frameworks(data, checkpoints) -> None:
    """`--act gelu_tanh` runs MindCV's tanh-approximated GELU in MindSpore and the same function in PyTorch."""
    root, _ = data
    _, pth, ckpt = checkpoints
    report, rows = run_validate(pth, root, protocol="mindcv", framework="mindspore", act="gelu_tanh")
    assert (report["framework"], report["act"], report["count"]) == ("mindspore", "gelu_tanh", IMAGES)
    torch_report, torch_rows = run_validate(pth, root, protocol="mindcv", act="gelu_tanh")
    assert (torch_report["framework"], torch_report["act"]) == ("torch", "gelu_tanh") and torch_rows == rows
    assert run_validate(ckpt, root)[0]["act"] == "gelu"
    with pytest.raises(UserError, match=r"^unknown activation 'tanh'; choose one of \['gelu', 'gelu_tanh'"):
        run_validate(pth, root, act="tanh")


def test_recorded_activation_is_validated_and_a_mindspore_layout_file_runs_mindspore(data, checkpoints,
                                                                                      tmp_path) -> None:
    """A file that records gelu_tanh is evaluated with it (no --act needed); MindSpore names ask for MindSpore."""
    from convmixer_pt.weights.convert import convert

    root, _ = data
    _, pth, _ = checkpoints
    convert(pth, tmp_path / "tanh.safetensors", act="gelu_tanh")
    report, rows = run_validate(tmp_path / "tanh.safetensors", root)
    assert (report["framework"], report["act"], report["act_source"]) == ("torch", "gelu_tanh", "file metadata")
    assert rows == run_validate(pth, root, act="gelu_tanh")[1]
    convert(pth, tmp_path / "ms.safetensors", act="gelu_tanh", layout="mindspore")
    forced, forced_rows = run_validate(tmp_path / "ms.safetensors", root, framework="torch")
    assert forced["act"] == "gelu_tanh" and forced_rows == rows


@pytest.mark.mindspore
def test_mindspore_layout_safetensors_runs_mindspore(data, checkpoints, tmp_path) -> None:
    from convmixer_pt.weights.convert import convert

    root, _ = data
    _, pth, ckpt = checkpoints
    convert(pth, tmp_path / "ms.safetensors", layout="mindspore")
    report, rows = run_validate(tmp_path / "ms.safetensors", root)
    assert report["framework"] == "mindspore" and rows == run_validate(ckpt, root)[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.mindspore
@pytest.mark.slow
def test_cli_under_torchrun_counts_each_image_once(data, checkpoints, tmp_path) -> None:
    root, _ = data
    _, pth, _ = checkpoints
    args = ["--model", NAME, "--checkpoint", str(pth), "--data-dir", str(root), "--img-size", str(SIZE),
            "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    one = subprocess.run([*VALIDATE, *args, "--json", str(tmp_path / "one.json"),
                          "--save-predictions", str(tmp_path / "one.csv")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *VALIDATE[1:], *args, "--json", str(tmp_path / "two.json"),
                          "--save-predictions", str(tmp_path / "two.csv")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    one_report, two_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two_report["world_size"] == 2 and one_report["world_size"] == 1
    assert one_report["count"] == two_report["count"] == IMAGES
    assert two_report["top1"] == one_report["top1"] and two_report["top5"] == one_report["top5"]
    for key in ("top1", "top5", "count", "img_per_s", "model", "protocol", "framework", "checkpoint"):
        assert key in one_report
    one_rows, two_rows = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert list(one_rows[0])[:3] == ["path", "label", "pred"]
    assert len({r["path"] for r in two_rows}) == len(two_rows) == IMAGES
    assert two_rows == one_rows


def cli_error(*args: str) -> str:
    proc = subprocess.run([*VALIDATE, *args, "--workers", "0", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.mindspore
def test_cli_wrong_data_dir(checkpoints, tmp_path) -> None:
    _, pth, _ = checkpoints
    msg = cli_error("--model", NAME, "--checkpoint", str(pth), "--data-dir", str(tmp_path / "nope"))
    assert msg == f"error: {tmp_path / 'nope'}: data folder not found"


@pytest.mark.mindspore
def test_cli_checkpoint_model_mismatch(data, checkpoints) -> None:
    root, _ = data
    _, _, ckpt = checkpoints
    msg = cli_error("--model", "convmixer_256_8", "--checkpoint", str(ckpt), "--data-dir", str(root))
    assert msg == (f"error: {ckpt} holds a ConvMixer with dim=128, depth=4, but --model "
                   "convmixer_256_8 has dim=256, depth=8; use --model convmixer_128_4")


@pytest.mark.mindspore
def test_flat_folder_wrong_variant_and_class_count_are_named(data, checkpoints, tmp_path) -> None:
    root, _ = data
    _, pth, _ = checkpoints
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'flat'))}: no images found: it holds no "
                                        "class folders"):
        run_validate(pth, tmp_path / "flat")
    with pytest.raises(ValidationError) as err:
        validate("convmixer_1536_20", pth, root, workers=0, device="cpu", progress=False)
    assert str(err.value) == (f"{pth} holds a ConvMixer with dim=128, depth=4, kernel_size=5, patch_size=2, but "
                              "--model convmixer_1536_20 has dim=1536, depth=20, kernel_size=9, patch_size=7; use "
                              "--model convmixer_128_4")
    make_image_folder(tmp_path / "three", classes=3, images=3)
    with pytest.raises(ValidationError) as err:
        run_validate(pth, tmp_path / "three")
    assert str(err.value) == f"{pth} has a 4-class head but {tmp_path / 'three'} holds 3 class folders"


@pytest.mark.mindspore
@pytest.mark.parametrize("protocol", ["timm", "mindcv"])
def test_cli_corrupt_image_is_named_in_one_line(checkpoints, tmp_path, protocol: str) -> None:
    _, pth, _ = checkpoints
    for c in range(CLASSES):
        (tmp_path / f"class{c}").mkdir()
        Image.new("RGB", (40, 40)).save(tmp_path / f"class{c}" / "ok.png")
    bad = tmp_path / "class1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    msg = cli_error("--model", NAME, "--checkpoint", str(pth), "--data-dir", str(tmp_path), "--protocol", protocol,
                    "--img-size", str(SIZE), "--no-progress")
    assert msg.startswith(f"error: {bad}: cannot read the image (")


@pytest.mark.mindspore
def test_cuda_without_a_gpu_is_a_clear_error(data, checkpoints) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r"^device cuda was asked for, but PyTorch sees no CUDA GPU here$"):
        validate(NAME, checkpoints[1], data[0], device="cuda", img_size=SIZE)


def test_a_recorded_config_with_shared_references_is_quoted_briefly(tmp_path) -> None:
    # A checkpoint whose recorded config holds one list shared ten times at each of nine levels (10^9 leaves in
    # a few hundred bytes of pickle): the error message's repr expanded all of it.
    from helpers import one_error_line, run_bounded

    bomb: list = [1] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    path = tmp_path / "bomb.pth"
    model = create_model(NAME, num_classes=CLASSES)
    torch.save({"state_dict": model.state_dict(), "config": {"mean": bomb}}, path)
    make_image_folder(tmp_path / "val", classes=CLASSES, images=4)
    proc = run_bounded("convmixer_pt.cli.validate", "--model", NAME, "--checkpoint", path, "--data-dir",
                       tmp_path / "val", "--workers", "0", "--device", "cpu", memory_mb=4096, timeout=90)
    line = one_error_line(proc)
    assert line.startswith(f"error: {path} (its training config): its evaluation settings are not numbers (")
    assert len(line) < 400, line[:1000]


def test_an_image_size_beyond_the_bound_is_refused_before_work(tmp_path) -> None:
    from types import SimpleNamespace

    from convmixer_pt.evaluation.validation import preprocessing

    weights = SimpleNamespace(meta={}, path=tmp_path / "w.pth")
    assert preprocessing(weights, img_size=8192).img_size == 8192
    with pytest.raises(UserError, match=r"^image size 1000000 is above the largest this package takes, 8,192 pixels$"):
        preprocessing(weights, img_size=1_000_000)


# A signal to the whole process group (a scheduler's SIGTERM, `timeout`'s, a terminal's Ctrl-C) as validate.py's
# `k`-th batch is taken from its loader workers, or (k = 0) as its first worker starts. One process imports
# validate.py's modules (and those its first run imports) once and forks each case: the child starts a session
# of its own (as start_new_session=True did), writes its stderr to a file of its own and exits through the
# interpreter's usual shutdown (`sys.exit` leaves the loop in the child only); the parent prints each status.
SIGNAL_AT_BATCH = """
import json, os, subprocess, sys
import multiprocessing.process as mp
import PIL.Image, timm.data, torch._dynamo, torchvision, triton  # what a first run imports, here once
from torch.utils.data import dataloader
from convmixer_pt.cli.validate import main
PIL.Image.init()
cases, argv = json.loads(sys.argv[1]), sys.argv[2:]
for name, k, err in cases:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        for fd, path in ((1, os.devnull), (2, err)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        def send():  # from another process, as a scheduler's would come (PyTorch's workers tell them apart)
            subprocess.Popen(["kill", "-s", name, "--", f"-{os.getpgrp()}"]).wait()
        real, count = dataloader._MultiProcessingDataLoaderIter._next_data, [0]
        def next_data(self):
            count[0] += 1
            if count[0] == k:
                send()
            return real(self)
        dataloader._MultiProcessingDataLoaderIter._next_data = next_data
        real_start = mp.BaseProcess.start
        def start(self):
            real_start(self)
            if k == 0:
                send()
        mp.BaseProcess.start = start
        sys.exit(main(argv))
    print(json.dumps([name, k, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]), flush=True)
"""
SIGNALS = [("TERM", 143, "terminated"), ("INT", 130, "interrupted")]


@pytest.fixture(scope="module")
def signal_runs() -> dict[tuple[str, int], tuple[int, str]]:
    """(signal, k) -> (exit status, stderr) of every case, filled by the first test that needs them (in its own
    temp folder, checked when it ends)."""
    return {}


@pytest.mark.parametrize(("name", "status", "line"), SIGNALS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_signal_with_loader_workers_is_one_line(data, checkpoints, signal_runs, tmp_path, k, name, status,
                                                   line) -> None:
    if not signal_runs:
        root, _ = data
        _, pth, _ = checkpoints
        args = ["--model", NAME, "--checkpoint", str(pth), "--data-dir", str(root), "--img-size", str(SIZE),
                "--batch-size", "2", "--workers", "2", "--device", "cpu", "--no-progress"]
        cases = [(n, case_k, str(tmp_path / f"{n}-{case_k}.err")) for n, _, _ in SIGNALS for case_k in (0, 1, 2)]
        proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_BATCH, json.dumps(cases), *args],
                              capture_output=True, text=True, timeout=300, start_new_session=True)
        # Nothing printed by the imports (before the forks, they printed into every case's stderr).
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
        for n, case_k, rc in map(json.loads, proc.stdout.splitlines()):
            signal_runs[n, case_k] = rc, Path(tmp_path / f"{n}-{case_k}.err").read_text()
    rc, err = signal_runs[name, k]
    assert rc == status, err
    assert err == f"error: {line}\n"


@pytest.mark.slow
def test_under_torchrun_a_bad_image_on_one_process_is_one_error_line(checkpoints, tmp_path) -> None:
    """The process that meets the image names it; the other one, whose gather finds its peer gone, says that in
    one line instead of gloo's traceback."""
    _, pth, _ = checkpoints
    make_image_folder(tmp_path / "val", classes=CLASSES, images=8)
    bad = sorted((tmp_path / "val").rglob("*.*"))[1]
    bad.write_bytes(bad.read_bytes()[:40])
    args = ["--model", NAME, "--checkpoint", str(pth), "--data-dir", str(tmp_path / "val"), "--img-size",
            str(SIZE), "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *VALIDATE[1:], *args], capture_output=True, text=True, timeout=300)
    assert_bad_image_named_once(proc, bad, "error: terminated")
