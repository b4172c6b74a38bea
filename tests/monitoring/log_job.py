"""torchrun job for test_loggers: log like the trainer does, on every rank, for a range of steps.

    torchrun --nproc_per_node=2 log_job.py RUN_DIR --kind wandb --start-step 0 --steps 12

Rank r reports loss r + 1 and r + 1 skipped samples (epoch 1 on both), so the summaries show how ranks were
reduced.
"""

import argparse

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import ResilienceConfig
from pretrain.guard import StepGuard
from pretrain.loggers import RunLogger
from pretrain.metrics import TrainMeter

LOG_EVERY = 3
IMAGE_EVERY = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kind", default="wandb")
    parser.add_argument("--start-step", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = {"experiment_name": "exp", "stage": {"name": "simmim", "global_batch": 8}, "model": {"embed_dim": 32}}
    logger = RunLogger(args.run_dir, cfg, rank=rank, kind=args.kind, project="swinv2-test", group="exp",
                       job_type="simmim")
    meter = TrainMeter(flops_per_image=1e9, peak_flops=1e12, world_size=world, device=torch.device("cpu"))
    guard = StepGuard(ResilienceConfig(), world)  # the trainer logs the guard's counts beside the meter's
    for step in range(args.start_step + 1, args.start_step + args.steps + 1):
        meter.update(loss=torch.tensor(rank + 1.0), batch_size=4, step_s=0.5, data_wait_s=0.1,
                     grad_norm=torch.tensor(2.0), lrs={"backbone": 1e-3 * step, "head": 1e-2},
                     extras={"l1_masked": torch.tensor(0.25)})
        if step % LOG_EVERY == 0:
            logger.log(step, {**meter.summary({"skipped_samples": rank + 1, "epoch": 1}), **guard.metrics()})
        if step % IMAGE_EVERY == 0:
            panel = np.full((8, 20, 3), step, np.uint8)
            logger.log_images(step, {"simmim/reconstruction": panel})
    logger.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
