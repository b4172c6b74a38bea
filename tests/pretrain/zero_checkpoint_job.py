"""torchrun job for test_convert_checkpoint: for each MODEL:ZERO_STAGE, train a tiny model a few steps
under DeepSpeed ZeRO, save a checkpoint on every rank to OUT_DIR/<model>_zero<stage>[_bf16]/checkpoints, and save
(rank 0) the engine's outputs for a fixed input next to it; `:bf16` trains in DeepSpeed's bf16 mode.
One launch for all runs saves start-up time.

    torchrun --nproc_per_node=2 zero_checkpoint_job.py OUT_DIR swinv2:3 simmim:2 swinv2:3:bf16
"""

import argparse
from pathlib import Path

import deepspeed
import torch

from pretrain import process_group
from pretrain.objectives import masked_l1
from pretrain.optim import build_param_groups

TINY = dict(img_size=32, patch_size=4, embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=4,
            pretrained_window_sizes=(0, 0), drop_path_rate=0.0)


def build(kind: str) -> torch.nn.Module:
    if kind == "swinv2":
        from models.swinv2 import SwinTransformerV2
        return SwinTransformerV2(num_classes=5, **TINY)
    from models.simmim import SimMIM
    return SimMIM(encoder_stride=8, **TINY)


def run(model: torch.nn.Module, kind: str, images: torch.Tensor, mask: torch.Tensor):
    # bf16 as the training engine runs it: autocast, since DeepSpeed casts parameters but not buffers.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=images.dtype == torch.bfloat16):
        return _run(model, kind, images, mask)


def _run(model: torch.nn.Module, kind: str, images: torch.Tensor, mask: torch.Tensor):
    if kind == "swinv2":
        logits = model(images)
        return logits.pow(2).mean(), logits
    reconstruction = model(images, mask)
    return masked_l1(reconstruction, images, mask, norm_target_patch=None), reconstruction


def family_of_each_parameter(model: torch.nn.Module, groups: list[dict]) -> dict[str, str]:
    family = {id(p): g["family"] for g in groups for p in g["params"]}
    return {name: family[id(p)] for name, p in model.named_parameters()}


def train_and_save(kind: str, zero_stage: int, dtype: torch.dtype, out_dir: Path) -> None:
    config = {
        "bf16": {"enabled": dtype == torch.bfloat16},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    torch.manual_seed(0)
    # Built whole, then partitioned by deepspeed.initialize: the checkpoint is the same either way, and
    # this keeps the test about conversion rather than about sharded construction.
    model = build(kind)
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.9,
                                no_decay_keywords=model.no_weight_decay_keywords())
    families = family_of_each_parameter(model, groups)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # Partitioned parameters (ZeRO-3: empty local shapes) must land in the same groups.
    regrouped = build_param_groups(engine.module, weight_decay=0.05, layer_decay=0.9,
                                   no_decay_keywords=model.no_weight_decay_keywords())
    assert family_of_each_parameter(engine.module, regrouped) == families, "param groups changed under ZeRO"

    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(100 + rank)
    mask = (torch.rand(2, 8, 8, generator=gen) > 0.5).float()
    for _ in range(3):  # Adam moves every weight away from its init, so a stale conversion shows
        loss, _ = run(engine, kind, torch.randn(2, 3, 32, 32, generator=gen).to(dtype), mask)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out_dir / "checkpoints"), tag="step3")

    engine.eval()
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 32, 32, generator=gen).to(dtype)
    mask = (torch.rand(2, 8, 8, generator=gen) > 0.5).float()
    with torch.no_grad():
        _, outputs = run(engine, kind, images, mask)
    # The engine's own (bf16 or fp32) weights, gathered: what the fp32 masters must round to.
    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=zero_stage == 3):
        weights = {name: p.detach().clone() for name, p in named}
    if rank == 0:
        torch.save({"images": images, "mask": mask, "outputs": outputs, "weights": weights},
                   out_dir / "outputs.pt")
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("runs", nargs="+", help="MODEL:ZERO_STAGE[:bf16], MODEL in swinv2 | simmim")
    args = parser.parse_args()
    # As pretrain.engine.deepspeed: no JIT build of DeepSpeed's CPU shared-memory kernel (slow, and under a
    # lock every other DeepSpeed process waits on); gloo does the collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    for spec in args.runs:
        kind, stage, *bf16 = spec.split(":")
        dtype = torch.bfloat16 if bf16 else torch.float32
        train_and_save(kind, int(stage), dtype, args.out_dir / "_".join([kind, f"zero{stage}", *bf16]))
    process_group.shutdown()


if __name__ == "__main__":
    main()
    process_group.exit_process(0)
