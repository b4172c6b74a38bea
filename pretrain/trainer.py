"""The training loop: resume, step, log, evaluate, checkpoint, stop on preemption."""
from __future__ import annotations

import logging
import random
import time
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from pretrain import process_group, rundir
from pretrain.checkpoint import BatchLayout, Checkpointer
from pretrain.compile import CompileWatch
from pretrain.config import Config, grad_accum_steps, total_steps
from pretrain.ema import WeightEMA
from pretrain.engine import Engine, build_engine
from pretrain.guard import StepGuard, TrainingHalted, Verdict
from pretrain.loggers import RunLogger
from pretrain.loaders import next_batch
from pretrain.metrics import TrainMeter, peak_flops_per_s
from pretrain.objectives import Objective
from pretrain.optim import optimizer_for
from pretrain.preemption import PreemptionWatcher
from pretrain.preflight import Start
from pretrain.progress import Progress
from pretrain.schedule import WarmupCosine, scale_lr, set_lr
from pretrain.stages import build_stage

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(cfg: Config, total: int) -> WarmupCosine:
    o, batch = cfg.stage.optim, cfg.stage.global_batch
    return WarmupCosine(scale_lr(o.lr, batch, o.reference_batch), o.warmup_steps, total,
                        min_lr=scale_lr(o.min_lr, batch, o.reference_batch),
                        warmup_lr=scale_lr(o.warmup_lr, batch, o.reference_batch))


class StepResult(NamedTuple):
    loss: torch.Tensor  # this rank's mean over the micro batches, on the device
    extras: dict[str, torch.Tensor]
    data_wait_s: float
    finite_loss: torch.Tensor  # 1 while every rank's loss was finite (agreed over ranks), on the device
    updated: bool  # the weights changed: False when some rank's loss or the global gradient norm was not finite
    stop: bool  # some rank got a stop signal: every rank saves after this step and returns


def train_step(objective: Objective, engine: Engine, loader, accum: int, watcher: PreemptionWatcher) -> StepResult:
    """One optimizer step over `accum` micro batches. It reads on the host once, at its end: whether the
    weights were updated (the guard acts on it at once) and whether to stop, agreed over ranks together;
    everything else stays on the device for the log steps."""
    # sums stay on the device: reading them every micro batch would stall a GPU
    loss_sum, extras_sum, data_wait_s = torch.zeros((), device=engine.device), {}, 0.0
    finite = torch.ones((), device=engine.device)
    for _ in range(accum):
        t = time.perf_counter()
        batch = next_batch(loader)
        data_wait_s += time.perf_counter() - t
        loss, extras = objective.loss(engine, batch)
        # Every rank must know before its backward whether any rank's loss is bad: one tiny collective per
        # micro batch, left on the device (no host sync) until the step's end.
        finite = finite * process_group.all_reduce_min(torch.isfinite(loss.detach()).float())
        engine.backward(loss, finite)
        engine.step()
        loss_sum += loss.detach().float()
        for k, v in extras.items():
            extras_sum[k] = extras_sum.get(k, 0.0) + v.detach().float()
    skipped, stop = watcher.agree(engine.skipped())
    return StepResult(loss_sum / accum, {k: v / accum for k, v in extras_sum.items()}, data_wait_s, finite,
                      not skipped, stop)


def train(start: Start) -> None:
    cfg = start.cfg
    # First: a SLURM warning that arrives while the model, loaders and checkpoint load is not lost.
    watcher = PreemptionWatcher()
    ctx = process_group.init(cfg.resilience.collective_timeout_s)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run = rundir.run_dir(cfg)
    accum, total = grad_accum_steps(cfg, ctx.world_size), total_steps(cfg)
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg))

    seed_all(cfg.seed)  # the same initial weights on every rank
    stage = build_stage(start, ctx)
    engine = build_engine(cfg, ctx, stage.model, accum, optimizer_for(cfg.stage.optim))
    ema = WeightEMA(engine, stage.ema_decay) if stage.ema_decay > 0 else None  # evaluated beside the weights
    seed_all(cfg.seed + ctx.rank)  # per-rank randomness (drop path) from here on
    loader = stage.data.train_loader()
    logger = RunLogger(run, cfg_dict, rank=ctx.rank, kind=cfg.logger.kind, project=cfg.logger.project,
                       group=cfg.experiment_name, job_type=cfg.stage.name, mode=cfg.logger.mode,
                       entity=cfg.logger.entity)
    # Before the resume: measuring the CPU GEMM peak draws random numbers, which must not shift the
    # restored RNG stream.
    meter = TrainMeter(flops_per_image=stage.model.flops_per_image(),
                       peak_flops=peak_flops_per_s(ctx.device, engine.dtype), world_size=ctx.world_size,
                       device=ctx.device)
    guard = StepGuard(cfg.resilience, ctx.world_size)
    checkpointer = Checkpointer(rundir.checkpoint_dir(run), ctx, cfg.checkpoint.keep_last)
    checkpointer.track("loader", loader, reshards=True)
    checkpointer.track("guard", guard)
    checkpointer.track("batch", BatchLayout(cfg.stage.global_batch, cfg.stage.micro_batch, ctx.world_size))
    if ema is not None:
        checkpointer.track("ema", ema)

    step = 0
    if (tag := checkpointer.latest_tag()) is not None:
        step = checkpointer.load(engine, tag)
        log.info("resumed from %s at step %d", checkpointer.dir / tag, step)
    if ctx.is_main:
        rundir.save_config(cfg, run)
    log.info("%s: %d steps, global batch %d (micro %d x accumulation %d x world %d), run dir %s",
             cfg.stage.name, total, cfg.stage.global_batch, cfg.stage.micro_batch, accum, ctx.world_size, run)
    progress = Progress(total, rank=ctx.rank, start_step=step, desc=cfg.stage.name)
    schedule = lr_schedule(cfg, total)
    compiled = CompileWatch()

    while step < total:
        t = time.perf_counter()
        set_lr(engine.param_groups, schedule(step))
        result = train_step(stage.objective, engine, loader, accum, watcher)
        step += 1  # a skipped step still counts: the lr schedule moves on, as in large-scale practice
        if compiled.first_step_frames is None:
            compiled.first_step_done()
        verdict = guard.check(step, result.loss, finite_loss=result.finite_loss, updated=result.updated)
        if verdict is Verdict.ROLL_BACK:
            if (tag := checkpointer.latest_tag()) is not None:
                # the weights, optimizer, EMA and RNG of the last checkpoint; the data loader keeps its place
                # (the batches since the checkpoint are skipped) and the guard's counts go on
                back = checkpointer.load(engine, tag, parts=["ema"] if ema is not None else [])
                guard.rolled_back(step, back)
                step = back
                continue
            log.warning("step %d: no checkpoint to roll back to yet; going on", step)
        meter.update(loss=result.loss, batch_size=cfg.stage.micro_batch * accum, step_s=time.perf_counter() - t,
                     data_wait_s=result.data_wait_s, grad_norm=engine.grad_norm(), extras=result.extras,
                     lrs={g["family"]: g["lr"] for g in engine.param_groups}, skipped=not result.updated)
        if ema is not None and result.updated:
            ema.update()
        shown = {}  # the progress line keeps the last logged values between log steps
        if step % cfg.logger.every == 0 or step == total or verdict is Verdict.HALT:
            metrics = {**meter.summary(loader.stats()), **guard.metrics(), **compiled.metrics()}  # collective
            logger.log(step, metrics)
            shown = {"loss": metrics["train/loss"], "img_per_s": metrics["perf/img_per_s"]}
        progress.update(step, **shown)
        if verdict is Verdict.HALT:
            break  # on every rank, without saving: `latest` stays the last good checkpoint
        if ctx.is_main and cfg.logger.image_every and step % cfg.logger.image_every == 0:
            logger.log_images(step, stage.objective.images())
        if stage.evaluator is not None and stage.evaluator.due(step, total):
            metrics = stage.evaluator.evaluate(engine)
            if ema is not None:
                metrics.update(ema.evaluate(stage.evaluator.evaluate))
            logger.log(step, metrics)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if result.stop or step % cfg.checkpoint.every_steps == 0 or step == total:
            checkpointer.save(engine, step)
        if result.stop:
            log.info("stopping at step %d on %s; relaunch to resume", step, watcher.signal_name or "a peer's signal")
            break

    progress.close()
    logger.finish()
    process_group.shutdown()
    if guard.halted:
        latest = checkpointer.latest_tag()
        raise TrainingHalted(f"{guard.halted}. Resume from: {checkpointer.dir / latest if latest else 'the start'}")
