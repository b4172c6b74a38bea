"""torchrun job: the real launch/pretrain.py, with a fault injected into chosen global batches of the data.

    FAULTS='{"3": "grad", "7": "spike"}' torchrun --nproc_per_node=2 fault_job.py +stage=simmim [override ...]

Batch n is the n-th global batch the train loader delivers (from 1; one optimizer step's worth), counted by
the loader's own position, which a resume restores and a rollback leaves alone: a fault stays with its data.
Rank 1's first micro batch of that batch gets it: `nan` NaN pixels (a corrupt input, so a non-finite loss),
`grad` a finite loss whose backward overflows to infinite gradients, `spike` 100 times its loss.
"""
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "pretrain"))

from nan_skip_job import InfGrad  # noqa: E402
from pretrain import trainer  # noqa: E402
from pretrain.config import grad_accum_steps  # noqa: E402

FAULTS = {int(batch): kind for batch, kind in json.loads(os.environ["FAULTS"]).items()}


def faulty_stage(start, ctx):
    stage = build_stage(start, ctx)
    accum = grad_accum_steps(start.cfg, ctx.world_size)
    make_loader, clean_loss, loaders = stage.data.train_loader, stage.objective.loss, []

    def train_loader():
        loaders.append(make_loader())
        return loaders[-1]

    def loss(engine, batch):
        micro = loaders[0].batches - 1  # this rank's micro batches delivered before this one
        fault = FAULTS.get(micro // accum + 1) if ctx.rank == 1 and micro % accum == 0 else None
        if fault == "nan":
            batch["image"][0] = float("nan")
        value, extras = clean_loss(engine, batch)
        if fault == "grad":
            value = InfGrad.apply(value)
        elif fault == "spike":
            value = value * 100
        return value, extras

    stage.data.train_loader, stage.objective.loss = train_loader, loss
    return stage


build_stage, trainer.build_stage = trainer.build_stage, faulty_stage
runpy.run_path(str(REPO / "launch" / "pretrain.py"), run_name="__main__")
