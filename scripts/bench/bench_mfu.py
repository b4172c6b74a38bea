"""CPU MFU of the SwinV2-T bf16 training step: achieved model FLOP/s over this machine's measured bf16 GEMM peak.

    model FLOP/s = 3 x swinv2_forward_flops(tiny, 1000 classes) x images / step time   (pretrain.metrics)
    MFU          = model FLOP/s / measure_gemm_peak(bf16)   (best 2048^3 bf16 matmul, same threads)
Two ways of running bf16: torch autocast over fp32 weights (what DDP does here), and the whole module in bf16
with fp32 AdamW master weights (what the DeepSpeed bf16 engine does). Forward + backward + AdamW, 192px/w12.

    .venv/bin/python -m scripts.bench.bench_mfu [--batch 16] [--steps 3]
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from models import SwinTransformerV2, swinv2_forward_flops
from pretrain.metrics import measure_gemm_peak, train_flops_per_s
from pretrain.recipes import model_kwargs
from scripts.bench import suite_main
from scripts.plan_memory import compose_config

NUM_CLASSES = 1000


def _step_fn(mode: str, batch: int):
    cfg = compose_config(["model=swinv2_tiny", "+stage=supervised"]).model
    model = SwinTransformerV2(num_classes=NUM_CLASSES, **model_kwargs(cfg)).train()
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    if mode == "autocast":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, dataclasses.asdict(cfg)

    master = [p.detach().clone() for p in model.parameters()]  # fp32 master weights, as DeepSpeed keeps them
    model = model.to(torch.bfloat16)
    for p, m in zip(model.parameters(), master):
        m.grad = torch.zeros_like(m)
    opt = torch.optim.AdamW(master, lr=1e-4)
    xb = x.to(torch.bfloat16)

    def step():
        F.cross_entropy(model(xb).float(), y).backward()
        for p, m in zip(model.parameters(), master):
            m.grad.copy_(p.grad)
            p.grad = None
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), master):
                p.copy_(m)
    return step, dataclasses.asdict(cfg)


def run(batch: int = 16, steps: int = 3) -> list[dict]:
    peak = measure_gemm_peak(torch.bfloat16)
    rows = []
    for mode, label in (("autocast", "bf16 autocast, fp32 weights"), ("bf16", "bf16 module + fp32 master")):
        step, model_cfg = _step_fn(mode, batch)
        step()  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        achieved = train_flops_per_s(swinv2_forward_flops(model_cfg, NUM_CLASSES), batch / step_s)
        rows.append(dict(
            name=f"swinv2_tiny train step MFU, {label} (TFLOP/s vs bf16 GEMM peak)", ours=achieved / 1e12,
            baseline=peak / 1e12, ratio=achieved / peak,
            how=f"3 x analytic fwd FLOPs x {batch} img / median of {steps} steps ({step_s:.2f} s), fwd+bwd+AdamW "
                f"192/w12; peak = best 2048^3 bf16 matmul; {torch.get_num_threads()} threads; target >= 0.30"))
    return rows


if __name__ == "__main__":
    suite_main("mfu", run, __doc__, batch=16, steps=3)
