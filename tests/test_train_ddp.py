"""Two processes under torchrun (gloo) train the same weights as one process with the same global batch.

BatchNorm normalises with the statistics of the batch each process sees, and SyncBatchNorm has no CPU
kernel, so the single process is run with 2 gradient-accumulation steps of the per-process batch: the
sampler hands process r exactly chunk r of every global batch, which is what the single process sees at
accumulation step r. The forward passes then see identical batches, and the parameters may differ only by
the order of floating-point sums (DDP's all-reduce vs. accumulation). BatchNorm running statistics are not
compared: the single process updates them twice per step, the two processes once each and average them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from images import make_train_val
from trainutil import NO_AUG, ROOT, TINY, torchrun

from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.inputs import build_datasets, build_loaders
from convmixer_pt.train.loop import evaluate_models
from convmixer_pt.train.loop import run as run_training
from convmixer_pt.train.parts import build_model


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path: Path) -> None:
    data = make_train_val(tmp_path / "data", train_per_class=12)
    values = dict(TINY, **NO_AUG, data_dir=str(data), epochs=2, stop_epoch=1, device="cpu")
    proc = torchrun(dict(values, output=str(tmp_path / "ddp"), batch_size=4, grad_accum=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config.apply(config.TrainConfig(), dict(values, output=str(tmp_path / "one"), batch_size=4,
                                                  grad_accum=2))
    run_training(cfg, init_distributed("cpu"))
    ddp = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    assert ddp["step"] == one["step"] == 36 // 8
    init = build_model(cfg, 3).state_dict()
    params = dict(build_model(cfg, 3).named_parameters())
    for name in params:
        assert not torch.allclose(one["model"][name], init[name]), f"{name} did not train"
        torch.testing.assert_close(ddp["model"][name], one["model"][name], rtol=1e-5, atol=1e-6, msg=name)


EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from convmixer_pt.runtime import barrier, init_distributed, shutdown
    from convmixer_pt.train import config
    from convmixer_pt.train.inputs import build_datasets, build_loaders
    from convmixer_pt.train.loop import evaluate_models
    from convmixer_pt.train.parts import build_model
    cfg = config.apply(config.TrainConfig(), json.loads(sys.argv[1]))
    env = init_distributed("cpu")
    train, val, n = build_datasets(cfg, env)
    torch.manual_seed(0)
    model = build_model(cfg, n)
    _, val_loader, _ = build_loaders(cfg, train, val, env)
    (result,) = evaluate_models([model], val_loader, env, "none")
    if env.is_main:
        with open(sys.argv[2], "w") as f:
            json.dump(dict(count=result.count, top1=result.top1, top5=result.top5, loss=result.loss), f)
    barrier(env)  # as scripts/train.py ends: gloo aborts a process that exits while its peer still talks to it
    shutdown(env)
""")


@pytest.mark.slow
def test_distributed_evaluation_counts_every_image_once(tmp_path: Path) -> None:
    # 4 classes x 5 images = 20; batch 3 gives each process uneven, partial batches (10 = 3 + 3 + 3 + 1).
    data = make_train_val(tmp_path / "data", classes=4, val_per_class=5, train_per_class=2)
    values = dict(TINY, data_dir=str(data), batch_size=3, device="cpu")
    script = tmp_path / "eval_dist.py"
    script.write_text(EVAL_SCRIPT)
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(values), str(out)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_metrics = json.loads(out.read_text())
    cfg = config.apply(config.TrainConfig(), values)
    env = init_distributed("cpu")
    train, val, n = build_datasets(cfg, env)
    _, val_loader, _ = build_loaders(cfg, train, val, env)
    torch.manual_seed(0)
    (one,) = evaluate_models([build_model(cfg, n)], val_loader, env, "none")
    assert dist_metrics["count"] == one.count == 20
    assert dist_metrics["top1"] == one.top1 and dist_metrics["top5"] == one.top5
    assert abs(dist_metrics["loss"] - one.loss) < 1e-5


def test_several_models_are_evaluated_in_one_pass_over_the_loader(tmp_path: Path) -> None:
    """The model and its EMA share one pass over the validation loader (each image decoded once), with the
    same metrics as evaluating each on its own."""
    data = make_train_val(tmp_path / "data", classes=4, val_per_class=5, train_per_class=2)
    cfg = config.apply(config.TrainConfig(), dict(TINY, data_dir=str(data), batch_size=3, device="cpu"))
    env = init_distributed("cpu")
    train, val, n = build_datasets(cfg, env)
    _, val_loader, _ = build_loaders(cfg, train, val, env)
    torch.manual_seed(0)
    models = [build_model(cfg, n), build_model(cfg, n)]
    passes = []

    class Counting:
        def __iter__(self):
            passes.append(1)
            return iter(val_loader)

    together = evaluate_models(models, Counting(), env, "none")
    assert len(passes) == 1
    alone = [evaluate_models([model], val_loader, env, "none")[0] for model in models]
    assert together == alone and together[0] != together[1]
