"""The training loop: the official recipe under DDP/AMP, evaluation after every epoch, and checkpoints that
resume exactly (`state`), at epoch ends and, where asked or signalled, within epochs (`interrupts`)."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..data import derive_seed
from ..errors import ReportedElsewhere, Stopped, UserError
from ..evaluation.loop import EvalResult, evaluate
from ..runtime import (
    DistEnv,
    all_gather_objects,
    all_reduce_sum,
    autocast,
    average_bn_stats,
    barrier,
    peer_loss_as_error,
    resolve_amp,
)
from ..weights.torch_io import save_torch
from .config import ConfigError, TrainConfig, check, save_yaml
from .inputs import DeviceInputs, build_datasets, build_loaders
from .interrupts import Interrupts
from .parts import Parts, build_parts
from .report import TensorBoard, epoch_line, plot_summary, run_line, write_summary
from .rundir import RUN_FILES, claimed, run_files, start_over
from .schedule import lr_at_step, set_lr
from .state import (
    Progress,
    best_checkpoint,
    check_place,
    load_training_checkpoint,
    place,
    process_state,
    recorded_place,
    resume_path,
    seed_globals,
    training_checkpoint,
)


class TrainingDiverged(UserError):
    """The loss stopped being finite (a learning rate too high, bad data); the run stops before the update."""


@dataclass
class Session:
    """What every step of a run needs besides its data: config, processes, AMP, the run's objects, when to
    checkpoint and stop, where scalars go."""

    cfg: TrainConfig
    env: DistEnv
    amp: str
    parts: Parts
    interrupts: Interrupts
    inputs: DeviceInputs
    board: TensorBoard | None = None


def train_one_epoch(run: Session, loader: Iterable, steps: int, epoch: int, progress: Progress) -> dict[str, float]:
    """The epoch's optimizer steps from `progress.batch` on (0 unless resumed within it); the learning rate is
    set before every step. Writes last.pth within the epoch where `run.interrupts` says so, and raises Stopped
    after doing so for a stop signal."""
    cfg, env, parts = run.cfg, run.env, run.parts
    parts.forward.train()
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    batches = iter(loader)
    first, lr = progress.batch, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not (env.is_main and cfg.progress), file=sys.stderr)
    for step in range(first, steps):
        run.interrupts.check()
        lr = lr_at_step(epoch, step, steps, cfg.epochs, cfg.lr)
        set_lr(parts.optimizer, lr)
        parts.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros(1, device=env.device)
        for micro in range(cfg.grad_accum):
            images, targets, erasing = next(batches)
            images = run.inputs(images, erasing)
            targets = targets.to(env.device, non_blocking=True)
            if parts.mixup is not None:
                images, targets = parts.mixup(images, targets)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            inner = parts.ddp is not None and micro < cfg.grad_accum - 1
            with parts.ddp.no_sync() if inner else contextlib.nullcontext():
                with autocast(env.device, amp=run.amp):
                    loss = parts.loss_fn(parts.forward(images), targets)
                parts.scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
        # One reduction carries the loss and every process's votes, so all of them stop before a bad update,
        # and all checkpoint or stop at the same step.
        totals = all_reduce_sum(torch.cat([step_loss, run.interrupts.votes(progress.step + 1, env.device)]),
                                env).tolist()
        mean_loss, checkpoint_due, stop = totals[0] / env.world_size, totals[1] > 0, totals[2:]
        if not math.isfinite(mean_loss):
            bar.close()
            raise TrainingDiverged(f"the training loss became {mean_loss} at epoch {epoch + 1}, step {step + 1} of "
                                   f"{steps}; stopped before updating the weights")
        if cfg.clip_grad is not None:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad)
        scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        progress.step += 1
        progress.batch, progress.epoch_loss = step + 1, progress.epoch_loss + mean_loss
        # fp16: the scaler skips a step with inf/NaN gradients (and lowers its scale); the EMA skips it too.
        stepped = scale is None or parts.scaler.get_scale() >= scale
        if parts.ema is not None and stepped:
            parts.ema.update(parts.model, step=progress.step)
        if run.board is not None and progress.step % cfg.log_every == 0:
            run.board.step(progress.step, mean_loss, lr)
        rate = (step + 1 - first) * global_batch / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{progress.epoch_loss / (step + 1):.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}",
                        refresh=False)
        bar.update()
        if any(stop):
            run.interrupts.stopping = signal.SIGUSR1 if stop[1] > 0 else signal.SIGTERM
        if (checkpoint_due or any(stop)) and progress.batch < steps:  # an epoch's end does both in `run`
            save_last(run, progress)
            if any(stop):
                bar.close()
                raise stopped(run, progress, steps)
    bar.close()
    elapsed = time.perf_counter() - start
    return dict(train_loss=progress.epoch_loss / steps, lr=lr, img_per_s=(steps - first) * global_batch / elapsed)


def save_last(run: Session, progress: Progress) -> None:
    """last.pth as things stand (within an epoch: with the place in it), written by the first process."""
    processes = all_gather_objects(process_state(run.parts, run.env.device), run.env)
    if run.env.is_main:
        save_torch(training_checkpoint(run.parts, progress, run.cfg, processes), Path(run.cfg.output) / "last.pth")
    run.interrupts.saved()


def stopped(run: Session, progress: Progress, steps: int) -> Exception:
    """Every process stops alike; the first one says so."""
    if not run.env.is_main:
        return ReportedElsewhere(128 + run.interrupts.stopping)
    name = signal.Signals(run.interrupts.stopping).name
    return Stopped(f"{name} at {place(progress.epoch, progress.batch, steps)}; {Path(run.cfg.output) / 'last.pth'} "
                   f"holds it: continue with --resume auto", 128 + run.interrupts.stopping)


def evaluate_models(models: list[nn.Module], loader: Iterable, env: DistEnv, amp: str,
                    channels_last: bool = False) -> list[EvalResult]:
    """The model (and its EMA) over the whole validation set, in one pass, each image counted once."""
    for model in models:
        model.eval()

    def predictor(model: nn.Module):
        def predict(images: torch.Tensor) -> torch.Tensor:
            with autocast(env.device, amp):
                return model(images)
        return predict

    return evaluate([predictor(m) for m in models], loader, env, env.device, channels_last=channels_last)


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


def run_epoch(run: Session, loaders: tuple[Iterable, Iterable], steps: int, epoch: int,
              progress: Progress) -> dict[str, float]:
    """Train (the rest of) one epoch, average BatchNorm statistics across processes, evaluate; the epoch's
    summary row."""
    cfg, env, parts = run.cfg, run.env, run.parts
    start = time.perf_counter()
    train = train_one_epoch(run, loaders[0], steps, epoch, progress)
    if cfg.bn_average:
        average_bn_stats(parts.model, env)
        if parts.ema is not None:
            average_bn_stats(parts.ema.module, env)
    models = [parts.model] if parts.ema is None else [parts.model, parts.ema.module]
    val, *ema = evaluate_models(models, loaders[1], env, run.amp, cfg.channels_last)
    row = dict(epoch=epoch + 1, train_loss=train["train_loss"], val_loss=val.loss, val_top1=val.top1,
               val_top5=val.top5, lr=train["lr"], img_per_s=train["img_per_s"])
    if ema:
        row.update(ema_val_loss=ema[0].loss, ema_val_top1=ema[0].top1, ema_val_top5=ema[0].top5)
    row["epoch_time"] = time.perf_counter() - start
    return row


def record_epoch(row: dict[str, float], run: Session, progress: Progress) -> None:
    """Advance `progress` by the epoch of `row` and write last.pth, then best.pth (if it improved), then the
    summary. last.pth is the record: a kill between these writes leaves best.pth or the summary one epoch
    behind it, and `restore_outputs` brings them in line on resume (last.pth holds the weights best.pth
    lacks, since an epoch that improved is last.pth's own)."""
    out = Path(run.cfg.output)
    score = row.get("ema_val_top1", row["val_top1"])  # the EMA's score where there is an EMA
    progress.epoch, progress.batch, progress.epoch_loss = int(row["epoch"]), 0, 0.0
    progress.history.append(row)
    improved = score > progress.best_score
    if improved:
        progress.best_score, progress.best_epoch = score, progress.epoch
    save_last(run, progress)
    if run.env.is_main:
        if improved:
            save_torch(best_checkpoint(run.parts, progress, run.cfg), out / "best.pth")
        write_summary(progress.history, out / "summary.csv")
        plot_summary(progress.history, out / "summary.png")
        if run.board is not None:
            run.board.epoch(row, progress.step)


def prepare_output(cfg: TrainConfig, resuming: bool, env: DistEnv) -> None:
    """Refuse to start a new run over an existing one unless asked to (`overwrite`, which removes the old run's
    own files, and nothing else), then record the config. The folder is the run's (`rundir.claimed`)."""
    out = Path(cfg.output)
    existing = run_files(out)
    if existing and not resuming:
        if not cfg.overwrite:
            names = [p.name for p in existing if p.name in RUN_FILES]
            names += ["TensorBoard events"] if len(names) < len(existing) else []
            raise ConfigError(f"{out} already holds a run ({', '.join(names)}): continue it with --resume auto, "
                              "or start it over with --overwrite")
        if env.is_main:
            start_over(out)
    if env.is_main:
        save_yaml(cfg, out / "args.yaml")
    barrier(env)


def restore_outputs(parts: Parts, progress: Progress, cfg: TrainConfig) -> None:
    """After resuming at an epoch's end: best.pth and the summary as last.pth records them (see
    `record_epoch`). A last.pth from within an epoch follows an epoch end whose writes had completed."""
    out = Path(cfg.output)
    best = out / "best.pth"
    at_epoch_end = progress.batch == 0 and progress.epoch > 0
    if at_epoch_end and progress.best_epoch == progress.epoch and recorded_place(best) != (progress.epoch, 0):
        save_torch(best_checkpoint(parts, progress, cfg), best)  # the resumed weights are the best ones
    if progress.history:
        write_summary(progress.history, out / "summary.csv")
        plot_summary(progress.history, out / "summary.png")


@contextlib.contextmanager
def said_once(env: DistEnv) -> Iterator[None]:
    """Around checks that every process makes alike (the same file, the same config): where they fail, the first
    process says why, and the others end quietly, so that a torchrun log holds the line once."""
    try:
        yield
    except UserError:
        if env.is_main:
            raise
        raise ReportedElsewhere(1) from None


def run(cfg: TrainConfig, env: DistEnv, interrupts: Interrupts | None = None) -> Progress:
    """Train (or continue) the configured run and write everything into `cfg.output`, which it holds
    (`rundir.claimed`) from before anything is read or written there. `interrupts`: the command's signal
    handlers, where it installed them before joining the process group; installed here otherwise."""
    check(cfg)
    with contextlib.ExitStack() as stack:
        if interrupts is None:
            interrupts = stack.enter_context(Interrupts(cfg))
        interrupts.is_main = env.is_main
        stack.enter_context(peer_loss_as_error(env))
        stack.enter_context(claimed(cfg, env))
        try:
            return _run(cfg, env, interrupts)
        except RuntimeError:
            interrupts.check()  # a loader worker that Ctrl-C ended is Ctrl-C's doing
            raise


def _run(cfg: TrainConfig, env: DistEnv, interrupts: Interrupts) -> Progress:
    amp = resolve_amp(cfg.amp, env.device.type)
    out = Path(cfg.output)
    resume = resume_path(cfg)
    train_set, val_set, num_classes = build_datasets(cfg, env)
    parts = build_parts(cfg, env, num_classes, amp)
    if resume is not None:
        with said_once(env):
            progress = load_training_checkpoint(resume, parts, env, cfg)
    else:
        progress = Progress()
        seed_globals(derive_seed(cfg.seed, env.rank))
    train_loader, val_loader, sampler = build_loaders(cfg, train_set, val_set, env)
    with said_once(env):
        if resume is not None:
            check_place(progress, sampler.steps, resume)
        prepare_output(cfg, resume is not None, env)
    if resume is not None and env.is_main:
        restore_outputs(parts, progress, cfg)
    log(env, run_line(cfg, parts.model, len(train_set), len(val_set), num_classes, env.world_size,
                      sampler.global_batch, sampler.steps, env.device.type, amp)
        + (f" | resumed from {resume} at {place(progress.epoch, progress.batch, sampler.steps)}"
           if resume is not None else ""))
    board = TensorBoard(out / "tensorboard", purge_step=progress.step) if cfg.tensorboard and env.is_main else None
    stop = cfg.stop_epoch or cfg.epochs
    with contextlib.ExitStack() as closing:
        if board is not None:
            closing.callback(board.close)
        session = Session(cfg, env, amp, parts, interrupts, DeviceInputs(cfg, env.device), board)
        interrupts.training = True
        interrupts.check()
        for epoch in range(progress.epoch, stop):
            sampler.set_epoch(epoch, progress.batch)
            try:
                row = run_epoch(session, (train_loader, val_loader), sampler.steps, epoch, progress)
            except TrainingDiverged as e:
                if not env.is_main:  # every process saw the same reduced loss
                    raise ReportedElsewhere(1) from None
                last = out / "last.pth"
                kept_at = recorded_place(last)
                kept = (f"{last} (at {place(*kept_at, sampler.steps)}) is the last good checkpoint" if kept_at
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(f"{e}, {kept}") from None
            record_epoch(row, session, progress)
            log(env, epoch_line(row, cfg.epochs))
            if interrupts.stopping is not None and epoch + 1 < stop:
                raise stopped(session, progress, sampler.steps)
    barrier(env)
    if progress.epoch < cfg.epochs:
        log(env, f"stopped at {place(progress.epoch, 0, sampler.steps)} of {cfg.epochs}; continue with --resume auto "
            f"--output {out}")
    log(env, f"done: best val top-1 {progress.best_score:.2f}% (epoch {progress.best_epoch}); outputs in {out}/ "
        "(last.pth, best.pth, summary.csv, summary.png, args.yaml)")
    return progress
