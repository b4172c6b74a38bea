"""torchrun job for test_plan_memory: build the project's DeepSpeed engine (ZeRO-3, bf16) for each model
override, take one training step, and write what each rank really holds to OUT_DIR/<model>_rank<r>.json:
the parameter partitions (`ds_tensor`), the persistent (kept whole) parameters, the gradient partition
buffer, the fp32 master partitions and the AdamW moments.

    torchrun --nproc_per_node=2 plan_memory_zero3_job.py OUT_DIR swinv2_nano swinv2_tiny
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import process_group  # noqa: E402
from pretrain.engine.deepspeed import DeepSpeedEngine  # noqa: E402
from pretrain.optim import optimizer_for  # noqa: E402
from pretrain.preflight import Start  # noqa: E402
from pretrain.stages import build_stage  # noqa: E402
from scripts.plan_memory import compose_config  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def held_by_rank(model_name: str, ctx) -> dict:
    cfg = compose_config([f"model={model_name}", "engine.zero_stage=3", "engine.precision=bf16",
                          "stage.micro_batch=1", "stage.global_batch=2", "model.img_size=64",
                          "model.window_size=4", "stage.mask_patch_size=16",
                          "model.compile=off"])  # state bytes do not depend on it; compiling tiny takes minutes
    torch.manual_seed(0)
    stage = build_stage(Start(cfg), ctx)
    engine = DeepSpeedEngine(cfg, ctx, stage.model, 1, optimizer_for(cfg.stage.optim))
    image = torch.randn(1, 3, 64, 64)
    mask = (torch.rand(1, 16, 16) > 0.5).float()
    engine.backward(stage.objective.loss(engine, {"image": image, "mask": mask})[0])
    engine.step()
    params = list(engine.module.parameters())
    opt = engine.ds.optimizer
    return {
        "partition_bytes": nbytes(p.ds_tensor for p in params),
        "persistent_bytes": nbytes(p.data for p in params if p.ds_persist),
        "grad_bytes": nbytes([opt.grad_partitions_flat_buffer]),
        "master_bytes": nbytes(opt.fp32_partitioned_groups_flat),
        "moment_bytes": nbytes(t for s in opt.optimizer.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0),
    }


def main(out_dir: str, *models: str) -> None:
    process_group.setup_env()
    ctx = process_group.init()
    for name in models:
        held = held_by_rank(name, ctx)
        (Path(out_dir) / f"{name}_rank{ctx.rank}.json").write_text(json.dumps(held))
    process_group.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    process_group.exit_process(0)
