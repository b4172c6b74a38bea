"""SwinV2 model benchmarks: this SwinV2-T vs timm's SwinV2 port, and sequential attention memory.

1. One training step (forward + backward + AdamW) of SwinV2-T at 192px/window 12, ours (both attention
   paths, sdpa and plain) and timm's side by side, repeats interleaved, medians; fp32 and bf16 autocast.
   Ratio = timm step time / our step time (> 1: ours is faster).
   Compiled: ours with model.compile=blocks and =full (pretrain.compile; the faster attention path of the device) against
   timm eager and timm under torch.compile of the whole model (the same default mode), with each one's
   compile time (its first step less a median step); fused AdamW for all, as the engines build it.
2. Peak memory of one forward + backward of a stage-1 SwinV2-T block (shifted, with the mask) at
   1536px/window 32, with sequential attention vs batched, measured by torch's MemTracker on fake tensors
   (nothing is allocated). Ratio = batched peak / sequential peak.
3. Fused window attention: a shifted stage-1 SwinV2-T block at 192/w12 and 256/w16 with attn_impl flex vs
   plain, both torch.compile'd the same way, repeats interleaved, medians; fp32 and bf16 autocast. Forward +
   backward on GPU, forward only on CPU (torch's FlexAttention has no CPU backward).
   Ratio = plain time / flex time (> 1: flex is faster).

    .venv/bin/python -m scripts.bench.bench_model [--batch 8] [--repeats 5] [--device cpu|cuda]
    .venv/bin/python -m scripts.bench.bench_model --profile fp32|bf16    (top ops of the compiled steps instead)
`run()` returns the rows for the scripts.bench aggregator.
"""
import argparse
import statistics
import time

import torch

from models.swinv2 import SwinTransformerBlock, SwinTransformerV2, init_module
from pretrain.compile import apply_compile
from scripts.bench import format_table

TINY = dict(img_size=192, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
            window_size=12, mlp_ratio=4.0, drop_path_rate=0.2)


def _timm_tiny(num_classes: int):
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
    return TimmSwinV2(num_classes=num_classes, **TINY)


def _step_fn(model, batch: int, dtype: torch.dtype | None, device: str, fused: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    x = torch.randn(batch, 3, TINY["img_size"], TINY["img_size"], device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def _interleaved(models: dict, batch: int, repeats: int, dtype: torch.dtype | None, device: str,
                 fused: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Each model's first step (s) and median step (s): two warm-up steps (allocator, kernel selection, AdamW
    state, compilation), then `repeats` steps taken in turn, so that load on a shared machine hits all alike.
    AdamW is torch's default implementation, or its fused kernel for every model."""
    steps = {name: _step_fn(model.to(device).train(), batch, dtype, device, fused) for name, model in models.items()}
    first, times = {}, {name: [] for name in steps}
    for warm_up in range(2):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if not warm_up:
                first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return first, {name: statistics.median(t) for name, t in times.items()}


def bench_step(batch: int, repeats: int, dtype: torch.dtype | None, device: str) -> list[dict]:
    """Both attention paths of ours and timm's model, stepped in turn; one row per path of ours."""
    torch.manual_seed(0)
    models = {impl: SwinTransformerV2(num_classes=1000, attn_impl=impl, **TINY) for impl in ("sdpa", "plain")}
    models["timm"] = _timm_tiny(1000)
    _, median = _interleaved(models, batch, repeats, dtype, device)
    timm_s = median["timm"]
    precision = "bf16 autocast" if dtype is not None else "fp32"
    rows = []
    for impl in ("sdpa", "plain"):
        ours_s = median[impl]
        rows.append(dict(name=f"swinv2_tiny train step 192/w12 b{batch} {precision} {device} attn={impl} (img/s)",
                         ours=batch / ours_s, baseline=batch / timm_s, ratio=timm_s / ours_s,
                         how=f"fwd+bwd+AdamW, median of {repeats} interleaved steps vs timm {_timm_version()} "
                             f"SwinTransformerV2, {torch.get_num_threads()} threads"))
    return rows


def bench_compiled(batch: int, repeats: int, dtype: torch.dtype | None, device: str,
                   modes: tuple[str, ...] = ("blocks", "full")) -> list[dict]:
    """Ours compiled (each of `modes`) against timm eager and timm compiled whole, stepped in turn, all with
    the fused AdamW the engines build (pretrain.optim), so that the models are what differs."""
    impl = "sdpa" if device == "cuda" else "plain"  # the faster path of each device (the rows above)
    models = {}
    for mode in modes:
        torch.manual_seed(0)
        models[mode] = SwinTransformerV2(num_classes=1000, attn_impl=impl, **TINY)
        apply_compile(models[mode], mode)
    models.update(timm=_timm_tiny(1000), timm_compiled=torch.compile(_timm_tiny(1000)))
    first, median = _interleaved(models, batch, repeats, dtype, device, fused=True)
    compile_s = {name: first[name] - median[name] for name in (*modes, "timm_compiled")}
    precision = "bf16 autocast" if dtype is not None else "fp32"
    compiles = ", ".join(f"ours {mode} {compile_s[mode]:.0f} s" for mode in modes)
    how = (f"fwd+bwd+fused AdamW, median of {repeats} interleaved steps, {torch.get_num_threads()} threads; "
           f"compile (first step less a median one): {compiles}, timm {compile_s['timm_compiled']:.0f} s")
    return [dict(name=f"swinv2_tiny train step 192/w12 b{batch} {precision} {device} compiled {mode} attn={impl} vs "
                      f"timm {baseline} (img/s)", ours=batch / median[mode], baseline=batch / median[key],
                 ratio=median[key] / median[mode], how=how)
            for mode in modes for key, baseline in (("timm", "eager"), ("timm_compiled", "+ torch.compile"))]


def profile_compiled(batch: int, dtype: torch.dtype | None, device: str, steps: int = 2, top: int = 8) -> str:
    """Where a compiled step's time goes: torch.profiler's top ops by self time over `steps` steps of ours
    (compile=blocks and =full) and of timm + torch.compile, each after three warm-up steps."""
    from torch.profiler import ProfilerActivity, profile
    tables = []
    for name in ("blocks", "full", "timm + torch.compile"):
        torch.manual_seed(0)
        if name == "timm + torch.compile":
            model = torch.compile(_timm_tiny(1000))
        else:
            model = SwinTransformerV2(num_classes=1000, attn_impl="sdpa" if device == "cuda" else "plain", **TINY)
            apply_compile(model, name)
        step = _step_fn(model.to(device).train(), batch, dtype, device, fused=True)
        for _ in range(3):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        tables.append(f"{name}, {steps} steps:\n" + prof.key_averages().table(sort_by=sort, row_limit=top,
                                                                           max_name_column_width=50))
    return "\n".join(tables)


def _timm_version() -> str:
    import timm
    return timm.__version__


def block_peak_bytes(sequential: bool, img_size: int = 1536, window: int = 32, chunk: int = 16) -> int:
    """Peak bytes of forward + backward of the first shifted stage-1 block of SwinV2-T, batch 1."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    side = img_size // TINY["patch_size"]
    with FakeTensorMode():
        block = SwinTransformerBlock(96, side, 3, window, shift=True, pretrained_window_size=0, mlp_ratio=4.0,
                                     drop_path=0.0, extra_norm=False, attn_impl="sdpa", sequential=sequential,
                                     chunk_size=chunk)
        block.init_buffers()
        x = torch.randn(1, side * side, 96, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(block, x)
        with tracker:
            block(x).sum().backward()
        return tracker.get_tracker_snapshot("peak")[x.device]["Total"]


def bench_memory() -> dict:
    batched, sequential = block_peak_bytes(False), block_peak_bytes(True)
    return dict(name="swinv2_tiny stage-1 block 1536/w32 peak memory (MiB)",
                ours=sequential / 2 ** 20, baseline=batched / 2 ** 20, ratio=batched / sequential,
                how="fwd+bwd, batch 1, fp32, shifted block; MemTracker on fake tensors; ours = sequential "
                    "attention (16-window chunks), baseline = batched attention")


def _stage1_block(img_size: int, window: int, attn_impl: str) -> SwinTransformerBlock:
    """SwinV2-T's first shifted block (C=96, 3 heads), initialised as the model initialises it."""
    side = img_size // TINY["patch_size"]
    block = SwinTransformerBlock(96, side, 3, window, shift=True, pretrained_window_size=0, mlp_ratio=4.0,
                                 drop_path=0.0, extra_norm=False, attn_impl=attn_impl, sequential=False, chunk_size=1)
    for m in block.modules():
        init_module(m)
    block.attn.init_buffers()
    block.init_buffers()
    return block


def bench_window_attention(img_size: int, window: int, batch: int, repeats: int, dtype: torch.dtype | None,
                           device: str) -> dict:
    """Flex vs plain attention in the same torch.compile'd block, called in turn; medians."""
    torch.manual_seed(0)
    train = device != "cpu"  # torch's FlexAttention has no CPU backward
    blocks = {impl: torch.compile(_stage1_block(img_size, window, impl).to(device), dynamic=False)
              for impl in ("flex", "plain")}
    blocks["flex"].load_state_dict(blocks["plain"].state_dict())
    x = torch.randn(batch, (img_size // TINY["patch_size"]) ** 2, 96, device=device, requires_grad=train)

    def call(block):
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None), \
                torch.set_grad_enabled(train):
            out = block(x)
        if train:
            out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    times = {impl: [] for impl in blocks}
    for _ in range(2):  # compile, then warm up
        for block in blocks.values():
            call(block)
    for _ in range(repeats):
        for impl, block in blocks.items():
            t0 = time.perf_counter()
            call(block)
            times[impl].append(time.perf_counter() - t0)
    flex_s, plain_s = statistics.median(times["flex"]), statistics.median(times["plain"])
    precision = "bf16 autocast" if dtype is not None else "fp32"
    return dict(name=f"swinv2_tiny stage-1 block {img_size}/w{window} b{batch} {precision} {device} attn flex vs "
                     f"plain (ms)", ours=flex_s * 1e3, baseline=plain_s * 1e3, ratio=plain_s / flex_s,
                how=f"{'fwd+bwd' if train else 'fwd (no CPU flex backward)'}, shifted block, both "
                    f"torch.compile'd, median of {repeats} interleaved calls, {torch.get_num_threads()} threads")


def run(batch: int = 8, repeats: int = 5, device: str | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dtype in (None, torch.bfloat16):
        rows += bench_step(batch, repeats, dtype, device) + bench_compiled(batch, repeats, dtype, device)
    rows += [bench_window_attention(img, window, batch, 2 * repeats, dtype, device)
             for img, window in ((192, 12), (256, 16)) for dtype in (None, torch.bfloat16)]
    return rows + [bench_memory()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--profile", choices=("fp32", "bf16"), help="print the compiled steps' top ops instead")
    args = parser.parse_args()
    if args.profile:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(profile_compiled(args.batch, torch.bfloat16 if args.profile == "bf16" else None, device), flush=True)
        return
    print(format_table([("model", row) for row in run(args.batch, args.repeats, args.device)]), flush=True)


if __name__ == "__main__":
    main()
