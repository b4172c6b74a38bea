"""Manual GPU check of model.compile=blocks (pytest does not collect it): one process, NCCL, bf16.

    PYTHONPATH=. python3 scripts/bench/gpu/compile_check.py [GIANT_MICRO_BATCH]   (hydra etc.: see run_all.sh)

1. SwinV2-G SimMIM training steps (forward, backward, AdamW) through the DeepSpeed ZeRO-3 engine, compiled
   blocks, grad checkpointing: compile time, step time and TrainMeter's MFU (target >= 35%).
2. No host syncs inside a step: SwinV2-T SimMIM micro batches under torch.cuda.set_sync_debug_mode("error"),
   through FSDP2 (forward, backward and the optimizer step: the engine reads nothing) and through ZeRO-3
   (forward and backward; DeepSpeed's own step reads its overflow flag), compiled and eager.
"""
import statistics
import sys
import time
import traceback

import torch

from pretrain import process_group
from pretrain.compile import CompileWatch
from pretrain.engine import build_engine
from pretrain.metrics import TrainMeter, peak_flops_per_s
from pretrain.optim import optimizer_for
from pretrain.preflight import Start
from pretrain.stages import build_stage
from scripts.plan_memory import compose_config


def engine_for(ctx, overrides: list[str], micro_batch: int):
    cfg = compose_config([*overrides, f"stage.micro_batch={micro_batch}", f"stage.global_batch={micro_batch}",
                          "model.drop_path_rate=0", "engine.precision=bf16"])
    stage = build_stage(Start(cfg), ctx)
    torch.manual_seed(0)
    engine = build_engine(cfg, ctx, stage.model, 1, optimizer_for(cfg.stage.optim))
    for g in engine.param_groups:
        g["lr"] = 1e-5 * g["lr_scale"]
    side = cfg.model.img_size
    batch = {"image": torch.randn(micro_batch, 3, side, side, device="cuda"),
             "mask": (torch.rand(micro_batch, side // 4, side // 4, device="cuda") > 0.4).float()}
    return stage, engine, batch


def step(stage, engine, batch, *, optimizer: bool = True):
    loss, _ = stage.objective.loss(engine, batch)
    engine.backward(loss)
    if optimizer:
        engine.step()
    return loss


def giant_mfu(ctx, micro_batch: int, steps: int = 5) -> None:
    stage, engine, batch = engine_for(ctx, ["model=swinv2_giant", "engine=deepspeed", "engine.zero_stage=3",
                                            "model.compile=blocks", "model.grad_checkpointing=torch"], micro_batch)
    meter = TrainMeter(flops_per_image=stage.model.flops_per_image(),
                       peak_flops=peak_flops_per_s("cuda", torch.bfloat16),
                       world_size=1, device=torch.device("cuda"))
    t0 = time.perf_counter()
    step(stage, engine, batch)
    torch.cuda.synchronize()
    print(f"SwinV2-G ZeRO-3 bf16 compiled blocks, micro batch {micro_batch}: first step {time.perf_counter() - t0:.0f} s "
          f"(compile {CompileWatch.seconds():.0f} s, {CompileWatch.frames()} frames)", flush=True)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(stage, engine, batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        meter.update(loss=loss, batch_size=micro_batch, step_s=times[-1], data_wait_s=0.0, lrs={})
    s = meter.summary()
    print(f"SwinV2-G ZeRO-3 bf16 compiled blocks + AdamW: median {statistics.median(times):.2f} s/step, "
          f"{s['perf/img_per_s']:.1f} img/s, {s['perf/tflops_per_device']:.0f} TFLOP/s, MFU {s['perf/mfu']:.1%} "
          f"(target >= 35%), peak {s['perf/peak_mem_bytes'] / 2**30:.1f} GiB", flush=True)


def no_syncs(ctx, engine_name: str, compile_mode: str) -> None:
    overrides = ["model=swinv2_tiny", f"engine={engine_name}", f"model.compile={compile_mode}"]
    stage, engine, batch = engine_for(ctx, overrides, 32)
    for _ in range(2):  # compilation, allocator and DeepSpeed's first-step set-up may sync
        step(stage, engine, batch)
    torch.cuda.synchronize()
    optimizer = engine_name == "fsdp"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(stage, engine, batch, optimizer=optimizer)
        verdict = "no sync"
    except RuntimeError as err:
        verdict = f"SYNC: {str(err).splitlines()[0]}\n{traceback.format_exc(limit=-6)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    what = "forward+backward+step" if optimizer else "forward+backward"
    print(f"sync debug mode 'error', SwinV2-T {engine_name} compile={compile_mode}, {what}: {verdict}", flush=True)


def main() -> None:
    process_group.setup_env()
    ctx = process_group.init()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for engine_name in ("fsdp", "deepspeed"):
        for compile_mode in ("blocks", "off"):
            try:
                no_syncs(ctx, engine_name, compile_mode)
            except Exception:  # noqa: BLE001 - report every case
                traceback.print_exc()
            torch.cuda.empty_cache()
    try:
        giant_mfu(ctx, int(sys.argv[1]) if len(sys.argv) > 1 else 64)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    process_group.shutdown()


if __name__ == "__main__":
    main()
