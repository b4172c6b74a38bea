"""torchrun job for test_world_size.py: train a tiny SwinV2 on fixed synthetic global batches, save and
resume through the real Checkpointer and engine, on whatever world size torchrun gives.

    torchrun --nproc_per_node=N world_size_job.py OUT ENGINE SHARDS [--resume-from DIR --resume-step R]
                                                   --save-at S --steps T

Each step's global batch (8 images) is the same whatever the world size; rank r's micro batch m is a fixed
slice of it, so a run resumed on another world size must give the losses of the run it continues, which
only holds if the weights *and* the AdamW moments were restored. Writes OUT/losses.json (rank 0):
{step: global mean loss} for the steps this launch ran, and the resumed loader's position.
"""
import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from data.shards import build_loader
from models import SwinTransformerV2
from pretrain import process_group
from pretrain.checkpoint import BatchLayout, Checkpointer, step_tag
from pretrain.config import CONF_DIR, finalize, grad_accum_steps, register_configs
from pretrain.engine import build_engine
from pretrain.optim import optimizer_for

GLOBAL_BATCH, MICRO, CLASSES = 8, 2, 4
TINY = dict(img_size=32, patch_size=4, embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=4,
            pretrained_window_sizes=(0, 0), drop_path_rate=0.0)


def optimizer(cfg):
    """AdamW with weight decay 0.05 and no layer decay, whatever the stage's config says."""
    return optimizer_for(dataclasses.replace(cfg.stage.optim, weight_decay=0.05, layer_decay=1.0))


class Recipe:
    def build_model(self):
        return SwinTransformerV2(num_classes=CLASSES, **TINY)

    def initial_weights(self):
        return None


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("engine", choices=("deepspeed", "fsdp"))
    parser.add_argument("shards")
    parser.add_argument("--resume-from", type=Path, help="checkpoint root of an earlier launch")
    parser.add_argument("--resume-step", type=int)
    parser.add_argument("--save-at", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], help="extra config override, e.g. engine.zero_stage=2")
    args = parser.parse_args()

    process_group.setup_env()
    ctx = process_group.init()
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING, format="%(message)s")
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=["+stage=supervised", f"engine={args.engine}", "engine.precision=fp32",
                                           "stage.init_from=none", f"stage.global_batch={GLOBAL_BATCH}",
                                           f"stage.micro_batch={MICRO}", "stage.optim.warmup_steps=0",
                                           "stage.optim.clip_grad=0.05", *args.set])  # small: clipping is part of the step
    cfg = finalize(raw, ctx.world_size)
    accum = grad_accum_steps(cfg, ctx.world_size)
    torch.manual_seed(0)
    engine = build_engine(cfg, ctx, Recipe(), accum, optimizer(cfg))
    loader = build_loader(f"{args.shards}/train.txt", sample_fn=lambda b: {"n": torch.tensor(len(b))},
                          batch_size=MICRO, rank=ctx.rank, world_size=ctx.world_size, num_workers=0,
                          shuffle_buffer=16, resampled=False, samples_per_epoch=64, seed=0)

    def checkpointer(directory: Path) -> Checkpointer:
        store = Checkpointer(directory, ctx, keep_last=2)
        store.track("loader", loader, reshards=True)
        store.track("batch", BatchLayout(GLOBAL_BATCH, MICRO, ctx.world_size))
        return store

    step, result = 0, {"losses": {}}
    if args.resume_from is not None:
        step = checkpointer(args.resume_from).load(engine, step_tag(args.resume_step))
        result["loader_batches"] = loader.batches
    saver = checkpointer(args.out / "checkpoints")
    while step < args.steps:
        images, labels = global_batch(step)
        for group in engine.param_groups:
            group["lr"] = 1e-3 * group["lr_scale"]
        loss_sum = torch.zeros(())
        for m in range(accum):
            lo = (m * ctx.world_size + ctx.rank) * MICRO
            next(loader)
            loss = F.cross_entropy(engine.forward(images[lo:lo + MICRO]).float(), labels[lo:lo + MICRO])
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
        step += 1
        result["losses"][step] = process_group.all_reduce_sum(loss_sum).item() / (accum * ctx.world_size)
        if step == args.save_at:
            saver.save(engine, step)
    if ctx.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps(result))
    process_group.shutdown()


if __name__ == "__main__":
    main()
    process_group.exit_process(0)
