"""Manual GPU check of scripts/plan_memory.py (not collected by pytest: needs CUDA).

For SimMIM models (and the SwinV2-G fine-tune recipe's classifier) in bf16 on one GPU (the model in bf16 as the DeepSpeed engine runs it, no optimizer):
activation bytes the planner predicts on the meta device (GPU attention kernel) vs torch.cuda's allocated
bytes after the forward, and its peak (saved + one recompute, plus parameter gradients) vs
max_memory_allocated during backward. Then the SwinV2-G fwd+bwd MFU on this GPU, for the GPU-days estimate.

    .venv/bin/python scripts/bench/gpu/plan_memory_check.py OUT_JSON
"""
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from models import simmim_forward_flops  # noqa: E402
from pretrain.activation_checkpointing import apply_grad_checkpointing  # noqa: E402
from pretrain.metrics import peak_flops_per_s  # noqa: E402
from scripts.plan_memory import (build_meta_model, compose_config, example_inputs,  # noqa: E402
                                 saved_activation_bytes, stage_model, training_loss)

CASES = [
    (["model=swinv2_tiny"], 8),
    (["model=swinv2_tiny", "model.grad_checkpointing=torch"], 8),
    (["model=swinv2_tiny", "model.img_size=768", "model.window_size=24", "stage.mask_patch_size=32"], 2),
    (["model=swinv2_tiny", "model.img_size=768", "model.window_size=24", "stage.mask_patch_size=32",
      "model.sequential_attn=[true,true,false,false]"], 2),
    (["model=swinv2_giant", "model.grad_checkpointing=torch"], 4),
    (["model=swinv2_giant", "model.grad_checkpointing=torch", "model.img_size=768", "model.window_size=24",
      "stage.mask_patch_size=32"], 1),
    (["+experiment=swinv2_giant_in1k_ft", "+stage=finetune"], 1),  # the 640/w40 fine-tune recipe
    (["+experiment=swinv2_giant_in1k_ft", "+stage=finetune", "model.grad_checkpointing=none"], 1),
]


def cuda_model(cfg):
    with torch.device("meta"):
        model = stage_model(cfg)  # the classifier for supervised/finetune
    model.to_empty(device="cuda")
    model.init_weights()
    apply_grad_checkpointing(model, cfg.model.grad_checkpointing)
    return model.to(torch.bfloat16).train()


def cuda_inputs(cfg, batch):
    image, *mask = example_inputs(cfg, batch)
    return [torch.randn(image.shape, dtype=image.dtype, device="cuda")] + \
        [(torch.rand(m.shape, device="cuda") > 0.4).float() for m in mask]


def check(overrides, batch):
    cfg = compose_config(overrides + ["model.drop_path_rate=0"])
    meter = saved_activation_bytes(cfg, build_meta_model(cfg), example_inputs(cfg, batch), "efficient")
    model = cuda_model(cfg)
    inputs = cuda_inputs(cfg, batch)
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    training_loss(cfg, model, inputs).backward()  # warm-up: kernels, workspaces
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = training_loss(cfg, model, inputs)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return dict(overrides=overrides, batch=batch, planned_saved=meter.saved_bytes,
                measured_saved=after - base + in_bytes, planned_peak=meter.peak_bytes + grads,
                measured_peak=peak - base + in_bytes)


def giant_mfu(batch=32, steps=3):
    cfg = compose_config(["model=swinv2_giant", "model.grad_checkpointing=torch", "model.drop_path_rate=0"])
    model = cuda_model(cfg)
    inputs = cuda_inputs(cfg, batch)
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        training_loss(cfg, model, inputs).backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    step_s = statistics.median(times)
    flops = 3 * simmim_forward_flops(dataclasses.asdict(cfg.model))
    peak = peak_flops_per_s("cuda", torch.bfloat16)
    return dict(batch=batch, step_s=step_s, img_per_s=batch / step_s, flops_per_img=flops,
                mfu=flops * batch / step_s / peak, peak=peak, device=torch.cuda.get_device_name())


def main(out: str):
    results = {"device": torch.cuda.get_device_name(), "cases": [], "errors": []}
    for overrides, batch in CASES:
        try:
            results["cases"].append(check(overrides, batch))
            print(json.dumps(results["cases"][-1]), flush=True)
        except Exception:  # noqa: BLE001 - report every case
            results["errors"].append([overrides, traceback.format_exc(limit=4)])
            print(results["errors"][-1][1], flush=True)
        torch.cuda.empty_cache()
    try:
        results["giant_mfu"] = giant_mfu()
        print(json.dumps(results["giant_mfu"]), flush=True)
    except Exception:  # noqa: BLE001
        results["errors"].append(["giant_mfu", traceback.format_exc(limit=4)])
        print(results["errors"][-1][1], flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
