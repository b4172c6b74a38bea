#!/usr/bin/env bash
# The GPU rows of docs/PERFORMANCE.md, on a one-GPU machine that has torch + timm but not the rest of the
# stack: pure-Python wheels of hydra-core, omegaconf, antlr4, deepspeed, webdataset, braceexpand, hjson and
# pydantic are installed from .wheels/ first (`pip download`/`pip wheel` them there on a networked machine).
# From the repo root: bash scripts/bench/gpu/run_all.sh [speed|base] [OUT_DIR]. Each suite fits one device call
# (under 10 minutes): `speed` (the default) the compiled step, host syncs, SwinV2-G MFU and flex attention;
# `base` the eager model and engine rows, the MFU check and the memory planner check.
set -u
suite=${1:-speed}
out=${2:-${OUT:-/tmp}}
export PYTHONPATH=$PWD OMP_NUM_THREADS=8
[ -d .wheels ] && python3 -m pip install -q --no-deps --no-index .wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
if [ "$suite" = speed ]; then
echo "== SwinV2-T train step, ours compiled blocks vs timm eager and timm + torch.compile, 192/w12, batch 128"
timeout 180 python3 -c "
import torch
from scripts.bench.bench_model import bench_compiled
for dtype in (None, torch.bfloat16):
    print(bench_compiled(batch=128, repeats=10, dtype=dtype, device='cuda', modes=('blocks',)))
"
echo "== compile: sync debug mode inside steps (FSDP2, ZeRO-3), SwinV2-G ZeRO-3 bf16 compiled + AdamW MFU"
timeout 180 python3 scripts/bench/gpu/compile_check.py 64  # 53 GB planned (scripts/plan_memory.py --world-size 1)
echo "== fused window attention (attn_impl flex vs plain): exactness on CUDA (outputs and gradients), then timing"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/models/test_attention.py -k cuda \
    || echo "flex exactness check failed or pytest/psutil missing (add their wheels to .wheels/)"
timeout 90 python3 -c "
import torch
from scripts.bench.bench_model import bench_window_attention
for img, window in ((192, 12), (256, 16)):
    for dtype in (None, torch.bfloat16):
        print(bench_window_attention(img, window, batch=64, repeats=10, dtype=dtype, device='cuda'))
"
else
echo "== SwinV2-T train step (fwd+bwd+AdamW), ours vs timm, 192/w12, batch 128"
timeout 150 python3 -c "
import torch
from scripts.bench.bench_model import bench_step
for dtype in (None, torch.bfloat16):
    print(bench_step(batch=128, repeats=10, dtype=dtype, device='cuda'))
"
echo "== engine=fsdp on one GPU (NCCL, bf16)"
timeout 150 python3 scripts/bench/gpu/fsdp_check.py
echo "== GEMM peak, analytic FLOPs vs FlopCounterMode, SwinV2-T MFU"
timeout 120 python3 scripts/bench/gpu/mfu_check.py
echo "== memory planner vs torch.cuda, SwinV2-G MFU"
timeout 300 python3 scripts/bench/gpu/plan_memory_check.py "$out/plan_memory_check.json"
fi
