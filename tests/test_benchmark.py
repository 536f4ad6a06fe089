"""scripts/benchmark.py on CPU at a tiny size, and the FLOP count it reports against counted layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from convmixer_pt.cli import benchmark as benchmark_cli
from convmixer_pt.evaluation.benchmark import BenchConfig, build, forward_macs, plan, row_label

ROOT = Path(__file__).resolve().parents[1]


def counted_macs(model: nn.Module, img_size: int) -> int:
    """MACs of every Conv2d and Linear, read off the shapes they produce in a real forward pass."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        per_out = module.in_features if isinstance(module, nn.Linear) else \
            module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name,img_size", [("convmixer_1536_20", 70), ("convmixer_1024_20", 84),
                                           ("convmixer_128_4", 30)])
def test_forward_macs_match_the_layers_of_timms_model(name, img_size):
    timm_model = build("timm", BenchConfig(model=name, mode="infer", batch_size=1, device="cpu"))
    assert forward_macs(name, img_size) == counted_macs(timm_model, img_size)


@pytest.mark.parametrize("name", ["convmixer_768_32", "convmixer_256_8"])
def test_timm_counterpart_has_the_same_parameters(name):
    cfg = BenchConfig(model=name, mode="infer", batch_size=1, device="cpu")
    ours, theirs = build("convmixer_pt", cfg), build("timm", cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert type(ours.blocks[0][2]) is type(theirs.blocks[0][2])  # same activation (ReLU for 768/32)


@pytest.mark.slow
def test_cli_cpu_smoke_run_writes_rows_for_both_implementations(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cpu", "--model", "convmixer_128_4",
           "--img-size", "16", "--batch-size", "2", "--infer-batch-size", "3", "--steps", "1", "--repeats", "2",
           "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["mode"], r["batch_size"]) for r in rows] == [
        ("timm", "train", 2), ("convmixer_pt", "train", 2), ("timm", "infer", 3), ("convmixer_pt", "infer", 3)]
    macs = forward_macs("convmixer_128_4", 16)
    for r in rows:
        assert r["model"] == "convmixer_128_4" and r["device"] == "cpu" and r["amp"] == "none"
        assert r["img_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1e3))
        factor = 3 if r["mode"] == "train" else 1
        assert r["tflops"] == pytest.approx(2 * factor * macs * r["img_per_s"] / 1e12)
        assert r["peak_mem_mib"] is None
    for timm_row, ours in (rows[0:2], rows[2:4]):
        assert timm_row["ratio_to_best_peer"] == 1.0 and timm_row["best_peer"] == "timm NCHW eager"
        assert ours["ratio_to_best_peer"] == pytest.approx(ours["img_per_s"] / timm_row["img_per_s"])
    table = proc.stdout.splitlines()
    assert table[0].split()[:6] == ["model", "mode", "layout", "batch", "impl", "compiled"] and len(table) == 5
    progress = proc.stderr.splitlines()  # per row: what it measures, the warm-up's estimate, the result
    assert progress[0] == "[1/4] timm NCHW eager convmixer_128_4 train: forward + backward + AdamW steps of 2 " \
                          "images at 16x16 on cpu, 1 warm-up + 2 x 1 timed"
    assert progress[1].startswith("  warm-up ") and progress[1].endswith(" s for 2 x 1 timed steps")
    assert progress[2].startswith("  ") and progress[2].endswith(" ms/step)")
    assert progress[9] == "[4/4] convmixer_pt NCHW eager convmixer_128_4 infer: forward passes of 3 images at " \
                          "16x16 on cpu, 1 warm-up + 2 x 1 timed" and len(progress) == 12


def test_sizes_default_to_a_cpu_smoke_run_on_a_cpu_and_help_says_so():
    args = benchmark_cli.parser().parse_args(["--device", "cpu", "--steps", "7"])
    benchmark_cli.fill_sizes(args, torch.device("cpu"))
    assert (args.batch_size, args.infer_batch_size, args.img_size, args.steps, args.repeats, args.warmup) == \
        (4, 8, 32, 7, 2, 1)
    args = benchmark_cli.parser().parse_args([])
    benchmark_cli.fill_sizes(args, torch.device("cuda"))
    assert (args.batch_size, args.infer_batch_size, args.img_size, args.steps, args.repeats, args.warmup) == \
        (64, 256, 224, 10, 5, 3)
    args = benchmark_cli.parser().parse_args(["--device", "cpu", "--loader"])
    benchmark_cli.fill_sizes(args, torch.device("cpu"))  # the loader runs on the CPU: the paper's size anyway
    assert (args.batch_size, args.img_size, args.repeats) == (64, 224, 5)
    usage = " ".join(benchmark_cli.parser().format_help().split())
    assert ("images per training step, the --depthwise-op batch and the --loader batch (default: 64 on CUDA, 4 on "
            "a CPU, 64 with --loader)") in usage
    assert ("input height = width in pixels (default: 224 on CUDA, the published models' size; 32 on a CPU; 224 "
            "with --loader)") in usage


def test_rows_are_timm_in_every_peer_configuration_then_ours():
    cfg = BenchConfig(model="convmixer_128_4", mode="train", batch_size=2, device="cpu", channels_last=True)
    rows = [(impl, c.channels_last, c.compile) for impl, c in plan(cfg, compiled=True, peer_layouts=[False, True])]
    assert rows == [("timm", False, False), ("timm", False, True), ("timm", True, False), ("timm", True, True),
                    ("convmixer_pt", True, False), ("convmixer_pt", True, True)]
    assert [(i, c.channels_last, c.compile) for i, c in plan(cfg)] == [("timm", True, False),
                                                                        ("convmixer_pt", True, False)]


@pytest.mark.slow
def test_cli_compiled_rows_and_ratios_to_the_best_peer(tmp_path):
    """--compile adds timm compiled as a peer and our compiled model beside the eager rows (CPU: inductor
    around the plain modules); every ratio is to the fastest timm row."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cpu", "--model", "convmixer_128_4",
           "--mode", "infer", "--img-size", "16", "--infer-batch-size", "2", "--steps", "1", "--repeats", "1",
           "--warmup", "1", "--compile", "--peer-layouts", "nchw", "channels_last", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["channels_last"], r["compile"]) for r in rows] == [
        ("timm", False, False), ("timm", False, True), ("timm", True, False), ("timm", True, True),
        ("convmixer_pt", False, False), ("convmixer_pt", False, True)]
    best = max((r for r in rows if r["impl"] == "timm"), key=lambda r: r["img_per_s"])
    for r in rows:
        assert r["ratio_to_best_peer"] == pytest.approx(r["img_per_s"] / best["img_per_s"])
        assert r["best_peer"] == row_label(best)
    assert max(r["ratio_to_best_peer"] for r in rows if r["impl"] == "timm") == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: device cuda was asked for, but PyTorch sees no CUDA GPU here"


def test_shard_benchmark_reads_every_order_from_real_shards(tmp_path):
    """The shards it writes are a dataset the trainer reads; each order's rows say how many reads they timed."""
    from convmixer_pt.data import ShardDataset
    from convmixer_pt.evaluation.shard_benchmark import shard_read_times, write_test_shards

    rows = shard_read_times(tmp_path, shards=3, per_shard=10, reads=25, log=lambda line: None)
    assert [r["what"] for r in rows] == ["open a shard (first read)", "read in global shuffle order",
                                         "read in chunked order"]
    assert all(r["ms"] > 0 for r in rows) and rows[1]["reads"] == rows[2]["reads"] == 25
    dataset = ShardDataset(write_test_shards(tmp_path, 3, 10), transform=lambda encoded: encoded.data)
    assert len(dataset) == 30 and dataset[29] == (bytes(range(100)), 0)


def test_shard_benchmark_writes_a_folder_of_its_own_in_the_workdir(tmp_path, capsys):
    """`--shards --workdir W` overwrote W's train.json and train-*.tar: a real shard folder was destroyed."""
    from convmixer_pt.cli import benchmark as benchmark_cli

    mine = {"train.json": b'{"mine": 1}', "train-000000.tar": b"my shard", "train-000001.tar": b"my other shard"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    args = ["--shards", "--num-shards", "2", "--workdir", str(tmp_path), "--device", "cpu"]
    assert benchmark_cli.main(args) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == mine
    (own,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert own.name == "shard-benchmark-2x1000x100" and len(list(own.glob("train-*.tar"))) == 2
    stamp = (own / "train.json").stat().st_mtime_ns
    assert benchmark_cli.main(args) == 0  # its own folder is reused as it is
    assert (own / "train.json").stat().st_mtime_ns == stamp
    capsys.readouterr()


def test_cli_loader_rows_per_pipeline_from_generated_jpegs(tmp_path, monkeypatch, capsys):
    """`--loader` with no folder: generated JPEGs in a temporary folder it removes; one row per pipeline, timm's
    trainer's as "timm"; the trainer's crops are timm's pixels, reduced decoding's not where it decoded less."""
    import tempfile

    from convmixer_pt.cli import benchmark as cli
    from convmixer_pt.train.loader_benchmark import PIPELINES, RECORDED_TRAIN_SPEEDS

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "loader.json"
    assert cli.main(["--loader", "--num-images", "6", "--batch-size", "4", "--repeats", "1", "--img-size", "48",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["pipeline"] for r in rows] == list(PIPELINES) and not any(scratch.iterdir())
    by_name = {r["pipeline"]: r for r in rows}
    assert by_name["timm"]["identical_pixels"] and by_name["ours"]["identical_pixels"]
    assert by_name["timm_float"]["identical_pixels"]
    reduced = by_name["ours_reduced"]  # at 48 pixels every crop of a 375-pixel side has 96 pixels or more
    assert reduced["decoded_at_scale"]["1"] == 0 and sum(reduced["decoded_at_scale"].values()) == 6
    assert not reduced["identical_pixels"] and 25 < reduced["psnr_db_min"] <= reduced["psnr_db_median"] < 80
    # augment_on_device's rows: the device's half replays Pillow, so only reduced decoding changes pixels
    assert by_name["ours_device"]["identical_pixels"] and not by_name["ours_reduced_device"]["identical_pixels"]
    assert [r["pipeline"] for r in rows if r.get("device_ms_per_image_here", 0) > 0] == ["ours_device",
                                                                                          "ours_reduced_device"]
    for r in rows:
        assert r["images"] == 6 and r["img_per_s_per_core"] > 0 and r["identical_pixels"] in (True, False)
        assert r["ratio_to_timm"] == pytest.approx(r["img_per_s_per_core"] / by_name["timm"]["img_per_s_per_core"])
        assert r["paired_ratio_to_timm"] == pytest.approx(by_name["timm"]["passes_s"][0] / r["passes_s"][0])
        for model, speed in RECORDED_TRAIN_SPEEDS.items():
            assert r["cores_per_gpu"][model] == pytest.approx(speed / r["img_per_s_per_core"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["pipeline", "identical", "ms/img", "img/s/core"]
    assert [line.split()[0] for line in table[1:]] == list(PIPELINES)


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{tmp}/absent"], "{tmp}/absent: data folder not found"),
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
])
def test_cli_loader_bad_input_is_one_line(tmp_path, capsys, args, message):
    from convmixer_pt.cli import benchmark as cli

    assert cli.main(["--loader", *(a.format(tmp=tmp_path) for a in args)]) != 0
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message.format(tmp=tmp_path)}"
