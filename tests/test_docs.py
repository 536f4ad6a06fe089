"""Every command in the README and in docs/ is true as written.

The fenced shell blocks are read and split into commands. Each command of this project, and each install and
test command, is either run here (`RUN`, in the README's order, in one scratch folder) or listed in `CHECKED`
with the reason it cannot run here (a GPU, ImageNet, a cluster, the published weights' full size). Every one is
checked: its script exists, its flags parse with the command's own parser (torchrun's too), a training config
resolves, an install names an extra that exists. A new command in the docs fails
`test_every_documented_command_is_run_or_listed` until it is given a place in one of the two lists.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convmixer_pt import create_model
from convmixer_pt.train import config
from convmixer_pt.weights import keymap

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.M | re.S)
SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")
OURS = ("python", "python3", "torchrun", "pip", "pytest", "ruff", "bash")
HAS = {name: importlib.util.find_spec(name) is not None for name in ("mindspore", "onnx", "onnxruntime")}

# Run in this order in one folder, with the published files' names given to tiny stand-ins of the same layout
# (the converter reads every shape from the tensors). The training commands run one epoch (`--epochs 1`
# appended: a flag overrides the config); the rest run exactly as written. Value: what the command needs.
RUN: dict[str, str | None] = {
    "python scripts/train.py --config configs/digits.yaml": None,
    "torchrun --standalone --nproc_per_node 2 scripts/train.py --config configs/digits.yaml --output runs/digits-ddp":
        None,
    "python scripts/validate.py --checkpoint runs/digits/best.pth --data-dir ~/.cache/convmixer_pt/digits/val": None,
    "convmixer-export-onnx runs/digits/best.pth digits.onnx --verify": "onnx",
    "convmixer-convert convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.ckpt": None,
    "convmixer-convert convmixer_1536_20.ckpt convmixer_1536_20.safetensors --verify": "mindspore",
    "convmixer-convert convmixer_768_32.ckpt convmixer_768_32.pth --layout official": None,
    "convmixer-convert convmixer_1536_20.pth.tar convmixer_1536_20_ms.safetensors --layout mindspore": None,
    "convmixer-convert mindcv_convmixer_train.ckpt convmixer.safetensors --act gelu_tanh --ema --verify": "mindspore",
    "convmixer-parity convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.ckpt": "mindspore",
    "convmixer-export-mindir convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.mindir --verify": "mindspore",
    "convmixer-make-shards --src ~/.cache/convmixer_pt/digits --out runs/digits-shards --shard-size 100": None,
    "python scripts/benchmark.py --device cpu --model convmixer_128_4": None,
}
TRAINING = ("scripts/train.py",)

IMAGENET = "needs ImageNet"
GPU = "needs CUDA GPUs"
CLUSTER = "needs a cluster (several nodes, SLURM)"
LOADER = "a timing run of the input pipeline (tests/test_benchmark.py runs --loader small)"
MINDCV = ("needs a checkout of MindCV 0.3.0 (its scripts are not in its wheel) and a dataset; tests/test_mindcv.py "
          "makes the same calls through MindCV's library")
CHECKED: dict[str, str] = {
    "python3 -m venv .venv": "the install: .ci/run runs it in a fresh virtualenv",
    "pip install -e .[dev]": "the install: .ci/run runs it in a fresh virtualenv",
    "pytest -q -n 2 --dist loadfile": "this suite: .ci/run runs it",
    "pytest -q": "this suite",
    'pytest -q -m not slow': "this suite",
    "ruff check .": "the linter: .ci/run runs it",
    "pip install .[mindspore]": "an install; tests/test_packaging.py installs a built wheel with an extra",
    "pip install .[onnx]": "an install; tests/test_packaging.py installs a built wheel with an extra",
    "python -m build": "tests/test_packaging.py builds the wheel",
    "pip install dist/convmixer_pt-0.1.0-py3-none-any.whl[mindspore]":
        "tests/test_packaging.py installs the built wheel with an extra",
    "CONVMIXER_TIMM_TESTS=/path/to/pytorch-image-models/tests/test_models.py pytest -q tests/test_timm_suite.py":
        "needs a checkout of timm's repository",
    "convmixer-export-onnx convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.onnx --verify":
        "the published weights' full size; tests/test_export_onnx.py exports the full variants",
    "python scripts/train.py --config configs/digits.yaml --dataset shards --data-dir runs/digits-shards "
    "--output runs/digits-from-shards": "a second digits run; tests/test_train_inputs.py trains from shards",
    "convmixer-make-shards --src /data/imagenet --out /data/imagenet-shards --shard-size 1000": IMAGENET,
    "OUT=/path/to/results bash scripts/gpu_check.sh": GPU,
    **{f"python tools/convert_ckpt.py {src} {dst}": "the ImageNet reproduction's published files (the same "
       "conversion runs above on a stand-in)" for src, dst in (
           ("convmixer_1536_20_ks9_p7.pth.tar", "convmixer_1536_20.ckpt"),
           ("convmixer_768_32_ks7_p7_relu.pth.tar", "convmixer_768_32.ckpt"),
           ("convmixer_1024_20_ks9_p14.pth.tar", "convmixer_1024_20.ckpt"))},
    "taskset -c 0 python -c import torch, time; t = time.perf_counter(); import mindspore; "
    "print(time.perf_counter() - t)": "a timing of MindSpore's import",
    "taskset -c 0 python scripts/benchmark.py --convert --model convmixer_1536_20 --repeats 5 --workdir /tmp/cb "
    "--json convert.json": "a timing run on full-size (207 MB) files; tests/test_convert_benchmark.py runs it small",
    "python scripts/benchmark.py --device cpu --model convmixer_128_4 --img-size 32 --batch-size 8 "
    "--infer-batch-size 8 --steps 2 --repeats 3 --warmup 1 --json cpu_smoke.json":
        "the CPU smoke run above with its sizes given (a recorded measurement)",
    "python scripts/benchmark.py --model convmixer_1536_20 convmixer_768_32 convmixer_1024_20 --json bench.json": GPU,
    "python scripts/benchmark.py --model convmixer_768_32 --channels-last": GPU,
    "taskset -c 1 python scripts/benchmark.py --shards --workdir /tmp/shardbench2 --json shards.json":
        "a timing run over 160 shards",
    "python scripts/benchmark.py --loader --json loader.json": LOADER,
    "python scripts/benchmark.py --loader --img-size 128 --json loader128.json": LOADER,
    "python scripts/benchmark.py --loader --data-dir /path/to/imagenet/train --num-images 512": LOADER + " on ImageNet",
    "convmixer-convert convmixer_768_32_ks7_p7_relu.pth.tar convmixer_768_32.ckpt":
        "the published weights' full size (the same conversion runs above on a stand-in)",
    **{command: MINDCV for command in (
        "convmixer-mindcv train.py --config $CFG --data_dir /path/to/dataset --distribute False",
        "convmixer-mindcv train.py --config /path/to/convmixer_pt/configs/mindcv/convmixer_768_32.yaml --data_dir "
        "/path/to/dataset --distribute False",
        "convmixer-mindcv validate.py -c $CFG --data_dir /path/to/imagenet --ckpt_path convmixer_768_32.ckpt",
        "convmixer-mindcv validate.py -c /path/to/convmixer_pt/configs/mindcv/convmixer_768_32.yaml --data_dir "
        "/path/to/imagenet --ckpt_path convmixer_768_32.ckpt")},
}


def documented() -> list[tuple[str, str]]:
    """(page, command) for every command of ours, installs and tests included, in the fenced shell blocks."""
    found = []
    for page in DOCS:
        for lang, body in FENCE.findall(page.read_text()):
            if lang not in ("bash", "sh", "shell"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                tokens = [t for t in shlex.split(line, comments=True) if t != "&"]
                while tokens:
                    cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                    command, tokens = tokens[:cut], tokens[cut + 1:]
                    head = program(command)[0] if command else ""
                    if head in OURS or head.startswith("convmixer-"):
                        found.append((page.relative_to(REPO).as_posix(), " ".join(command)))
    return found


def program(tokens: list[str]) -> list[str]:
    """The command without environment assignments and launchers (`srun`, `taskset -c N`)."""
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        tokens = tokens[1:]
    if tokens[:1] == ["srun"]:
        tokens = tokens[1:]
    if tokens[:2] == ["taskset", "-c"]:
        tokens = tokens[3:]
    return tokens or [""]


def reason(command: str) -> str | None:
    """Why a command of ours cannot run here, from what it needs; None if nothing in it says."""
    if "/data/imagenet" in command or "imagenet/val" in command or "ILSVRC" in command:
        return IMAGENET
    if "--nnodes" in command:
        return CLUSTER
    if "--device cuda" in command or "--nproc_per_node 8" in command or "--depthwise-op" in command \
            or "--channels-last-kernels" in command or "--compile" in command:
        return GPU
    return None


def console_scripts() -> dict[str, str]:
    lines = SETUP["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def cli_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The convmixer_pt.cli module a command runs and its arguments; None for an install or test tool."""
    head = tokens[0]
    if head.startswith("convmixer-"):
        assert head in console_scripts(), f"{head}: no such console command"
        return console_scripts()[head].split(":")[0], tokens[1:]
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(tokens[1:])
        return cli_of(["python", args.training_script, *args.training_script_args])
    if head == "bash":
        assert (REPO / tokens[1]).is_file(), f"{tokens[1]}: no such script"
        return None
    if head in ("python", "python3") and tokens[1].endswith(".py"):
        script = REPO / tokens[1]
        assert script.is_file(), f"{tokens[1]}: no such script"
        return re.search(r"from (convmixer_pt\.cli\.\w+) import", script.read_text()).group(1), tokens[2:]
    if head in ("python", "python3") and tokens[1] == "-m" and tokens[2].startswith("convmixer_pt.cli."):
        return tokens[2], tokens[3:]
    return None


def all_commands() -> list[str]:
    return sorted({command for _, command in documented()})


def test_the_docs_have_commands_and_the_readme_is_a_front_page():
    pages = {page for page, _ in documented()}
    assert {"README.md", "docs/converter.md", "docs/training.md", "docs/validation.md"} <= pages
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_every_documented_command_is_run_or_listed():
    """A command not in RUN, not in CHECKED and with no recognisable reason has not been given a place."""
    unplaced = [c for c in all_commands() if c not in RUN and c not in CHECKED and reason(c) is None]
    assert not unplaced, "\n".join(unplaced)
    stale = [c for c in (*RUN, *CHECKED) if c not in all_commands()]
    assert not stale, "listed, but no longer in the docs:\n" + "\n".join(stale)


@pytest.mark.parametrize("command", all_commands())
def test_documented_command_parses(command, monkeypatch):
    """Scripts exist, flags exist and parse (the command's own parser, torchrun's for its part), training configs
    resolve with the flags given, and installs name extras that exist."""
    tokens = program(shlex.split(command))
    if tokens[0] == "pip":
        extras = SETUP["options.extras_require"]
        for target in tokens[2:]:
            named = re.search(r"\[(\w+)\]$", target)
            assert named is None or named.group(1) in extras, f"{target}: no such extra"
        return
    if tokens[0] == "pytest":
        if "-n" in tokens:  # pytest-xdist: the dev extra must bring it
            assert "pytest-xdist" in SETUP["options.extras_require"]["dev"]
        for path in tokens[1:]:
            assert not path.startswith("tests/") or (REPO / path).is_file(), path
        return
    target = cli_of(tokens)
    if target is None:
        return
    module, argv = target
    cli = importlib.import_module(module)
    monkeypatch.chdir(REPO)
    try:
        args = cli.parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{command}: the command line does not parse (exit {e.code})")
    if module.endswith(".train"):
        config.resolve(args.config, config.overrides_from_args(args))


@pytest.mark.parametrize("language", ["python"])
def test_python_blocks_parse_and_import_what_exists(language):
    for page in DOCS:
        for lang, body in FENCE.findall(page.read_text()):
            if lang != language:
                continue
            tree = ast.parse(body)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module.startswith("convmixer_pt"):
                    module = importlib.import_module(node.module)
                    assert all(hasattr(module, alias.name) for alias in node.names), (page, node.module)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("convmixer_pt"):
                            importlib.import_module(alias.name)


def standins(folder: Path) -> None:
    """Tiny checkpoints under the published files' names, in the layouts those files have."""
    torch.manual_seed(0)
    tiny = dict(num_classes=10, dim=16, depth=2, kernel_size=3, patch_size=4)
    official = keymap.convert_state(create_model("convmixer_1536_20", **tiny).state_dict(), "official")
    torch.save(official, folder / "convmixer_1536_20_ks9_p7.pth.tar")
    torch.save(official, folder / "convmixer_1536_20.pth.tar")
    from convmixer_pt.cli import convert

    assert convert.main([str(folder / "convmixer_1536_20.pth.tar"), str(folder / "convmixer_768_32.ckpt")]) == 0
    if HAS["mindspore"]:
        sys.path.insert(0, str(REPO / "tests"))
        import ms_training

        ms_training.train_checkpoint(folder / "mindcv_convmixer_train.ckpt", ema=True)


@pytest.mark.slow
def test_runnable_commands_run_as_written(tmp_path, capfd):
    """The README's commands in its order (the main job, the same job on two processes, validation, export),
    then the converter's, parity's, MindIR's and the shards' examples, in a scratch folder with its own home."""
    if shutil.which("convmixer-convert", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the console commands are not installed (pip install -e .)")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    for name in ("scripts", "configs", "tools"):
        (work / name).symlink_to(REPO / name)
    standins(work)
    capfd.readouterr()
    env = dict(os.environ, HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get(
        "PYTHONPATH", "")]), PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
)
    ran = []
    for command, needs in RUN.items():
        if needs is not None and not HAS[needs]:
            continue
        line = command + (" --epochs 1" if any(s in command for s in TRAINING) else "")
        proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr and "suggested max number of worker" not in proc.stderr, \
            (line, proc.stderr[-3000:])
        ran.append(command)
    assert (work / "runs" / "digits" / "best.pth").is_file() and (work / "runs" / "digits-ddp" / "best.pth").is_file()
    assert len(ran) >= sum(1 for needs in RUN.values() if needs is None)


def test_ci_installs_and_tests_as_the_quick_start_says():
    """.ci/run is the Quick start on a clean checkout: the same install line and the same test command."""
    quick = next(body for lang, body in FENCE.findall((REPO / "README.md").read_text()) if lang == "bash")
    install, train, test = quick.strip().splitlines()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci and train == "python scripts/train.py --config configs/digits.yaml"


def test_every_named_command_script_and_flag_exists():
    """Prose and tables too: each `convmixer-*` named is a console command, each scripts/ or tools/ file exists,
    each `--flag` is a flag of one of the commands (or of torchrun, pytest or pip, which the docs also show)."""
    from torch.distributed.run import get_args_parser

    parsers = [importlib.import_module(target.split(":")[0]).parser() for target in console_scripts().values()]
    flags = {flag for p in [*parsers, get_args_parser()] for flag in p._option_string_actions}
    flags |= {"--dist", "--durations", "--no-deps", "--target", "--python", "--no-index", "--system-site-packages",
              "--signal", "--requeue", "--open-mode", "--nodes", "--gpus-per-node", "--cpus-per-task", "--time",
              "--ntasks-per-node", "--no-isolation", "--wheel", "--outdir"}
    # MindCV's own scripts' flags (its config.py, not in MindCV's wheel) and msrun's, which docs/mindspore.md shows
    flags |= {"--data_dir", "--distribute", "--distributed", "--ckpt_path", "--amp_level", "--loss_scale_type",
              "--dataset_sink_mode", "--worker_num", "--local_worker_num", "--batch_size", "--epoch_size",
              "--image_resize", "--num_classes", "--num_samples"}
    text = "\n".join(page.read_text() for page in DOCS)
    for name in set(re.findall(r"(?<![.\w])convmixer-[a-z-]+[a-z]", text)):  # not the .convmixer-generated marker
        assert name in console_scripts(), name
    for path in set(re.findall(r"\b(?:scripts|tools)/[\w.]+\.(?:py|sh)\b", text)):
        assert (REPO / path).is_file(), path
    unknown = sorted({flag for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text) if flag not in flags})
    assert not unknown, unknown
