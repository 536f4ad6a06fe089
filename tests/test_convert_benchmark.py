"""The conversion benchmark on a tiny model: every row is timed, and what it converts is the converter's
output (the plain MindSpore script writes the same bytes as the converter)."""

from __future__ import annotations

import importlib.util

import pytest

from convmixer_pt.evaluation.convert_benchmark import conversion_times


@pytest.mark.slow
def test_conversion_benchmark_times_every_step(tmp_path):
    """In a fresh folder of its own inside the workdir: it overwrote the user's same-named files there."""
    mine = tmp_path / "convmixer_128_4.ckpt"
    mine.write_bytes(b"my converted weights")
    rows = conversion_times(tmp_path, "convmixer_128_4", repeats=1)
    (folder,) = tmp_path.glob("convert-benchmark-*")
    assert mine.read_bytes() == b"my converted weights" and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted([mine.name, folder.name])
    names = [r["what"] for r in rows]
    assert "python -c 'import torch'" in names
    assert "convmixer-convert convmixer_128_4.pth.tar convmixer_128_4.ckpt (whole command)" in names
    assert "after import torch, to .pth: convert alone" in names
    assert all(r["min_s"] > 0 and len(r["runs"]) == 1 for r in rows)
    if importlib.util.find_spec("mindspore") is not None:
        assert "plain script: torch.load, rename, mindspore.save_checkpoint (whole command)" in names
        ours, plain = (folder / f"convmixer_128_4{s}.ckpt" for s in ("", "_plain"))
        assert ours.read_bytes() == plain.read_bytes()
