"""Training-health numbers: throughput, TFLOP/s, MFU, memory, per-window loss and lr.

MFU (model FLOPs utilisation), nanoGPT/PaLM style, written out:
    flops_per_img_train = 3 * forward_flops_per_img   # backward costs 2x forward; recomputation from
                                                      # activation checkpointing is not counted (model FLOPs)
    achieved_per_device = flops_per_img_train * img_per_s / world_size
    mfu = achieved_per_device / peak_flops_per_device
The forward FLOPs come from models.flops (2 FLOPs per multiply-add), the peak from the spec-sheet table
below on GPUs and from a measured matmul on CPU.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from typing import Mapping

import torch
import torch.distributed as dist

TRAIN_FLOPS_PER_FORWARD = 3
# Loader stats that are a position, not a count: the same on every rank, so not summed over ranks.
POSITION_STATS = {"epoch"}

# Dense (no structured sparsity) peak FLOP/s per GPU from NVIDIA's data sheets. fp32 is the plain CUDA-core
# rate: torch runs fp32 matmuls without TF32 unless the user allows it. Most specific names first.
#   A100: "NVIDIA A100 Tensor Core GPU" data sheet: BF16 312 TFLOPS, FP32 19.5 TFLOPS (SXM and PCIe).
#   H100 SXM: "NVIDIA H100 Tensor Core GPU" data sheet: BF16 1,979 TFLOPS with sparsity (989.5 dense),
#     FP32 67 TFLOPS; H100 PCIe: 1,513 sparse (756.5 dense), FP32 51; H100 NVL: 1,671 sparse (835.5 dense),
#     FP32 60.
#   H200 SXM: "NVIDIA H200 Tensor Core GPU" data sheet: BF16 1,979 sparse (989.5 dense), FP32 67;
#     H200 NVL: 1,671 sparse (835.5 dense), FP32 60.
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "H200 NVL": {torch.bfloat16: 835.5e12, torch.float32: 60e12},
    "H200": {torch.bfloat16: 989.5e12, torch.float32: 67e12},
    "H100 NVL": {torch.bfloat16: 835.5e12, torch.float32: 60e12},
    "H100 PCIe": {torch.bfloat16: 756.5e12, torch.float32: 51e12},
    "H100": {torch.bfloat16: 989.5e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float32: 19.5e12},
}


@functools.cache
def measure_gemm_peak(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best FLOP/s of a large square matmul on `device`, measured once per process (about a second)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for _ in range(6):  # the first rep is warm-up; the best of the rest is the least disturbed
        if device != "cpu":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_s(device: torch.device | str, dtype: torch.dtype) -> float:
    """Spec-sheet peak for a known GPU, else the measured matmul peak of this device."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_FLOPS.items():
            if key in name and dtype in peaks:
                return peaks[dtype]
        return measure_gemm_peak(dtype, str(device))
    return measure_gemm_peak(dtype, "cpu")


def train_flops_per_s(flops_per_image: float, img_per_s_per_device: float) -> float:
    """Achieved model FLOP/s of one device: forward FLOPs per image x 3 (forward + backward) x images/s."""
    return TRAIN_FLOPS_PER_FORWARD * flops_per_image * img_per_s_per_device


def mfu(flops_per_image: float, img_per_s_per_device: float, peak: float) -> float:
    return train_flops_per_s(flops_per_image, img_per_s_per_device) / peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrainMeter:
    """Collects per-step numbers on every rank; `summary()` turns a window of steps into the metric dict.

    `summary()` is collective (it all-reduces a few numbers), so every rank calls it at the same steps.
    Loss values may stay on the device: they are read once per window, not once per step.
    """

    def __init__(self, *, flops_per_image: float, peak_flops: float, world_size: int, device: torch.device):
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.images = 0
        self.step_s = 0.0
        self.data_wait_s = 0.0
        self.loss_steps = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.extras_sum: dict[str, torch.Tensor | float] = {}
        self.grad_norms: list[torch.Tensor | float] = []
        self.lrs: dict[str, float] = {}

    def update(
        self,
        *,
        loss: torch.Tensor | float,
        batch_size: int,
        step_s: float,
        data_wait_s: float,
        grad_norm: torch.Tensor | float | None = None,
        lrs: Mapping[str, float] | None = None,
        extras: Mapping[str, torch.Tensor | float] | None = None,
        skipped: bool = False,
    ) -> None:
        """One optimizer step on this rank: `batch_size` images per rank, `step_s` includes `data_wait_s`."""
        self.steps += 1
        self.images += batch_size
        self.step_s += step_s
        self.data_wait_s += data_wait_s
        if skipped:  # a non-finite step: the loss curve stays finite (StepGuard counts these steps)
            return
        loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        self.loss_sum = self.loss_sum + loss
        self.loss_steps += 1
        for name, value in (extras or {}).items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.extras_sum[name] = self.extras_sum.get(name, 0.0) + value
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm)
        self.lrs = dict(lrs or {})

    def summary(self, loader_stats: Mapping[str, int] | None = None) -> dict[str, float]:
        """Metrics of the steps since the last summary, averaged (loss) or summed (counts) over ranks."""
        extras = sorted(self.extras_sum)
        n = self.loss_steps or math.nan  # a window of only skipped steps has no loss to show
        means = [self.loss_sum / n, *(self.extras_sum[k] / n for k in extras)]
        if self.grad_norms:
            means.append(sum(self.grad_norms) / len(self.grad_norms))
        means += [self.step_s / max(self.steps, 1), self.data_wait_s / max(self.step_s, 1e-12)]
        stats = loader_stats or {}
        counts = sorted(k for k in stats if k not in POSITION_STATS)
        positions = sorted(k for k in stats if k in POSITION_STATS)
        sums = [self.images, *(stats[k] for k in counts)]
        maxes = [peak_memory_bytes(self.device), *(stats[k] for k in positions)]
        means, sums, maxes = self._all_reduce(means, sums, maxes)

        it = iter(means)
        out = {"train/loss": next(it), **{f"train/{k}": next(it) for k in extras}}
        if self.grad_norms:
            out["train/grad_norm"] = next(it)
        step_time_s, data_wait_frac = next(it), next(it)
        out.update({f"lr/{family}": lr for family, lr in self.lrs.items()})
        img_per_s = sums[0] / max(step_time_s * self.steps, 1e-12)
        img_per_s_per_device = img_per_s / self.world_size
        out.update({
            "perf/img_per_s": img_per_s,
            "perf/tflops_per_device": train_flops_per_s(self.flops_per_image, img_per_s_per_device) / 1e12,
            "perf/mfu": mfu(self.flops_per_image, img_per_s_per_device, self.peak_flops),
            "perf/data_wait_frac": data_wait_frac,
            "perf/step_time_s": step_time_s,
            "perf/peak_mem_bytes": int(maxes[0]),
        })
        out.update({f"data/{k}": int(v) for k, v in zip(counts + positions, sums[1:] + maxes[1:])})
        self._reset()
        return out

    def _all_reduce(self, means: list, sums: list, maxes: list) -> tuple[list[float], list[float], list[float]]:
        """One float64 vector per reduction, so a summary costs two small collectives."""
        mean_sum = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in means + sums])
        maxes = torch.tensor(maxes, dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(mean_sum)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            mean_sum[: len(means)] /= self.world_size
        values = mean_sum.tolist()
        return values[: len(means)], values[len(means) :], maxes.tolist()
