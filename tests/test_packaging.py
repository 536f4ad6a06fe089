"""What an install gives: MindSpore as an extra (the dev extra brings it where a wheel exists), protobuf as what
reads `.ckpt`, a console command per CLI, and the repository's scripts as thin wrappers of the same `main`s.
A plain (non-editable) install is built and run here."""

from __future__ import annotations

import ast
import configparser
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.markers import Marker
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CONFIG = configparser.ConfigParser()
CONFIG.read(REPO / "setup.cfg")


def requirements(text: str) -> list[Requirement]:
    return [Requirement(line) for line in text.strip().splitlines() if line.strip() and not line.startswith("#")]


def console_scripts() -> dict[str, str]:
    lines = CONFIG["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def test_mindspore_is_an_extra_and_protobuf_a_requirement():
    required = {r.name: r for r in requirements(CONFIG["options"]["install_requires"])}
    assert "mindspore" not in required and "protobuf" in required
    extras = {name: {r.name: r for r in requirements(CONFIG["options.extras_require"][name])}
              for name in ("mindspore", "dev")}
    assert extras["mindspore"]["mindspore"].marker is None
    marker = extras["dev"]["mindspore"].marker
    assert isinstance(marker, Marker)
    # MindSpore 2.10 publishes wheels for Python 3.10 to 3.12: the dev extra brings it there and only there.
    assert [marker.evaluate({"python_version": v}) for v in ("3.10", "3.11", "3.12", "3.13", "3.14")] == \
        [True, True, True, False, False]


def test_every_cli_has_a_console_command_and_the_scripts_wrap_the_same_mains():
    cli = sorted(p.stem for p in (REPO / "src" / "convmixer_pt" / "cli").glob("*.py")
                 if p.stem not in ("__init__", "common"))
    scripts = console_scripts()
    assert sorted(target.split(":")[0].rsplit(".", 1)[1] for target in scripts.values()) == cli
    for name, target in scripts.items():
        module, function = target.split(":")
        assert name == "convmixer-" + module.rsplit(".", 1)[1].replace("_", "-")
        assert callable(getattr(importlib.import_module(module), function))
    wrappers = [*sorted((REPO / "scripts").glob("*.py")), *sorted((REPO / "tools").glob("*.py"))]
    wrapped = {re.search(r"from (convmixer_pt\.cli\.\w+) import (main|command)", p.read_text()).group(1)
               for p in wrappers}
    assert wrapped == {target.split(":")[0] for target in scripts.values()}  # every command has a wrapper
    for path in wrappers:  # thin: a docstring, the imports, the call
        body = [type(node).__name__ for node in ast.parse(path.read_text()).body]
        assert body in (["Expr", "Import", "ImportFrom", "If"], ["Expr", "ImportFrom", "If"]), path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes from the tracked files (built once for this file's tests)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the build package (the dev extra)")
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                            str(source / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (source / "dist").glob("convmixer_pt-*-py3-none-any.whl")
    return path


@pytest.mark.slow
def test_plain_install_gives_working_console_commands(wheel, tmp_path):
    """The built wheel installed (no dependencies: they are this environment's) into a target directory, and a
    conversion with the installed `convmixer-convert` alone on the path."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    bin_dir = tmp_path / "site" / "bin"
    assert sorted(p.name for p in bin_dir.iterdir()) == sorted(console_scripts())
    code = "import convmixer_pt; print(convmixer_pt.__file__)"
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "site"))  # the installed copy, not the source tree
    from convmixer_pt import create_model
    from convmixer_pt.weights import keymap

    torch.save(keymap.convert_state(create_model("convmixer_128_4", num_classes=3, depth=1).state_dict(), "official"),
               tmp_path / "in.pth.tar")
    for args in (["in.pth.tar", "w.ckpt"], ["w.ckpt", "w.pth"]):
        run = subprocess.run([str(bin_dir / "convmixer-convert"), *(str(tmp_path / a) for a in args)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.startswith(f"wrote {tmp_path / args[1]}: "), run.stderr
    usage = subprocess.run([str(bin_dir / "convmixer-train"), "--help"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: convmixer-train")


@pytest.mark.slow
def test_the_built_wheel_installs_with_an_extra_in_a_fresh_virtualenv(wheel, tmp_path):
    """The documented install from a wheel: `python -m build`, then `pip install "dist/convmixer_pt-...whl[EXTRA]"`
    into a new virtualenv. Its dependencies are this environment's (a .pth file puts its site-packages on the new
    one's path, and pip may not use an index), so pip must find the extra's requirements among them: the extra
    exists in the wheel's metadata with the requirements setup.cfg gives it."""
    extra = next((name for name, module in (("mindspore", "mindspore"), ("onnx", "onnxruntime"))
                  if importlib.util.find_spec(module) is not None), None)
    if extra is None:
        pytest.skip("needs MindSpore or onnxruntime installed (the dev extra)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "outer.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python),
                              "install", "--no-index", f"{wheel}[{extra}]"], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    assert f"does not provide the extra '{extra}'" not in install.stderr
    show = subprocess.run([str(python), "-c", "import importlib.metadata as m, convmixer_pt; d = m.distribution("
                           "'convmixer_pt'); print(convmixer_pt.__file__); print(*d.requires, sep='\\n')"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert show.returncode == 0, show.stderr[-3000:]
    where, *requires = show.stdout.splitlines()
    assert where.startswith(site)  # the wheel's copy, in the new virtualenv
    wanted = {str(r.name) for r in requirements(CONFIG["options.extras_require"][extra])}
    assert wanted <= {Requirement(line).name for line in requires
                      if Requirement(line).marker is not None and Requirement(line).marker.evaluate({"extra": extra})}
    usage = subprocess.run([str(venv / "bin" / "convmixer-parity"), "--help"], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert usage.returncode == 0 and usage.stdout.startswith("usage: convmixer-parity")
