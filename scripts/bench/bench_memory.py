"""Activation memory with and without activation checkpointing and sequential attention, and the planner's
prediction next to the measurement.

- measured: bytes a real CPU forward of the SimMIM model leaves allocated for backward (torch profiler,
  every allocation and free), plus the input batch; SwinV2-T at 192px/w12 (checkpointing) and at 768px/w24
  (sequential attention in stages 1-2, where the attention scores are big). These are bytes held between
  forward and backward; the recompute of one checkpointed block comes on top during backward;
- planned: scripts/plan_memory.py on the meta device (math attention kernel, as CPU torch runs it);
- SwinV2-G at 1536px/w24, planned only: peak activations (saved + one block's recompute) per image with the
  GPU's memory-efficient attention kernel, sequential attention in stages 1-2 vs none.

    .venv/bin/python -m scripts.bench.bench_memory
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from scripts.bench import format_table
from scripts.plan_memory import (build_meta_model, compose_config, example_inputs, measure_activations,
                                 saved_activation_bytes, stage_model, training_loss)

SEQ = "model.sequential_attn=[true,true,false,false]"
TINY_768 = ["model=swinv2_tiny", "model.img_size=768", "model.window_size=24", "stage.mask_patch_size=32"]
GIANT_1536 = ["model=swinv2_giant", "model.img_size=1536", "model.window_size=24", "stage.mask_patch_size=32"]


def measured_bytes(cfg, batch: int) -> int:
    """Bytes a real CPU forward leaves allocated for backward, input batch included."""
    torch.manual_seed(0)
    model = stage_model(cfg).train()
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    image, *mask = example_inputs(cfg, batch)
    inputs = [torch.randn(image.shape)] + [(torch.rand(m.shape) > 0.4).float() for m in mask]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = training_loss(cfg, model, inputs)  # held: its graph keeps the saved tensors alive until we count
    assert loss.requires_grad
    return sum(e.self_cpu_memory_usage for e in prof.events()) + sum(t.numel() * t.element_size() for t in inputs)


def _cfg(overrides: list[str]):
    return compose_config([*overrides, "engine.precision=fp32", "model.drop_path_rate=0"])


def _pair(name: str, labels: tuple[str, str], base: list[str], variant: list[str], batch: int) -> list[dict]:
    """A measured row (ratio = without / with the variant) and a planner-vs-measured row for each side."""
    measured, rows = {}, []
    for label, overrides in zip(labels, (base, base + variant)):
        cfg = _cfg(overrides)
        measured[label] = measured_bytes(cfg, batch)
        planned = saved_activation_bytes(cfg, build_meta_model(cfg), example_inputs(cfg, batch),
                                         "math").saved_bytes
        rows.append(dict(name=f"planner vs measured activations, {label} (MB)", ours=planned / 1e6,
                         baseline=measured[label] / 1e6, ratio=planned / measured[label],
                         how=f"meta-device saved tensors vs profiler bytes after a real CPU forward, fp32, "
                             f"batch {batch}; target 0.9-1.1"))
    without, with_ = (measured[label] for label in labels)
    rows.insert(0, dict(name=f"{name} (MB held for backward)", ours=with_ / 1e6, baseline=without / 1e6,
                        ratio=without / with_,
                        how=f"measured, real CPU forward, fp32, batch {batch}; ratio = without / with"))
    return rows


def run() -> list[dict]:
    rows = _pair("swinv2_tiny 192/w12 activations, per-block checkpointing vs none",
                 ("tiny 192", "tiny 192 checkpointed"), ["model=swinv2_tiny"], ["model.grad_checkpointing=torch"],
                 batch=4)
    rows += _pair("swinv2_tiny 768/w24 activations, sequential attention (stages 1-2) vs none",
                  ("tiny 768", "tiny 768 sequential attn"), TINY_768, [SEQ], batch=1)
    plain, seq = (measure_activations(compose_config(GIANT_1536 + extra)) for extra in ([], [SEQ]))
    rows.append(dict(name="swinv2_giant 1536/w24 peak activations per image, sequential attn vs none (GB)",
                     ours=seq.per_image / 1e9, baseline=plain.per_image / 1e9, ratio=plain.per_image / seq.per_image,
                     how="planner, meta device, bf16, per-block checkpointing (torch_reentrant), GPU "
                         "memory-efficient attention kernel; saved + one block's recompute"))
    return rows


def main() -> None:
    print(format_table([("memory", row) for row in run()]), flush=True)


if __name__ == "__main__":
    main()
