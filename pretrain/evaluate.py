"""+stage=eval: top-1/top-5 of a checkpoint on data.val_urls at model.img_size, no training.

The model is built, sharded and loaded as a fine-tune would start (the stage's ClassifierRecipe:
stage.init_from, the windows its position bias was trained at, a class map), through the configured engine,
so a model that only fits sharded is evaluated sharded too. With stage.ema the EMA that a fine-tune kept in
its checkpoint is evaluated as well, in a second engine built from it. Both are measured by the stage's
evaluator, the one the trainer's periodic and EMA evaluations use. The metrics (eval/top1, eval/top5,
eval/loss, eval/images, and eval_ema/* with stage.ema) are logged at the source checkpoint's step to
<run_root>/<experiment_name>/eval/metrics.jsonl and printed as one line per set of weights.
"""
from __future__ import annotations

import dataclasses
import gc
import logging

from omegaconf import OmegaConf

from pretrain import process_group, rundir
from pretrain.ema import ema_metrics
from pretrain.engine import build_engine
from pretrain.loggers import RunLogger
from pretrain.optim import optimizer_for
from pretrain.preflight import Start
from pretrain.stages import build_stage
from pretrain.trainer import seed_all

log = logging.getLogger(__name__)


def summary_line(metrics: dict[str, float], prefix: str = "eval") -> str:
    m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}
    return f"{prefix}: top1 {m['top1']:.2f} top5 {m['top5']:.2f} loss {m['loss']:.4f} images {int(m['images'])}"


def evaluate(start: Start) -> dict[str, float]:
    cfg = start.cfg
    ctx = process_group.init()
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    stage = build_stage(start, ctx)
    metrics: dict[str, float] = {}
    for from_ema in (False, True) if cfg.stage.ema else (False,):
        recipe = dataclasses.replace(stage.model, from_ema=from_ema)
        log.info("evaluating the %s weights of %s at %dpx, window %d", "EMA" if from_ema else "live", start.source,
                 cfg.model.img_size, cfg.model.window_size)
        seed_all(cfg.seed)  # a head that starts anew (other classes, no class map) is the same on every rank
        engine = build_engine(cfg, ctx, recipe, 1, optimizer_for(cfg.stage.optim))
        result = stage.evaluator.evaluate(engine)
        metrics.update(ema_metrics(result) if from_ema else result)
        del engine
        gc.collect()  # the first engine's shards go before the second is built
    logger = RunLogger(rundir.run_dir(cfg), OmegaConf.to_container(OmegaConf.structured(cfg)), rank=ctx.rank,
                       kind=cfg.logger.kind, project=cfg.logger.project, group=cfg.experiment_name,
                       job_type=cfg.stage.name, mode=cfg.logger.mode, entity=cfg.logger.entity)
    logger.log(start.source.step, metrics)
    logger.finish()
    if ctx.is_main:
        rundir.save_config(cfg, rundir.run_dir(cfg))  # what was evaluated, and how
        for prefix in ("eval", "eval_ema") if cfg.stage.ema else ("eval",):
            print(summary_line(metrics, prefix), flush=True)
    process_group.shutdown()
    return metrics
