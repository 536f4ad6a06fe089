"""ConvMixer in MindCV's own tools: the environment MindSpore trains in, the registration in MindCV's registry
(through MindCV's `create_model` and loader), training and evaluation through MindCV's library as its
`train.py` / `validate.py` call it, the converter on what MindCV's training saves, and the launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytestmark = pytest.mark.mindspore
ms = pytest.importorskip("mindspore")
mindcv = pytest.importorskip("mindcv")

from mindcv.data import create_dataset, create_loader, create_transforms  # noqa: E402
from mindcv.loss import create_loss  # noqa: E402
from mindcv.models import create_model as mindcv_create_model  # noqa: E402
from mindcv.models import list_models  # noqa: E402
from mindcv.optim import create_optimizer  # noqa: E402
from mindcv.scheduler import create_scheduler  # noqa: E402
from mindcv.utils import StateMonitor, create_trainer, get_metrics  # noqa: E402
from test_convert_mindspore import rel_diff  # noqa: E402

import convmixer_pt.mindcv as registration  # noqa: E402
from convmixer_pt import create_model  # noqa: E402
from convmixer_pt.cli import mindcv as launcher  # noqa: E402
from convmixer_pt.data import write_digits_imagefolder  # noqa: E402
from convmixer_pt.evaluation.validation import validate  # noqa: E402
from convmixer_pt.mindspore.model import MSConvMixer  # noqa: E402
from convmixer_pt.variants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from convmixer_pt.weights import keymap, ms_files, ms_io  # noqa: E402
from convmixer_pt.weights.convert import convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mindcv"
TOL = 1e-5
# The registered 1024/20's kernel and patch at a width and depth that run MindCV's training and evaluation in
# seconds; the full-size model's names, shapes and strict loading are tested on their own above.
SMALL = dict(dim=32, depth=2)
NUMPY_PROBE = ("numpy.core.multiarray failed to import", "compiled using NumPy 1.x", "pyboost")


# ---- the environment -------------------------------------------------------------------------------------------

def test_mindspore_runs_pynative_operators_and_a_training_step(capfd):
    """What MindSpore under NumPy 2 cannot do (its NumPy-1 C-API probe fails): an operator on a Tensor made
    from a Python scalar, and a training step with MindCV's loss-scale cell, optimizer and metrics."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert float((ms.Tensor([0.5], ms.float32) + ms.Tensor(1.0, ms.float32)).asnumpy()[0]) == 1.5
    assert bool((ms.Tensor([1.0]) < 2.0).asnumpy()[0])  # the comparison whose probe failed in MindCV's callback
    net = MSConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3)
    loss = create_loss(name="CE", label_smoothing=0.1)
    opt = create_optimizer(net, opt="adamw", lr=0.01, weight_decay=2e-5, eps=1e-3, weight_decay_filter="norm_and_bias")
    trainer = create_trainer(net, loss, opt, get_metrics(3), amp_level="O0", amp_cast_list=None,
                             loss_scale_type="fixed", loss_scale=1024.0, drop_overflow_update=False, clip_grad=True,
                             clip_value=1.0)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1, 2, 0], np.int32))
    before = net.network[0].weight.asnumpy().copy()
    trainer._train_network(x, y)
    assert not np.array_equal(before, net.network[0].weight.asnumpy())  # the step updated the weights
    err = capfd.readouterr().err
    assert not any(probe in err for probe in NUMPY_PROBE), err


# ---- the registration --------------------------------------------------------------------------------------------

def test_the_three_names_are_in_mindcvs_registry():
    assert {"convmixer_768_32", "convmixer_1024_20", "convmixer_1536_20"} <= set(list_models("convmixer*"))
    cfg = mindcv.models.registry.get_pretrained_cfg("convmixer_768_32")
    assert cfg["url"].endswith("/Converted/convmixer_768_32.ckpt") and cfg["classifier"] == "network.37"
    assert cfg["crop_pct"] == 0.96 and cfg["input_size"] == (3, 224, 224)
    assert mindcv.models.registry.is_model_pretrained("convmixer_1536_20")


@pytest.mark.parametrize("name", registration.MINDCV_NAMES)
def test_create_model_names_and_shapes_are_what_the_converter_writes(name):
    net = mindcv_create_model(name, num_classes=1000, in_channels=3, drop_rate=None, drop_path_rate=None,
                              pretrained=False)
    with torch.device("meta"):
        torch_model = create_model(name, fast=False)
    expected = keymap.convert_state(torch_model.state_dict(), "mindspore", src="timm")  # what convert writes
    got = {n: tuple(p.shape) for n, p in net.parameters_and_names()}
    assert got == {k: tuple(v.shape) for k, v in expected.items()}
    assert net.act == torch_model.act  # ReLU for 768/32, exact GELU for the others: the published weights'


def test_arguments_mindcv_passes_and_refusals():
    net = mindcv_create_model("convmixer_1024_20", num_classes=7, in_channels=1, drop_rate=0.0, drop_path_rate=0.0,
                              dim=16, depth=2, act="gelu_tanh")
    assert (net.num_classes, net.in_chans, net.dim, net.depth, net.act) == (7, 1, 16, 2, "gelu_tanh")
    for kwargs, message in [(dict(drop_rate=0.1), "drop_rate=0.1 asked for, but ConvMixer has no dropout"),
                            (dict(drop_path_rate=0.2), "drop_path_rate=0.2 asked for"),
                            (dict(features_only=True), "unknown argument 'features_only'"),
                            (dict(act="swish"), "unknown activation 'swish'"),
                            (dict(pretrained=True, dim=16), "pretrained weights fit the published shapes")]:
        with pytest.raises(ValueError, match=message):
            mindcv_create_model("convmixer_1024_20", **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A full-size 1024/20 (10 classes, random weights and BatchNorm statistics) in PyTorch, and the `.ckpt`
    that `convmixer-convert` makes of it."""
    tmp = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    model = create_model("convmixer_1024_20", num_classes=10, fast=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(2, 0.3)  # activations beyond |x| = 1, where the two GELUs part most
                module.bias.normal_(0, 0.5)
    torch.save(model.state_dict(), tmp / "model.pth")
    convert(tmp / "model.pth", tmp / "convmixer_1024_20-0_0.ckpt")
    return tmp, model.eval()


def test_create_model_loads_a_converted_ckpt_strictly_with_pytorchs_logits(converted):
    tmp, model = converted
    path = tmp / "convmixer_1024_20-0_0.ckpt"
    file_params = ms.load_checkpoint(str(path))
    fresh = mindcv_create_model("convmixer_1024_20", num_classes=10)
    not_loaded, unused = ms.load_param_into_net(fresh, file_params, strict_load=True)
    assert not_loaded == [] and unused == []  # every parameter has a tensor of the file, every tensor a parameter
    net = mindcv_create_model("convmixer_1024_20", num_classes=10, checkpoint_path=str(path))
    assert {n: p.asnumpy().tobytes() for n, p in net.parameters_and_names()} == \
        {n: ms_files.raw_bytes(t) for n, t in ms_files.read_ckpt(path).items()}
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    net.set_train(False)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
        tanh_reference = create_model("convmixer_1024_20", num_classes=10, act="gelu_tanh", fast=False,
                                      checkpoint_path=tmp / "model.pth").eval()(torch.from_numpy(x)).numpy()
    assert rel_diff(reference, net(ms.Tensor(x)).asnumpy()) < TOL
    tanh = mindcv_create_model("convmixer_1024_20", num_classes=10, act="gelu_tanh", checkpoint_path=str(path))
    tanh.set_train(False)
    tanh_out = tanh(ms.Tensor(x)).asnumpy()
    assert rel_diff(tanh_reference, tanh_out) < TOL
    # the test tells the two functions apart: each framework's tanh GELU is far closer to the other's than to erf
    assert rel_diff(reference, tanh_out) > 10 * rel_diff(tanh_reference, tanh_out)


# ---- MindCV's training and evaluation, as its scripts call them ------------------------------------------------

def config(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return cfg


def mindcv_train(cfg: dict) -> None:
    """MindCV 0.3.0's `train.py` main(), standalone, with its config's keys (its dataset, transforms, loader,
    model, loss, scheduler, optimizer, trainer and checkpointing callback)."""
    ms.set_context(mode=cfg["mode"])
    dataset = create_dataset(name=cfg["dataset"], root=cfg["data_dir"], split=cfg["train_split"],
                             shuffle=cfg["shuffle"], num_samples=cfg.get("num_samples"),
                             num_parallel_workers=cfg["num_parallel_workers"])
    transform = create_transforms(
        dataset_name=cfg["dataset"], is_training=True, image_resize=cfg["image_resize"], scale=cfg["scale"],
        ratio=cfg["ratio"], hflip=cfg["hflip"], vflip=cfg["vflip"], color_jitter=cfg["color_jitter"],
        interpolation=cfg["interpolation"], auto_augment=cfg["auto_augment"], re_prob=cfg["re_prob"],
        re_value=cfg["re_value"])
    loader = create_loader(dataset=dataset, batch_size=cfg["batch_size"], drop_remainder=cfg["drop_remainder"],
                           is_training=True, mixup=cfg["mixup"], cutmix=cfg["cutmix"], cutmix_prob=cfg["cutmix_prob"],
                           num_classes=cfg["num_classes"], transform=transform,
                           num_parallel_workers=cfg["num_parallel_workers"])
    steps = loader.get_dataset_size()
    network = mindcv_create_model(model_name=cfg["model"], num_classes=cfg["num_classes"],
                                  in_channels=cfg["in_channels"], drop_rate=cfg["drop_rate"],
                                  drop_path_rate=cfg["drop_path_rate"], pretrained=cfg["pretrained"],
                                  checkpoint_path=cfg["ckpt_path"], ema=cfg["ema"], **SMALL)
    loss = create_loss(name=cfg["loss"], label_smoothing=cfg["label_smoothing"])
    schedule = create_scheduler(steps, scheduler=cfg["scheduler"], lr=cfg["lr"], min_lr=cfg["min_lr"],
                                warmup_epochs=cfg["warmup_epochs"], decay_epochs=cfg["decay_epochs"],
                                num_epochs=cfg["epoch_size"], lr_epoch_stair=cfg["lr_epoch_stair"])
    optimizer = create_optimizer(network, opt=cfg["opt"], lr=schedule, weight_decay=cfg["weight_decay"],
                                 weight_decay_filter=cfg["weight_decay_filter"], eps=cfg["eps"],
                                 loss_scale=1.0)
    trainer = create_trainer(network, loss, optimizer, get_metrics(cfg["num_classes"]), amp_level=cfg["amp_level"],
                             amp_cast_list=None,
                             loss_scale_type=cfg["loss_scale_type"], loss_scale=cfg["loss_scale"],
                             drop_overflow_update=cfg["drop_overflow_update"], ema=cfg["ema"],
                             ema_decay=cfg["ema_decay"], clip_grad=cfg["clip_grad"], clip_value=cfg["clip_value"])
    monitor = StateMonitor(trainer, model_name=cfg["model"], model_ema=cfg["ema"], last_epoch=0,
                           dataset_sink_mode=cfg["dataset_sink_mode"], ckpt_save_dir=cfg["ckpt_save_dir"],
                           ckpt_save_interval=1, ckpt_save_policy="latest_k", ckpt_keep_max=2,
                           summary_dir=f"{cfg['ckpt_save_dir']}/summary", log_interval=100)
    trainer.train(cfg["epoch_size"], loader, callbacks=[monitor], dataset_sink_mode=cfg["dataset_sink_mode"])
    ms.train.serialization._wait_async_thread_save_ckpt()  # MindCV saves with async_save=True


@pytest.fixture(scope="module")
def mindcv_run(tmp_path_factory):
    """Three steps of the registered 1024/20 (10 classes, exact GELU; narrow and shallow) trained by MindCV's
    library with the config's recipe, on a slice of the digits ImageFolder at 32 pixels, with MindCV's EMA on."""
    tmp = tmp_path_factory.mktemp("mindcv_run")
    digits = write_digits_imagefolder(tmp / "digits")
    cfg = config("convmixer_1024_20", data_dir=str(digits), num_classes=10, image_resize=32, batch_size=16,
                 num_samples=48, epoch_size=1, decay_epochs=1, mode=1, amp_level="O0", loss_scale_type="fixed",
                 dataset_sink_mode=False, num_parallel_workers=1, ema=True, ema_decay=0.9,
                 ckpt_save_dir=str(tmp / "ckpt"))
    mindcv_train(cfg)
    return tmp, digits, tmp / "ckpt" / "convmixer_1024_20-1_3.ckpt"


@pytest.mark.slow
def test_mindcv_training_saves_what_the_converter_turns_into_pytorch(mindcv_run, tmp_path, capfd):
    from test_convert import run_cli

    _, _, saved = mindcv_run
    entries = ms_files.read_ckpt(saved)
    # MindCV's AdamW slots and scalars, its step counter and its EMA copy beside the weights
    assert any(n.startswith("adam_m.network.") for n in entries) and {"beta1_power", "global_step"} <= set(entries)
    assert any(n.startswith("ema.network.") for n in entries)
    # The file cannot say which GELU it was trained with; asked, the user's statement governs both sides.
    rc, out, err = run_cli(capfd, saved, tmp_path / "w.pth")
    assert rc == 1 and "pass --act gelu_tanh" in err and not (tmp_path / "w.pth").exists()
    for extra in ([], ["--ema"]):
        out_path = tmp_path / f"w{len(extra)}.safetensors"
        rc, out, err = run_cli(capfd, saved, out_path, "--act", "gelu", "--verify", *extra)
        assert rc == 0, err
        assert "input (mindspore, gelu) vs output (torch, gelu)" in out
        assert "optimizer" in err and ("non-EMA weights" in err if extra else "EMA" in err)
    rc, out, err = run_cli(capfd, saved, tmp_path / "tanh.pth", "--act", "gelu_tanh", "--verify")
    assert rc == 0 and "input (mindspore, gelu_tanh) vs output (torch, gelu_tanh)" in out
    # The PyTorch model of the converted file computes what MindCV's trained network computes.
    net = mindcv_create_model("convmixer_1024_20", num_classes=10, checkpoint_path=str(saved), **SMALL)
    net.set_train(False)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = create_model("convmixer_1024_20", num_classes=10, checkpoint_path=tmp_path / "w0.safetensors",
                         **SMALL).eval()
    with torch.no_grad():
        assert rel_diff(net(ms.Tensor(x)).asnumpy(), model(torch.from_numpy(x)).numpy()) < TOL


@pytest.mark.slow
def test_mindcv_evaluation_equals_ours_image_by_image(mindcv_run, tmp_path):
    """MindCV's `validate.py` pipeline (its dataset, eval transforms at crop 0.96 bilinear, loader, the
    registered model loaded through create_model) against `convmixer-validate --framework mindspore --protocol
    mindcv`, prediction by prediction, on weights whose predictions vary from image to image."""
    _, digits, _ = mindcv_run
    torch.manual_seed(3)
    model = create_model("convmixer_1024_20", num_classes=10, fast=False, **SMALL).eval()
    images = sorted((digits / "val").rglob("*.png"))[::9]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((64, 64)), np.float32))
                     .permute(2, 0, 1) / 255 for f in images])
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():  # a head on the standardised features, whose predictions vary from image to image
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        model.head.weight.copy_(torch.randn(10, SMALL["dim"]) / (features.std(0) + 1e-6))
        model.head.bias.copy_(-(model.head.weight @ features.mean(0)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    ckpt = tmp_path / "convmixer_1024_20-0_0.ckpt"
    convert(tmp_path / "model.pth", ckpt)
    cfg = config("convmixer_1024_20", image_resize=64)
    dataset = create_dataset(name="imagenet", root=str(digits), split="val", shuffle=False, num_parallel_workers=1)
    transform = create_transforms(dataset_name="imagenet", is_training=False, image_resize=cfg["image_resize"],
                                  crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])
    loader = create_loader(dataset=dataset, batch_size=40, drop_remainder=False, is_training=False,
                           transform=transform, num_parallel_workers=1)
    net = mindcv_create_model(cfg["model"], num_classes=10, checkpoint_path=str(ckpt), **SMALL)
    net.set_train(False)
    theirs = []
    for images, labels in loader.create_tuple_iterator(num_epochs=1):
        theirs += list(zip(labels.asnumpy().tolist(), net(images).asnumpy().argmax(1).tolist(), strict=True))
    report, rows = validate(None, ckpt, digits / "val", protocol="mindcv", framework="mindspore",
                            workers=0, img_size=64, crop_pct=0.96, progress=False)
    ours = [(row["label"], row["pred"]) for row in rows]
    assert len(ours) == len(theirs) == 360
    assert ours == theirs  # both in sorted folder order: the same image, label and prediction per row
    assert len({pred for _, pred in theirs}) > 1  # predictions that vary: the comparison means something
    top1 = 100.0 * sum(label == pred for label, pred in theirs) / len(theirs)
    assert report["top1"] == pytest.approx(top1, abs=1e-4)


@pytest.mark.parametrize("opt, accumulation", [("adamw", 1), ("adamw", 2), ("adan", 1), ("lion", 1), ("nadam", 1),
                                               ("momentum", 1), ("sgd", 1), ("rmsprop", 1), ("adagrad", 1),
                                               ("lamb", 1)])
def test_every_mindcv_optimizers_state_is_known_to_the_converter(opt, accumulation, tmp_path):
    """What `save_checkpoint` of MindCV's train step holds for each of MindCV's optimizers, and with gradient
    accumulation (which saves the weights as `optimizer.network.*`): every entry is a weight or training state the
    converter recognises, and the weights taken are the network's, under its names."""
    net = MSConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3)
    optimizer = create_optimizer(net, opt=opt, lr=0.01, weight_decay=1e-4)
    trainer = create_trainer(net, create_loss(name="CE"), optimizer, get_metrics(3), amp_level="O0",
                             amp_cast_list=None, loss_scale_type="fixed", loss_scale=1.0, drop_overflow_update=False,
                             ema=True, gradient_accumulation_steps=accumulation)
    ms.save_checkpoint(trainer._train_network, str(tmp_path / "train.ckpt"))  # as MindCV's StateMonitor saves
    names = list(ms_files.read_ckpt(tmp_path / "train.ckpt"))
    assert any(not n.startswith(("network.", "ema.")) for n in names)
    assert {n: ms_io.kind_of(n) for n in names if ms_io.kind_of(n) is None} == {}
    split = ms_io.split_training_state(ms_files.read_ckpt(tmp_path / "train.ckpt"))
    with torch.device("meta"):
        shapes = create_model("convmixer_128_4", dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, fast=False)
    assert sorted(split.network) == sorted(keymap.convert_state(shapes.state_dict(), "mindspore", src="timm"))


# ---- the launcher ------------------------------------------------------------------------------------------------

SCRIPT = """\
import sys
import helper_module  # beside the script: its folder is first on sys.path, as under `python SCRIPT`
from mindcv.models import create_model
net = create_model(sys.argv[1], num_classes=int(sys.argv[2]), dim=8, depth=1)
print(__name__, sys.argv[1:], type(net).__name__, net.num_classes, helper_module.VALUE)
sys.exit(int(sys.argv[3]))
"""


def run_launcher(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convmixer_pt.cli.mindcv", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
def test_launcher_runs_a_script_as_python_would(tmp_path, capsys):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "make.py").write_text(SCRIPT)
    (tmp_path / "scripts" / "helper_module.py").write_text("VALUE = 'beside'\n")
    done = run_launcher(str(tmp_path / "scripts" / "make.py"), "convmixer_768_32", "5", "3", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[-1] == "__main__ ['convmixer_768_32', '5', '3'] MSConvMixer 5 beside"
    # everything after SCRIPT is the script's, options included, as under `python SCRIPT`
    passed = run_launcher(str(tmp_path / "scripts" / "make.py"), "convmixer_768_32", "5", "0", "--x", cwd=tmp_path)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.splitlines()[-1] == "__main__ ['convmixer_768_32', '5', '0', '--x'] MSConvMixer 5 beside"
    (tmp_path / "bad.py").write_text("from mindcv.models import create_model\n"
                                     "create_model('convmixer_1536_20', drop_rate=0.5)\n")
    # A script's refusal, in this process (the two runs above launched a fresh one): its one line, exit 1.
    assert launcher.main([str(tmp_path / "bad.py")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: convmixer_1536_20: drop_rate=0.5 asked for, "
                                                                "but ConvMixer has no dropout or stochastic depth "
                                                                "(use 0)")


def test_launcher_runs_a_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "launched_module.py").write_text("import sys\nfrom mindcv.models import is_model\n"
                                                "print(__name__, sys.argv[1:], is_model('convmixer_1024_20'))\n")
    monkeypatch.chdir(tmp_path)
    assert launcher.main(["-m", "launched_module", "--flag", "x"]) == 0
    assert capsys.readouterr().out == "__main__ ['--flag', 'x'] True\n"
    assert sys.argv[0] != "launched_module"  # restored


def test_launcher_errors_are_one_line(tmp_path, capsys):
    assert launcher.main([str(tmp_path / "missing.py")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.py'}: no such script\n"
    assert launcher.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path}: not a file\n"
    for argv in ([], ["--nope", "train.py"], ["-m"]):
        with pytest.raises(SystemExit) as exit_:
            launcher.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("stub, message", [
    ("raise ImportError('no MindCV here')", "needs MindCV, which is not installed here"),
    ("__version__ = '0.2.2'", "needs MindCV 0.3.0 or newer, found 0.2.2"),
])
def test_launcher_without_a_usable_mindcv(tmp_path, stub, message):
    (tmp_path / "stub" / "mindcv").mkdir(parents=True)
    (tmp_path / "stub" / "mindcv" / "__init__.py").write_text(stub + "\n")
    (tmp_path / "s.py").write_text("print('ran')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), *sys.path]))
    done = run_launcher(str(tmp_path / "s.py"), env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
