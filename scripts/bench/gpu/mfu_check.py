"""Manual check on a GPU machine (no pytest: CI has no GPU): the peak table against a measured matmul, the
analytic FLOPs against FlopCounterMode on CUDA, and TrainMeter's MFU for SwinV2-T bf16 training.

    PYTHONPATH=. python3 scripts/bench/gpu/mfu_check.py
"""
import time, torch
from torch.utils.flop_counter import FlopCounterMode
from pretrain.metrics import measure_gemm_peak, peak_flops_per_s, TrainMeter
from models import SwinTransformerV2, swinv2_forward_flops

dev = torch.device("cuda")
print("device:", torch.cuda.get_device_name(dev), "torch", torch.__version__)
for dt in (torch.bfloat16, torch.float32):
    t = time.time(); meas = measure_gemm_peak(dt, "cuda"); el = time.time() - t
    table = peak_flops_per_s(dev, dt)
    print(f"{dt}: table {table/1e12:.1f} TFLOP/s, measured 8192^3 matmul {meas/1e12:.1f} TFLOP/s ({meas/table:.0%} of table), {el:.1f}s")

tiny = dict(img_size=192, patch_size=4, in_chans=3, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
            window_size=12, mlp_ratio=4.0)
model = SwinTransformerV2(**tiny, num_classes=1000).to(dev)
flops = swinv2_forward_flops(tiny, 1000)
x = torch.randn(1, 3, 192, 192, device=dev)
with FlopCounterMode(display=False) as fc:
    model(x)
print(f"SwinV2-T fwd GFLOP/img: analytic {flops/1e9:.3f}, FlopCounterMode(cuda, batch 1) {fc.get_total_flops()/1e9:.3f}")

opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
B = 128
x = torch.randn(B, 3, 192, 192, device=dev)
y = torch.randint(0, 1000, (B,), device=dev)
meter = TrainMeter(flops_per_image=flops, peak_flops=peak_flops_per_s(dev, torch.bfloat16), world_size=1, device=dev)
def step():
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss
for _ in range(3):
    step()
torch.cuda.synchronize()
for i in range(10):
    t = time.perf_counter(); loss = step(); torch.cuda.synchronize()
    meter.update(loss=loss, batch_size=B, step_s=time.perf_counter() - t, data_wait_s=0.0, lrs={"all": 1e-4})
s = meter.summary()
print(f"SwinV2-T bf16 autocast, eager, batch {B}: {s['perf/img_per_s']:.0f} img/s, {s['perf/tflops_per_device']:.1f} TFLOP/s, MFU {s['perf/mfu']:.1%}, peak mem {s['perf/peak_mem_bytes']/2**30:.1f} GiB, step {s['perf/step_time_s']*1e3:.0f} ms")
