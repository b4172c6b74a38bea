"""torchrun job for test_plan_step: for each case (JSON: {"accum": micro batches per step, "overrides": [Hydra
overrides]}), build the project's engine,
run three optimizer steps of the trainer's own train_step (its end-of-step flags included) on synthetic
SimMIM batches, and write the collective bytes of the third step, by phase, collective and dtype, counted by
scripts.comm_meter, to OUT_DIR/<case index>_rank<r>.json. The first two steps are left out: DeepSpeed
records its module trace in the first and checks it in the second.

    torchrun --nproc_per_node=2 plan_step_job.py OUT_DIR '{"accum": 2, "overrides": ["engine=fsdp"]}' ...
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import process_group  # noqa: E402
from pretrain.engine import build_engine  # noqa: E402
from pretrain.optim import optimizer_for  # noqa: E402
from pretrain.preemption import PreemptionWatcher  # noqa: E402
from pretrain.preflight import Start  # noqa: E402
from pretrain.stages import build_stage  # noqa: E402
from pretrain.trainer import train_step  # noqa: E402
from scripts.comm_meter import CollectiveMeter  # noqa: E402
from scripts.plan_memory import compose_config  # noqa: E402

STEPS = 3
# 64 px, window 4: every stage runs and the job takes seconds; the traffic depends on the parameters only
SMALL = ["model=swinv2_nano", "model.img_size=64", "model.window_size=4", "stage.mask_patch_size=16",
         "stage.micro_batch=1"]


def in_phase(meter: CollectiveMeter, name: str, fn):
    def call(*args, **kwargs):
        with meter.in_phase(name):
            return fn(*args, **kwargs)
    return call


def measure(overrides: list[str], accum: int, ctx) -> dict[str, int]:
    cfg = compose_config([*SMALL, f"stage.global_batch={accum * ctx.world_size}", *overrides])
    torch.manual_seed(0)
    stage = build_stage(Start(cfg), ctx)
    engine = build_engine(cfg, ctx, stage.model, accum, optimizer_for(cfg.stage.optim))
    meter = CollectiveMeter()
    for name in ("forward", "backward", "step"):  # label the engine's calls; train_step's own are "loop"
        setattr(engine, name, in_phase(meter, name, getattr(engine, name)))
    side = cfg.model.img_size // cfg.model.patch_size
    batches = iter([{"image": torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size),
                     "mask": (torch.rand(1, side, side) > 0.5).float()} for _ in range(STEPS * accum)])
    watcher = PreemptionWatcher()
    for _ in range(STEPS):
        meter.reset()
        with meter, meter.in_phase("loop"):
            train_step(stage.objective, engine, batches, accum, watcher)
    return {"/".join(key): n for key, n in meter.bytes.items()}


def main(out_dir: str, *cases: str) -> None:
    process_group.setup_env()
    ctx = process_group.init()
    for i, case in enumerate(map(json.loads, cases)):
        measured = measure(case["overrides"], case["accum"], ctx)
        (Path(out_dir) / f"{i}_rank{ctx.rank}.json").write_text(json.dumps(measured))
    process_group.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    process_group.exit_process(0)
