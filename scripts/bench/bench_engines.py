"""Engine step time on CPU ranks (2 by default): DeepSpeed ZeRO-3 vs torch FSDP2 vs plain DDP, and ZeRO-3 with compiled
blocks vs eager, side by side in one launch.

Each engine trains the SimMIM stage of the same model on the same fixed batch (no data loading: the engines
are what is compared), bf16: ZeRO-3 and FSDP2 through the project's engines (pretrain/engine/), DDP as torch's
DistributedDataParallel with bf16 autocast and the same AdamW groups and clipping. The engines take turns,
step by step, so load on the shared machine hits them alike; a step's time is the slowest rank's. The
engine comparison runs eager; `--compiled` models also step ZeRO-3 and DDP with model.compile=blocks (the first
step, the compilation, is the warm-up): DDP's ratio is what compilation gains on the model itself, ZeRO-3's what
is left of it beside DeepSpeed's own work.

    .venv/bin/python -m scripts.bench.bench_engines [--models swinv2_nano swinv2_tiny] [--steps 4]
                                                    [--compiled swinv2_nano] [--ranks 2]
`run()` returns the rows for the scripts.bench aggregator (baseline = DDP; ratio = DDP time / engine time;
compiled rows: baseline = the same engine eager).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain import process_group
from scripts.bench import format_table

REPO = Path(__file__).resolve().parents[2]
ENGINES = {"zero3": ["engine=deepspeed", "engine.zero_stage=3", "engine.precision=bf16", "model.compile=off"],
           "fsdp2": ["engine=fsdp", "engine.precision=bf16", "model.compile=off"],
           "ddp": ["engine=deepspeed", "engine.precision=bf16", "model.compile=off"]}  # config only; DDP is built here
COMPILED = {"zero3_compiled": [*ENGINES["zero3"], "model.compile=blocks"],
            "ddp_compiled": [*ENGINES["ddp"], "model.compile=blocks"]}
MICRO_BATCH = 4
WORKER_TIMEOUT_S = 480


class DDPEngine:
    """The baseline: whole model and optimizer on every rank, gradients all-reduced, bf16 autocast."""

    device, dtype = torch.device("cpu"), torch.float32  # inputs stay fp32: autocast alone lowers the compute

    def __init__(self, cfg, recipe, optimizer):
        from torch.nn.parallel import DistributedDataParallel

        from pretrain.activation_checkpointing import apply_grad_checkpointing
        from pretrain.compile import apply_compile
        self.module = recipe.build_model()
        apply_grad_checkpointing(self.module, cfg.model.grad_checkpointing)
        apply_compile(self.module, cfg.model.compile)
        self.ddp = DistributedDataParallel(self.module)
        self.optimizer = optimizer(self.module)
        self.clip_grad = cfg.stage.optim.clip_grad

    def forward(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.ddp(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True


def build(name: str, model: str, ctx):
    overrides = {**ENGINES, **COMPILED}[name]
    from pretrain.engine import build_engine
    from pretrain.optim import optimizer_for
    from pretrain.preflight import Start
    from pretrain.stages import build_stage
    from scripts.plan_memory import compose_config
    cfg = compose_config([f"model={model}", f"stage.micro_batch={MICRO_BATCH}", "model.drop_path_rate=0",
                          f"stage.global_batch={MICRO_BATCH * ctx.world_size}", *overrides])
    stage = build_stage(Start(cfg), ctx)
    torch.manual_seed(0)
    optimizer = optimizer_for(cfg.stage.optim)
    ddp = name.startswith("ddp")  # the compiled one too
    engine = DDPEngine(cfg, stage.model, optimizer) if ddp else build_engine(cfg, ctx, stage.model, 1, optimizer)
    return stage, engine, cfg


def worker(out: str, models: list[str], compiled: list[str], steps: int) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)  # a hung collective fails with a traceback
    process_group.setup_env()
    ctx = process_group.init()
    results = {}
    for model in dict.fromkeys(models + compiled):
        names = [*(ENGINES if model in models else ["zero3", "ddp"]), *(COMPILED if model in compiled else [])]
        runs = {name: build(name, model, ctx) for name in names}
        side = runs["zero3"][2].model.img_size
        gen = torch.Generator().manual_seed(ctx.rank)
        batch = {"image": torch.randn(MICRO_BATCH, 3, side, side, generator=gen),
                 "mask": (torch.rand(MICRO_BATCH, side // 4, side // 4, generator=gen) > 0.4).float()}
        first, times = {}, {name: [] for name in runs}
        for i in range(steps + 1):  # the first step is warm-up (allocations, AdamW state)
            for name, (stage, engine, _) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                loss, _ = stage.objective.loss(engine, batch)
                engine.backward(loss)
                engine.step()
                elapsed = torch.tensor(time.perf_counter() - t0)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i:
                    times[name].append(elapsed.item())
                else:
                    first[name] = elapsed.item()
        results[model] = {name: statistics.median(t) for name, t in times.items()}
        for name in COMPILED.keys() & first.keys():  # compile time: the first step less a median one
            results[model][f"{name}_compile_s"] = first[name] - results[model][name]
        del runs
    if ctx.is_main:
        Path(out).write_text(json.dumps(results))
    process_group.shutdown()


def run(models: tuple[str, ...] = ("swinv2_nano", "swinv2_tiny"), compiled: tuple[str, ...] = ("swinv2_nano",),
        steps: int = 4, ranks: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engines.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m",
               "scripts.bench.bench_engines", "--worker", str(out), "--steps", str(steps), "--models", *models,
               "--compiled", *compiled]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"engine bench failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        results = json.loads(out.read_text())
    rows = []
    for model, t in results.items():
        for name, label in (("zero3", "ZeRO-3"), ("ddp", "DDP")):
            if f"{name}_compiled" not in t:
                continue
            rows.append(dict(
                name=f"{model} SimMIM step, {label} compiled blocks vs eager, {ranks} CPU ranks (s/step)",
                ours=t[f"{name}_compiled"], baseline=t[name], ratio=t[name] / t[f"{name}_compiled"],
                how=f"bf16, micro batch {MICRO_BATCH}/rank at 192px, median of {steps} steps after the compiling one, "
                    f"interleaved, 1 thread/rank, slowest rank; compile {t[f'{name}_compiled_compile_s']:.0f} s"))
        for name, label in (("zero3", "ZeRO-3"), ("fsdp2", "FSDP2")):
            if name not in t or "ddp" not in t:
                continue
            rows.append(dict(
                name=f"{model} SimMIM step, {label} vs DDP, {ranks} CPU ranks (s/step)", ours=t[name], baseline=t["ddp"],
                ratio=t["ddp"] / t[name],
                how=f"bf16, micro batch {MICRO_BATCH}/rank at 192px, median of {steps} steps, engines interleaved, "
                    "1 thread/rank, slowest rank; DDP = torch DDP + bf16 autocast"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["swinv2_nano", "swinv2_tiny"])
    parser.add_argument("--compiled", nargs="*", default=["swinv2_nano"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.models, args.compiled, args.steps)
        process_group.exit_process(0)
    rows = run(tuple(args.models), tuple(args.compiled), args.steps, args.ranks)
    print(format_table([("engines", row) for row in rows]), flush=True)


if __name__ == "__main__":
    main()
