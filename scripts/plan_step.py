"""Collective traffic per optimizer step of a training config under DeepSpeed ZeRO-3 and FSDP2, and the step
time it predicts on N GPUs.

    .venv/bin/python -m scripts.plan_step --world-size 8,64,512 +experiment=swinv2_giant_in22k_ext \
        +stage=simmim stages.simmim.stage.global_batch=8192
    .venv/bin/python -m scripts.plan_step --world-size 2 engine=fsdp model.grad_checkpointing=torch

Overrides as for scripts/plan_memory.py; both engines are planned unless one is chosen (engine=...). Bytes are
per rank and per optimizer step (micro batch x accumulation), counted as the size of the whole tensor a
collective gathers or reduces (scripts/comm_meter.py measures the same). Parameters are counted per tensor
from the real model on the meta device.

DeepSpeed ZeRO-3 (deepspeed.runtime.zero, the keys of engine.config.zero_optimization):
- a parameter of at most stage3_param_persistence_threshold elements is persistent: kept whole, never
  gathered in forward or backward, all-gathered once per step after the optimizer updated its partitions;
- every other parameter is all-gathered in the param dtype in each micro batch's forward, padded to
  world x ceil(numel / world). Its next use (checkpoint recompute, backward) gathers it again when it was
  released in between: DeepSpeed keeps it when fewer than stage3_max_reuse_distance elements of parameters
  are used in between (counted along the recorded module trace), or when the prefetcher has already
  looked past that use (modelled as: within stage3_max_live_parameters, its lookahead, when
  stage3_prefetch_bucket_size > 0). Measured exact (tests/scripts/test_plan_step.py) with the prefetcher
  off and with stage3_max_reuse_distance >= stage3_max_live_parameters (DeepSpeed's defaults: 1e9 both);
  a reuse distance below the live limit makes the prefetcher gather some parameters twice (not modelled).
  The prefetcher issues some of the backward's gathers already at the end of the forward: they are listed
  under the use that needs them;
- gradients are reduce-scattered every micro batch in the param dtype (communication_data_type if set);
- the step all-reduces two fp64 scalars (the gradient norm).
The first two steps differ (the first records the module trace, with everything released; the second
checks it); the plan is the steady state from the third.

FSDP2 (torch.distributed.fsdp, pretrain/engine/fsdp.py): one unit per block and one for the rest; each unit's
parameters are all-gathered in the param dtype in every forward, padded per tensor to world x ceil(dim0 /
world) rows, and again in backward when engine.reshard_after_forward (a checkpoint recompute reuses the
backward gather: no extra traffic); gradients are reduce-scattered in fp32 every micro batch; the gradient
norm is one fp32 all-reduce of every tensor's partial norm.

The training loop adds one fp32 all-reduce per micro batch (every rank's loss finite), one int32 per step
(the update-skipped and stop flags), one fp32 per step with resilience.spike_factor > 0, and the metrics summary's two fp64
vectors every logger.every steps (not counted here: a few hundred bytes).

Time: compute = 3 x forward FLOPs x images per rank / (peak x MFU) (pretrain/metrics.py; MFU counts no
recompute, so an assumed MFU already includes it). Communication, ring algorithms: all-gather and
reduce-scatter move (N - 1) / N x bytes through each rank's link, all-reduce twice that. The link is
NVLink within a node and the node's network beyond (per GPU). Overlapped: max(compute, comm); serial:
their sum.
Link defaults (unidirectional, per GPU): NVLink 4 450 GB/s (NVIDIA H100 / H200 SXM data sheets: 900 GB/s
NVLink, both directions); InfiniBand NDR 50 GB/s (one 400 Gb/s ConnectX-7 per GPU, as in a DGX H100).
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import Config, ConfigError, grad_accum_steps
from pretrain.metrics import PEAK_FLOPS, TRAIN_FLOPS_PER_FORWARD
from scripts.comm_meter import dtype_name
from scripts.plan_memory import build_meta_model, compose_config, describe, ds_value, example_inputs, param_dtype

GB = 1e9
# deepspeed.runtime.zero.config defaults of the keys only this plan reads (plan_memory has the others)
DS_TRACE_DEFAULTS = {"stage3_max_reuse_distance": int(1e9), "stage3_max_live_parameters": int(1e9)}
# stage3.py's step all-reduces two fp64 scalars for the gradient norm (zero/utils.py get_norm_dtype: fp64);
# two, as a run counts them (tests/scripts/test_plan_step.py)
DS_STEP_ALL_REDUCES = 2
NVLINK_GBPS = 450.0
IB_GBPS = 50.0


@dataclass
class Row:
    phase: str  # loop (the trainer's own), forward, backward, step
    kind: str  # all_gather | reduce_scatter | all_reduce
    dtype: str
    what: str
    bytes: float


def dtype_bytes(name: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "int32": 4}[name]


# ---------------------------------------------------------------------------------------- module trace

@dataclass
class Use:
    phase: str  # forward | recompute | backward
    params: list[nn.Parameter]  # its module's own and those it reads from uncalled children


def forward_order(cfg: Config, model: nn.Module) -> list[tuple[list[nn.Parameter], int | None]]:
    """(parameters, block index or None) of every module call, in forward order: the order of the
    pre-forward hooks DeepSpeed fetches parameters in, from a meta forward. A call uses its own parameters
    and those of children it reads without calling them (the attention's fused qkv weight): DeepSpeed
    gathers these on access and registers them with the running module (external parameters)."""
    block_of = {m: b for b, blk in enumerate(model.blocks()) for m in blk.modules()}
    calls: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, _: calls.append(module)) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*example_inputs(cfg, 1))
    finally:
        for h in handles:
            h.remove()
    called = set(calls)
    modules = dict(model.named_modules())
    uses = {m: list(m.parameters(recurse=False)) for m in called}
    for name, m in modules.items():
        if m not in called and name:
            parent = name
            while modules[parent] not in called:
                parent = parent.rpartition(".")[0]
            uses[modules[parent]] += m.parameters(recurse=False)
    return [(uses[m], block_of.get(m)) for m in calls if uses[m]]


def micro_step_trace(order, checkpointed: bool) -> list[Use]:
    """Forward, then backward in reverse; a checkpointed block replays its forward (the recompute) as its
    backward begins."""
    trace = [Use("forward", own) for own, _ in order]
    replayed = set()
    for own, block in reversed(order):
        if checkpointed and block is not None and block not in replayed:
            replayed.add(block)
            trace += [Use("recompute", o) for o, b in order if b == block]
        trace.append(Use("backward", own))
    return trace


# ---------------------------------------------------------------------------------------------- engines

def zero3_rows(cfg: Config, model: nn.Module, world: int, accum: int) -> list[Row]:
    eng = cfg.engine
    p = dtype_name(param_dtype(cfg))
    comm = eng.config.get("communication_data_type") or p
    if comm not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"engine.config.communication_data_type: one of fp16, bf16, fp32, got {comm!r}")
    zero = eng.config.get("zero_optimization", {})
    threshold = ds_value(eng, "stage3_param_persistence_threshold")
    lookahead = int(zero.get("stage3_max_live_parameters", DS_TRACE_DEFAULTS["stage3_max_live_parameters"]))
    keep_within = max(int(zero.get("stage3_max_reuse_distance", DS_TRACE_DEFAULTS["stage3_max_reuse_distance"])),
                      lookahead if ds_value(eng, "stage3_prefetch_bucket_size") > 0 else 0)

    def padded(t: torch.Tensor) -> int:
        return world * math.ceil(t.numel() / world)

    gathered = defaultdict(int)  # (phase of the use, why) -> elements, one micro batch
    trace = micro_step_trace(forward_order(cfg, model), cfg.model.grad_checkpointing != "none")
    last_use: dict[nn.Parameter, int] = {}
    numel_before = [0]  # elements of the trace's parameters before each use: the reuse distance's scale
    for use in trace:
        numel_before.append(numel_before[-1] + sum(t.numel() for t in use.params))
    for i, use in enumerate(trace):
        for t in use.params:
            if t.numel() <= threshold:
                continue
            j = last_use.get(t)
            if j is None:
                gathered[use.phase, "parameters"] += padded(t)
            elif numel_before[i] - numel_before[j + 1] >= keep_within:
                why = "re-gather for the recompute" if use.phase == "recompute" else "re-gather (released after use)"
                gathered["backward", why] += padded(t)
            last_use[t] = i
    params = list(model.parameters())
    rows = [Row(phase, "all_gather", p, why, accum * n * dtype_bytes(p)) for (phase, why), n in gathered.items()]
    rows.append(Row("backward", "reduce_scatter", comm, "gradients",
                    accum * sum(padded(t) for t in params if t.requires_grad) * dtype_bytes(comm)))
    rows.append(Row("step", "all_gather", p, "persistent parameters, after the update",
                    sum(padded(t) for t in params if t.numel() <= threshold) * dtype_bytes(p)))
    rows.append(Row("step", "all_reduce", "fp64", "gradient norm (fp64 scalars)", DS_STEP_ALL_REDUCES * 8))
    return rows


def fsdp_rows(cfg: Config, model: nn.Module, world: int, accum: int) -> list[Row]:
    p = dtype_name(param_dtype(cfg))
    params = list(model.parameters())

    def padded(t: torch.Tensor) -> int:
        dim0 = t.shape[0] if t.dim() else 1
        return world * math.ceil(dim0 / world) * math.prod(t.shape[1:])

    numel = sum(padded(t) for t in params)
    rows = [Row("forward", "all_gather", p, "parameters", accum * numel * dtype_bytes(p))]
    if cfg.engine.reshard_after_forward:
        rows.append(Row("backward", "all_gather", p, "re-gather (reshard after forward)",
                        accum * numel * dtype_bytes(p)))
    trainable = [t for t in params if t.requires_grad]
    rows.append(Row("backward", "reduce_scatter", "fp32", "gradients", accum * sum(map(padded, trainable)) * 4))
    rows.append(Row("step", "all_reduce", "fp32", "gradient norm (one partial norm per tensor)", 4 * len(trainable)))
    return rows


def loop_rows(cfg: Config, accum: int) -> list[Row]:
    rows = [Row("loop", "all_reduce", "fp32", "loss finite, every micro batch", 4 * accum),
            Row("loop", "all_reduce", "int32", "step flags (update skipped, stop)", 4)]
    if cfg.resilience.spike_factor > 0:
        rows.append(Row("loop", "all_reduce", "fp32", "mean loss (spike guard)", 4))
    return rows


def traffic(cfg: Config, world: int) -> list[Row]:
    """Every collective of one optimizer step on one rank (steady state)."""
    if cfg.engine.name == "deepspeed" and cfg.engine.zero_stage != 3:
        raise ConfigError(f"engine.zero_stage: the step plan models ZeRO-3 and FSDP2, got {cfg.engine.zero_stage}")
    accum = grad_accum_steps(cfg, world)
    if accum < 1 or accum * cfg.stage.micro_batch * world != cfg.stage.global_batch:
        raise ConfigError(f"stage.global_batch: {cfg.stage.global_batch} is not a multiple of stage.micro_batch "
                          f"{cfg.stage.micro_batch} x {world} GPUs")
    model = build_meta_model(cfg)
    engine_rows = zero3_rows if cfg.engine.name == "deepspeed" else fsdp_rows
    return engine_rows(cfg, model, world, accum) + loop_rows(cfg, accum)


def totals(rows: list[Row]) -> dict[tuple[str, str, str], float]:
    """Bytes by (phase, collective, dtype), the granularity comm_meter measures at."""
    out = defaultdict(float)
    for r in rows:
        out[r.phase, r.kind, r.dtype] += r.bytes
    return dict(out)


# ------------------------------------------------------------------------------------------------- time

@dataclass
class StepTime:
    compute_s: float
    comm_s: float

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def serial_s(self) -> float:
        return self.compute_s + self.comm_s


def link_seconds(rows: list[Row], world: int, bytes_per_s: float) -> float:
    ring = (world - 1) / world
    return sum(r.bytes * ring * (2 if r.kind == "all_reduce" else 1) for r in rows) / bytes_per_s


def step_time(cfg: Config, rows: list[Row], world: int, peak: float, mfu: float, bytes_per_s: float) -> StepTime:
    from pretrain.preflight import Start
    from pretrain.stages import build_stage
    images = cfg.stage.micro_batch * grad_accum_steps(cfg, world)
    flops = build_stage(Start(cfg), ctx=None).model.flops_per_image()
    return StepTime(TRAIN_FLOPS_PER_FORWARD * flops * images / (peak * mfu), link_seconds(rows, world, bytes_per_s))


# -------------------------------------------------------------------------------------------------- CLI

def engine_configs(overrides: list[str]) -> list[Config]:
    if any(o.startswith("engine=") for o in overrides):
        return [compose_config(overrides)]
    return [compose_config([*overrides, f"engine={name}"]) for name in ("deepspeed", "fsdp")]


def format_rows(rows: list[Row]) -> str:
    lines = [f"    {'phase':<9}{'collective':<16}{'dtype':<7}{'GB / rank / step':>17}  what"]
    lines += [f"    {r.phase:<9}{r.kind:<16}{r.dtype:<7}{r.bytes / GB:17.4f}  {r.what}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=lambda s: [int(n) for n in s.split(",")], default=[8],
                        help="GPUs (data-parallel ranks), comma-separated: 8,64,512")
    parser.add_argument("--gpu", choices=sorted(PEAK_FLOPS), default="H100",
                        help="peak FLOP/s from pretrain.metrics.PEAK_FLOPS (data sheets, dense)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs on one NVLink domain")
    parser.add_argument("--nvlink-gbps", type=float, default=NVLINK_GBPS, help="GB/s per GPU, one direction")
    parser.add_argument("--ib-gbps", type=float, default=IB_GBPS, help="GB/s per GPU between nodes, one direction")
    parser.add_argument("--details", action="store_true", help="every collective, not only the summary")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/pretrain.py")
    args = parser.parse_args(argv)
    summary = [f"{'GPUs':>5} {'engine':<7}{'accum':>6}{'all-gather GB':>15}{'reduce-scatter GB':>19}"
               f"{'compute s':>11}{'comm s':>9}{'overlapped s':>14}{'serial s':>10}"]
    for cfg in engine_configs(args.overrides):
        name = "ZeRO-3" if cfg.engine.name == "deepspeed" else "FSDP2"
        peak = PEAK_FLOPS[args.gpu][param_dtype(cfg)]
        for world in args.world_size:
            rows = traffic(cfg, world)
            link = (args.nvlink_gbps if world <= args.gpus_per_node else args.ib_gbps) * GB
            t = step_time(cfg, rows, world, peak, args.mfu, link)
            if args.details:
                print(f"{describe(cfg)}, {world} GPUs, accumulation {grad_accum_steps(cfg, world)}")
                print(format_rows(rows))
            kind_gb = {k: sum(r.bytes for r in rows if r.kind == k) / GB for k in ("all_gather", "reduce_scatter")}
            summary.append(f"{world:>5} {name:<7}{grad_accum_steps(cfg, world):>6}{kind_gb['all_gather']:>15.2f}"
                           f"{kind_gb['reduce_scatter']:>19.2f}{t.compute_s:>11.3f}{t.comm_s:>9.3f}"
                           f"{t.overlapped_s:>14.3f}{t.serial_s:>10.3f}")
    print(f"{args.gpu}, MFU {args.mfu:g}, NVLink {args.nvlink_gbps:g} GB/s within {args.gpus_per_node} GPUs, "
          f"{args.ib_gbps:g} GB/s per GPU beyond; bytes per rank per optimizer step")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
