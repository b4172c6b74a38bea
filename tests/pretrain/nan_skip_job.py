"""torchrun job for test_nan_skip.py and tests/reliability/test_nonfinite.py: the trainer's train_step with
gradient accumulation through a real engine, where one micro batch of one rank carries a NaN pixel (a corrupt
input) or a finite loss whose backward overflows to inf gradients.

    torchrun --nproc_per_node=2 nan_skip_job.py OUT ENGINE BATCHES [CONFIG_OVERRIDE ...]

BATCHES lists the global batches to train on, one per optimizer step, e.g. `0,1x,2`: `x` puts a NaN into
rank 1's first micro batch of that step, `g` gives that micro batch infinite gradients instead. Every rank
writes OUT/updated_rank<r>.json (did each step update?) and saves the final engine state to
OUT/checkpoints/final.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from pretrain import process_group
from pretrain.config import CONF_DIR, finalize, grad_accum_steps, register_configs
from pretrain.engine import build_engine
from pretrain.preemption import PreemptionWatcher
from pretrain.trainer import train_step
from world_size_job import MICRO, Recipe, global_batch, optimizer


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with an overflow in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Classify:
    """An objective (pretrain.objectives.Objective): the part of a stage train_step uses."""

    def loss(self, engine, batch):
        logits = engine.forward(batch["image"]).float()
        return F.cross_entropy(InfGrad.apply(logits) if batch["inf_grad"] else logits, batch["label"]), {}


def micro_batches(plan: list[str], rank: int, world_size: int, accum: int):
    for entry in plan:
        images, labels = global_batch(int(entry.rstrip("xg")))
        for m in range(accum):
            lo = (m * world_size + rank) * MICRO
            image = images[lo:lo + MICRO].clone()
            faulty = rank == 1 and m == 0
            if faulty and entry.endswith("x"):
                image[0, 0, 0, 0] = float("nan")
            yield {"image": image, "label": labels[lo:lo + MICRO], "inf_grad": faulty and entry.endswith("g")}


def main(out: Path, engine_name: str, plan: list[str], extra: list[str]) -> None:
    process_group.setup_env()
    ctx = process_group.init()
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=["+stage=supervised", f"engine={engine_name}", "engine.precision=fp32",
                                           "stage.init_from=none", "stage.global_batch=8", f"stage.micro_batch={MICRO}", *extra])
    cfg = finalize(raw, ctx.world_size)
    accum = grad_accum_steps(cfg, ctx.world_size)
    torch.manual_seed(0)
    engine = build_engine(cfg, ctx, Recipe(), accum, optimizer(cfg))
    for group in engine.param_groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    loader = micro_batches(plan, ctx.rank, ctx.world_size, accum)
    watcher = PreemptionWatcher()
    updated = [train_step(Classify(), engine, loader, accum, watcher).updated for _ in plan]
    engine.save(out / "checkpoints", "final")
    (out / f"updated_rank{ctx.rank}.json").write_text(json.dumps(updated))
    process_group.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4:])
    process_group.exit_process(0)
