"""How long a conversion takes, and where the time goes: the converter against a plain MindSpore script.

Every figure is a fresh process (what a user waits for), repeated, the median and the minimum reported:
importing torch and MindSpore alone, the whole `convmixer-convert` command each way, the conversion work after
`import torch` measured inside the converter's process, a plain script (torch.load, rename,
`mindspore.save_checkpoint`), and MindSpore's own `load_checkpoint` of the converter's `.ckpt`. Run it under
`taskset -c 0` for the one-core figures; the child processes inherit the affinity.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import google.protobuf
import torch

from ..factory import create_model
from ..files import cannot_write, umask
from ..weights import keymap

# Timed inside a fresh process: what follows `import torch`, split into the package's import and convert().
_WORK = """
import json, sys, time
import torch
start = time.perf_counter()
from convmixer_pt.weights.convert import convert
imported = time.perf_counter()
convert(sys.argv[1], sys.argv[2], overwrite=True)
done = time.perf_counter()
print(json.dumps({"import": imported - start, "convert": done - imported}))
"""

# What a user would write without this package: torch.load, MindCV's names, mindspore.save_checkpoint.
_PLAIN = """
import sys
import mindspore as ms
import torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
bn = {k.rpartition(".")[0] for k in state if k.endswith("running_mean")}
renamed = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
items = []
for key, value in state.items():
    module, _, name = key.rpartition(".")
    if name == "num_batches_tracked":
        continue
    items.append({"name": f"network.{module}.{renamed[name] if module in bn else name}",
                  "data": ms.Tensor(value.numpy())})
ms.save_checkpoint(items, sys.argv[2], crc_check=True)
"""

_MS_LOAD = """
import json, sys, time
import mindspore as ms
start = time.perf_counter()
ms.load_checkpoint(sys.argv[1], crc_check=sys.argv[2] == "crc")
print(json.dumps({"load": time.perf_counter() - start}))
"""


def _wall(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {run.stderr.strip()[-2000:]}")
    return seconds, run.stdout


def _row(what: str, times: list[float]) -> dict[str, Any]:
    return dict(what=what, median_s=round(statistics.median(times), 3), min_s=round(min(times), 3),
                runs=[round(t, 3) for t in times])


def official_file(model: str, path: Path, seed: int = 0) -> Path:
    """A locuslab-layout `.pth.tar` of `model` with random weights: the size and layout of the published files."""
    torch.manual_seed(seed)
    torch.save(keymap.convert_state(create_model(model, fast=False).state_dict(), "official"), path)
    return path


def conversion_times(workdir: Path, model: str = "convmixer_1536_20", repeats: int = 3,
                     log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows (what, median and minimum seconds, every run) for a conversion of `model`'s official file. The files
    go to a fresh folder of their own in `workdir` (`convert-benchmark-XXXXXXXX`, left for inspection): no
    file of the user's is replaced."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="convert-benchmark-", dir=workdir))
        folder.chmod(0o777 & ~umask())  # mkdtemp makes 0700
    except OSError as e:
        raise cannot_write(workdir, e) from None
    if log:
        log(f"files in {folder}")
    return _conversion_times(folder, model, repeats, log)


def _conversion_times(workdir: Path, model: str, repeats: int, log: Callable[[str], None] | None
                      ) -> list[dict[str, Any]]:
    py = sys.executable
    src = official_file(model, workdir / f"{model}.pth.tar")
    ckpt, pth, plain = workdir / f"{model}.ckpt", workdir / f"{model}.pth", workdir / f"{model}_plain.ckpt"
    has_ms = find_spec("mindspore") is not None
    steps: list[tuple[str, Callable[[], float]]] = [
        ("python -c 'import torch'", lambda: _wall([py, "-c", "import torch"])[0]),
        (f"convmixer-convert {src.name} {ckpt.name} (whole command)",
         lambda: _wall([py, "-m", "convmixer_pt.cli.convert", str(src), str(ckpt), "--force"])[0]),
        (f"convmixer-convert {ckpt.name} {pth.name} (whole command)",
         lambda: _wall([py, "-m", "convmixer_pt.cli.convert", str(ckpt), str(pth), "--force"])[0]),
    ]
    inside: dict[str, list[dict[str, float]]] = {"to .ckpt": [], "to .pth": []}
    for direction, (a, b) in (("to .ckpt", (src, ckpt)), ("to .pth", (ckpt, pth))):
        steps.append((f"after import torch, {direction}: package import + convert()",
                      lambda d=direction, a=a, b=b: _work(py, a, b, inside[d])))
    if has_ms:
        steps += [
            ("python -c 'import mindspore'", lambda: _wall([py, "-c", "import mindspore"])[0]),
            ("plain script: torch.load, rename, mindspore.save_checkpoint (whole command)",
             lambda: _wall([py, "-c", _PLAIN, str(src), str(plain)])[0]),
            (f"mindspore.load_checkpoint({ckpt.name}) after import", lambda: _ms_load(py, ckpt, False)),
            (f"mindspore.load_checkpoint({ckpt.name}, crc_check=True) after import", lambda: _ms_load(py, ckpt, True)),
        ]
    rows = []
    for what, step in steps:
        times = []
        for _ in range(repeats):
            times.append(step())
        rows.append(_row(what, times))
        if log:
            log(f"{rows[-1]['median_s']:8.3f} s median  {rows[-1]['min_s']:8.3f} s min  {what}")
    for direction, parts in inside.items():
        for part in ("import", "convert"):
            rows.append(_row(f"after import torch, {direction}: {part} alone", [p[part] for p in parts]))
    return rows


def _work(py: str, src: Path, dst: Path, parts: list[dict[str, float]]) -> float:
    _, out = _wall([py, "-c", _WORK, str(src), str(dst)])
    parts.append(json.loads(out.strip().splitlines()[-1]))
    return parts[-1]["import"] + parts[-1]["convert"]


def _ms_load(py: str, path: Path, crc: bool) -> float:
    _, out = _wall([py, "-c", _MS_LOAD, str(path), "crc" if crc else "plain"])
    return json.loads(out.strip().splitlines()[-1])["load"]


def environment() -> dict[str, Any]:
    """The versions and machine a conversion timing depends on."""
    versions = dict(python=platform.python_version(), torch=torch.__version__, protobuf=google.protobuf.__version__,
                    machine=platform.processor() or platform.machine(), cpus=len(os.sched_getaffinity(0)))
    if find_spec("mindspore") is not None:
        versions["mindspore"] = version("mindspore")
    return versions
