"""MFU arithmetic, the peak table and TrainMeter's per-window summary (single process)."""

import math

import pytest
import torch

from pretrain.metrics import PEAK_FLOPS, TrainMeter, measure_gemm_peak, mfu, peak_flops_per_s


def test_mfu_is_three_forward_passes_over_peak():
    # 7 GFLOP forward, 100 img/s on a device of 2.1 TFLOP/s peak: 3 x 7e9 x 100 = 2.1e12 -> 100 %.
    assert mfu(7e9, 100.0, 2.1e12) == pytest.approx(1.0)


def test_peak_table_has_bf16_and_fp32_for_every_gpu():
    for name in ("A100", "H100", "H200"):
        peaks = PEAK_FLOPS[name]
        assert peaks[torch.bfloat16] > 10 * peaks[torch.float32]  # tensor cores vs CUDA cores
    assert PEAK_FLOPS["H100"][torch.bfloat16] == 989.5e12


def test_cpu_peak_is_measured_once_per_process():
    first = peak_flops_per_s("cpu", torch.float32)
    assert math.isfinite(first) and first > 0  # a real matmul ran (its speed depends on the machine's load)
    assert measure_gemm_peak(torch.float32, "cpu") == first  # cached, not re-measured


def make_meter(world_size=1):
    return TrainMeter(flops_per_image=1e9, peak_flops=1e12, world_size=world_size, device=torch.device("cpu"))


def test_summary_averages_a_window_and_resets():
    meter = make_meter()
    for loss in (1.0, 3.0):
        meter.update(loss=torch.tensor(loss), batch_size=8, step_s=2.0, data_wait_s=0.5, grad_norm=4.0,
                     lrs={"backbone": 1e-4, "head": 1e-3}, extras={"top1": 0.5})
    out = meter.summary({"skipped_samples": 2, "corrupt_samples": 1})
    assert out["train/loss"] == 2.0 and out["train/top1"] == 0.5 and out["train/grad_norm"] == 4.0
    assert out["lr/backbone"] == 1e-4 and out["lr/head"] == 1e-3
    assert out["perf/img_per_s"] == 4.0 and out["perf/step_time_s"] == 2.0
    assert out["perf/data_wait_frac"] == 0.25
    assert out["perf/tflops_per_device"] == pytest.approx(3 * 1e9 * 4.0 / 1e12)
    assert out["perf/mfu"] == pytest.approx(3 * 1e9 * 4.0 / 1e12)
    assert out["data/skipped_samples"] == 2 and out["data/corrupt_samples"] == 1
    assert out["perf/peak_mem_bytes"] > 10 * 2**20  # this process's max RSS
    meter.update(loss=5.0, batch_size=8, step_s=1.0, data_wait_s=0.0)
    assert meter.summary()["train/loss"] == 5.0  # the previous window is gone


def test_skipped_steps_keep_the_loss_finite():
    meter = make_meter()
    meter.update(loss=1.0, batch_size=8, step_s=1.0, data_wait_s=0.0)
    meter.update(loss=float("nan"), batch_size=8, step_s=1.0, data_wait_s=0.0, skipped=True)
    out = meter.summary()
    assert out["train/loss"] == 1.0
    assert out["perf/img_per_s"] == 8.0  # a skipped step still cost its time
    meter.update(loss=float("nan"), batch_size=8, step_s=1.0, data_wait_s=0.0, skipped=True)
    assert math.isnan(meter.summary()["train/loss"])  # no step counted: no loss, not a fake 0
