"""Per-GPU memory plan of a training config, and the largest micro batch that fits a GPU.

    .venv/bin/python scripts/plan_memory.py [--world-size 64] [--gpu-mem-gb 40] [Hydra overrides ...]
    .venv/bin/python scripts/plan_memory.py --world-size 64 --gpu-mem-gb 40 model=swinv2_giant +stage=simmim
    .venv/bin/python scripts/plan_memory.py --world-size 64 --gpu-mem-gb 80 model=swinv2_giant \
        model.img_size=1536 model.window_size=24 stage.mask_patch_size=32 \
        'model.sequential_attn=[true,true,false,false]'
(1536/w32 does not build: stage 4's 48x48 map is not divisible by 32.)

The overrides compose the project's conf/ tree exactly as launch/pretrain.py does (`+stage=simmim` when no
stage is given). What is counted, per rank:
- parameters, gradients, optimizer state: from the real model built on the meta device (so per tensor,
  nothing guessed), partitioned by the engine's rules (below);
- buffers: the model's registered buffers (position tables and indices, shift regions), never sharded;
- activations: the bytes of the distinct storages autograd saves for backward in one forward of the real
  model on the meta device (saved_tensors_hooks; parameters excluded: the engine owns them), plus the
  largest recompute of one checkpointed region (a block under activation checkpointing, one window chunk
  under sequential attention) that backward holds on top. Measured at micro batch 1 and 2; linear in between;
- workspace: the engine's communication buffers and gathered parameters, from its documented defaults
  (an estimate, not a measurement). CUDA context and allocator fragmentation are left to `--reserve-gb`.

Engine rules (bytes per element: p = compute dtype of the params, 2 for bf16 and 4 for fp32):
- DeepSpeed ZeRO-3: each parameter is split into world_size equal parts of ceil(numel / world) elements
  (padded); a rank holds its part in p bytes, plus the whole of every parameter with at most
  `stage3_param_persistence_threshold` elements (kept gathered). Gradient partition: p bytes per element
  (the grad-accumulation dtype is the model dtype). Optimizer: fp32 master copy (4) + AdamW moments (8) per
  partition element, also in fp32 mode (DeepSpeed clones the fp32 params). Workspace: the reduce bucket
  (`reduce_bucket_size` x p), the largest gathered block + the prefetch bucket (x p), the fp32 gradient of
  one optimizer sub-group.
- DeepSpeed ZeRO-1/2: params whole (p); grads whole (stage 1) or partitioned (stage 2); master + moments
  on each rank's part of the flat group, padded to a multiple of 2 x world. Workspace: reduce and
  all-gather buckets.
- FSDP2: each parameter's dim 0 split in ceil(dim0 / world) rows (fp32 shard, fp32 sharded gradient,
  fp32 moments); workspace: two gathered blocks in the compute dtype plus their fp32 reduce-scatter input.
- CPU offload (engine.offload_optimizer / offload_param) moves master + moments (+ gradient partitions)
  or the parameter partitions to host memory: they leave the GPU's sum.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from models import swinv2  # noqa: E402
from pretrain.config import (CONF_DIR, Config, DeepSpeedConfig, SimMIMStageConfig,  # noqa: E402
                             SupervisedStageConfig, finalize, register_configs)
from pretrain.objectives import masked_l1  # noqa: E402

GB = 1e9
ADAM_MOMENTS_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4
# DeepSpeed's defaults (deepspeed.runtime.zero.config) for the keys the plan depends on; engine.config wins.
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
               "stage3_prefetch_bucket_size": int(5e7), "stage3_param_persistence_threshold": int(1e5),
               "sub_group_size": int(1e9)}
DS_ALIGN = 2  # stage 1/2 pad the flat group to a multiple of 2 x world elements


# ---------------------------------------------------------------------------------------------- config

def compose_config(overrides: list[str]) -> Config:
    """The typed config for these overrides, as the launcher builds it (one rank: the planner picks its own
    world size, so the global-batch divisibility check is the launcher's business)."""
    from hydra import compose, initialize_config_dir
    register_configs()
    if not any(o.lstrip("+").startswith("stage=") for o in overrides):
        overrides = [*overrides, "+stage=simmim"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides)
    cfg = finalize(raw, world_size=1)
    if isinstance(cfg.stage, SupervisedStageConfig):  # supervised and finetune
        cfg.stage.init_from = "none"  # the planner never loads weights
    return cfg


def param_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32


def stage_model(cfg: Config) -> nn.Module:
    """The stage's model (SimMIM, or SwinV2 with its head), built on the current default device."""
    from pretrain.preflight import Start
    from pretrain.stages import build_stage
    return build_stage(Start(cfg), ctx=None).model.build_model()


def build_meta_model(cfg: Config) -> nn.Module:
    """The stage's model on the meta device, in the engine's compute dtype."""
    with torch.device("meta"):
        model = stage_model(cfg)
    mode = cfg.model.grad_checkpointing
    # fairscale's wrapper recomputes the same blocks as torch's; only where the saved inputs live differs.
    model.set_grad_checkpointing("torch" if mode.startswith("fairscale") else mode)
    return model.to(param_dtype(cfg)).train()


def example_inputs(cfg: Config, batch: int) -> tuple[torch.Tensor, ...]:
    m = cfg.model
    image = torch.empty(batch, m.in_chans, m.img_size, m.img_size, device="meta", dtype=param_dtype(cfg))
    if cfg.stage.name != "simmim":
        return (image,)
    side = m.img_size // m.patch_size
    return image, torch.empty(batch, side, side, device="meta")


def training_loss(cfg: Config, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One training forward and its loss as the trainer computes it (what the loss saves for backward counts
    too): SimMIM's masked L1 of the reconstruction (pretrain.objectives.masked_l1); for a classifier, the
    logits summed stand in for the cross-entropy."""
    out = model(*inputs)
    if not isinstance(cfg.stage, SimMIMStageConfig):
        return out.float().sum()
    st = cfg.stage
    return masked_l1(out, *inputs, st.norm_target_patch if st.norm_target else None)


# ------------------------------------------------------------------------------------------ activations

class SavedTensorMeter:
    """Distinct storages autograd saves for backward (parameters excluded), and the largest recompute of a
    checkpointed region nested under this one."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}  # storage id -> bytes
        self.keep: list[torch.Tensor] = []  # keeps storage ids unique while the meter lives
        self.recompute_peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl: shared by views, distinct per allocation (meta included)
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = storage.nbytes()
            self.keep.append(t)
        return t

    @property
    def saved_bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def peak_bytes(self) -> int:
        return self.saved_bytes + self.recompute_peak


@contextlib.contextmanager
def metered_checkpoint(stack: list[SavedTensorMeter]):
    """Replace torch.utils.checkpoint.checkpoint while measuring: a checkpointed call saves its tensor
    inputs; what its body saves is measured in a nested meter and only held during its recompute."""
    original = torch.utils.checkpoint.checkpoint

    def checkpoint(fn, *args, use_reentrant=None, **kwargs):
        outer = stack[-1]
        for a in args:
            if isinstance(a, torch.Tensor):
                outer.pack(a)
        # storages the outer graph already holds (the region's inputs and what they view) cost nothing new
        inner = SavedTensorMeter(outer.exclude | outer.storages.keys())
        stack.append(inner)
        try:
            with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t), torch.enable_grad():
                out = fn(*args, **kwargs)
        finally:
            stack.pop()
        outer.recompute_peak = max(outer.recompute_peak, inner.peak_bytes)
        return out

    torch.utils.checkpoint.checkpoint = checkpoint
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


ATTN_KERNELS = ("efficient", "math")


@contextlib.contextmanager
def attention_kernel_on_meta(kernel: str):
    """On the meta device F.scaled_dot_product_attention always decomposes into the math path, which saves
    the (.., N, N) probabilities. On a GPU a 4-D call with an additive bias (even one that needs a gradient,
    like the CPB bias) runs the memory-efficient kernel, which saves q, k, v, the bias, the output and the
    log-sum-exp only; CPU torch takes the math path whenever the bias needs a gradient. kernel="efficient"
    dispatches as CUDA does: 4-D inputs to the efficient kernel's meta function, anything else to the math
    path; kernel="math" leaves the math path everywhere. attn_impl flex, which runs on no meta device, saves
    q, k, v, the output and the log-sum-exp: it is counted as the efficient kernel without a bias (the CPB
    table it captures is (heads, (2W-1)^2), negligible); with no CPU backward it has no math path."""
    if kernel not in ATTN_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTN_KERNELS}, got {kernel!r}")
    original, original_flex = F.scaled_dot_product_attention, swinv2.flex_attend
    if kernel == "math":
        yield
        return

    def flex(q, k, v, table, regions):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=1.0)[0].contiguous()

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if q.is_meta and q.dim() == 4 and not kwargs:
            # contiguous: the CUDA kernel's output is a transposed (B, N, H, d) layout; only saved bytes matter here
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0].contiguous()
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    F.scaled_dot_product_attention, swinv2.flex_attend = sdpa, flex
    try:
        yield
    finally:
        F.scaled_dot_product_attention, swinv2.flex_attend = original, original_flex


def saved_activation_bytes(cfg: Config, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                           attn_kernel: str = "efficient") -> SavedTensorMeter:
    """One training forward; what autograd keeps for backward. Works on meta and on real tensors."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    stack = [SavedTensorMeter(params)]
    with metered_checkpoint(stack), attention_kernel_on_meta(attn_kernel), \
            torch.autograd.graph.saved_tensors_hooks(stack[0].pack, lambda t: t):
        training_loss(cfg, model, inputs)
    return stack[0]


@dataclass
class Activations:
    per_image: float  # bytes per image of micro batch
    fixed: float  # batch-independent part (position bias tables, masks gathered per chunk)

    def at(self, micro_batch: int) -> float:
        return self.fixed + self.per_image * micro_batch


def measure_activations(cfg: Config, attn_kernel: str = "efficient") -> Activations:
    """Peak activation bytes (saved + largest recompute) at micro batch 1 and 2 on the meta device."""
    model = build_meta_model(cfg)
    one, two = (saved_activation_bytes(cfg, model, example_inputs(cfg, b), attn_kernel).peak_bytes
                for b in (1, 2))
    return Activations(per_image=two - one, fixed=2 * one - two)


# ------------------------------------------------------------------------------------- training state

@dataclass
class Plan:
    config: str
    world_size: int
    micro_batch: int
    params: float
    grads: float
    optimizer: float
    buffers: float
    workspace: float
    activations: float
    num_params: int
    host_offload: float = 0.0  # bytes moved to host memory per rank
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.workspace + self.activations


def ds_value(engine: DeepSpeedConfig, key: str) -> int:
    zero = engine.config.get("zero_optimization", {})
    return int(zero.get(key, DS_DEFAULTS[key]))


def zero3_partition_numel(numels: list[int], world: int) -> int:
    """Elements a rank holds of the ZeRO-3 partitions: ceil(numel / world) per parameter (padded)."""
    return sum(math.ceil(n / world) for n in numels)


def zero3_persistent_numel(numels: list[int], threshold: int) -> int:
    """Elements of the small parameters ZeRO-3 keeps gathered whole on every rank."""
    return sum(n for n in numels if n <= threshold)


def zero12_partition_numel(group_numels: list[int], world: int) -> int:
    return sum(math.ceil(n / (DS_ALIGN * world)) * DS_ALIGN for n in group_numels)


def fsdp_shard_numel(shapes: list[torch.Size], world: int) -> int:
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) if len(s) else math.ceil(1 / world) for s in shapes)


def largest_block_numel(model: nn.Module) -> int:
    return max(sum(p.numel() for p in blk.parameters()) for blk in model.blocks())


def state_plan(cfg: Config, model: nn.Module, world: int) -> Plan:
    """Parameters, gradients, optimizer state, buffers and workspace per rank (activations left at 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    total = sum(numels)
    eng = cfg.engine
    p_bytes = 2 if eng.precision == "bf16" else 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    block = largest_block_numel(model)
    plan = Plan(config="", world_size=world, micro_batch=cfg.stage.micro_batch, params=0, grads=0,
                optimizer=0, buffers=buffers, workspace=0, activations=0, num_params=total)
    if eng.name == "fsdp":
        shard = fsdp_shard_numel([p.shape for p in params], world)
        plan.params, plan.grads = 4 * shard, 4 * shard
        plan.optimizer = ADAM_MOMENTS_BYTES * shard
        plan.workspace = 2 * block * (p_bytes + 4)  # current + prefetched block, gathered, and fp32 grads
        plan.notes.append("FSDP2: fp32 shards, fp32 reduce; workspace = 2 gathered blocks (estimate)")
        return plan
    if eng.zero_stage == 3:
        part = zero3_partition_numel(numels, world)
        persistent = zero3_persistent_numel(numels, ds_value(eng, "stage3_param_persistence_threshold"))
        param_bytes, grad_bytes = p_bytes * (part + persistent), p_bytes * part
        optim_bytes = (MASTER_BYTES + ADAM_MOMENTS_BYTES) * part
        sub_group = min(part, ds_value(eng, "sub_group_size"))
        plan.workspace = p_bytes * (ds_value(eng, "reduce_bucket_size") + block
                                    + min(ds_value(eng, "stage3_prefetch_bucket_size"), total)) + 4 * sub_group
    else:
        groups = [sum(p.numel() for p in g) for g in _param_groups(cfg, model)]
        part = zero12_partition_numel(groups, world)
        param_bytes = p_bytes * total
        grad_bytes = p_bytes * (part if eng.zero_stage == 2 else total)
        optim_bytes = (MASTER_BYTES + ADAM_MOMENTS_BYTES) * part
        plan.workspace = p_bytes * (ds_value(eng, "reduce_bucket_size") + ds_value(eng, "allgather_bucket_size"))
    if eng.offload_optimizer:
        plan.host_offload += optim_bytes + grad_bytes
        optim_bytes = grad_bytes = 0
    if getattr(eng, "offload_param", False) and eng.zero_stage == 3:
        plan.host_offload += p_bytes * part
        param_bytes = p_bytes * persistent
    plan.params, plan.grads, plan.optimizer = param_bytes, grad_bytes, optim_bytes
    return plan


def _param_groups(cfg: Config, model: nn.Module) -> list[list[nn.Parameter]]:
    """The optimizer's parameter groups as the engines get them (ZeRO-1/2 flatten each group)."""
    from pretrain.optim import param_groups_for
    return [g["params"] for g in param_groups_for(model, cfg.stage.optim)]


# --------------------------------------------------------------------------------------------- the plan

def plan_memory(cfg: Config, world: int, acts: Activations) -> Plan:
    plan = state_plan(cfg, build_meta_model(cfg), world)
    plan.config = describe(cfg)
    plan.activations = acts.at(cfg.stage.micro_batch)
    if cfg.model.grad_checkpointing == "fairscale_offload":
        plan.notes.append("fairscale_offload keeps checkpointed inputs on the host: GPU activations are lower")
    return plan


def max_micro_batch(plan: Plan, acts: Activations, budget_bytes: float) -> int:
    """Largest micro batch whose total fits `budget_bytes` (0 if not even the training state fits)."""
    fixed = plan.total - plan.activations + acts.fixed
    return max(0, int((budget_bytes - fixed) // acts.per_image))


def describe(cfg: Config) -> str:
    m, e = cfg.model, cfg.engine
    seq = "".join("1" if s else "0" for s in m.sequential_attn)
    engine = f"ZeRO-{e.zero_stage}" if e.name == "deepspeed" else "FSDP2"
    offload = [k for k in ("offload_optimizer", "offload_param") if getattr(e, k, False)]
    return (f"{m.name} {cfg.stage.name} {m.img_size}px/w{m.window_size} {engine} {e.precision} "
            f"ckpt={m.grad_checkpointing} seq_attn={seq} chunk={m.attn_chunk_size}"
            + (f" offload={'+'.join(offload)}" if offload else ""))


def format_plan(plan: Plan, max_batch: int | None, gpu_mem_gb: float | None, reserve_gb: float) -> str:
    rows = [("parameters", plan.params), ("gradients", plan.grads), ("optimizer state", plan.optimizer),
            ("buffers", plan.buffers), ("workspace (est.)", plan.workspace),
            (f"activations (micro batch {plan.micro_batch})", plan.activations), ("total", plan.total)]
    lines = [plan.config, f"  {plan.num_params / 1e9:.3f}B trainable parameters, world size {plan.world_size}"]
    lines += [f"  {name:<34}{b / GB:10.3f} GB" for name, b in rows]
    if plan.host_offload:
        lines.append(f"  {'on the host (offloaded)':<34}{plan.host_offload / GB:10.3f} GB")
    if gpu_mem_gb:
        lines.append(f"  largest micro batch in {gpu_mem_gb:g} GB (minus {reserve_gb:g} GB reserve): {max_batch}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument("--gpu-mem-gb", type=float, default=None, help="GPU memory for the max micro batch")
    parser.add_argument("--reserve-gb", type=float, default=2.0,
                        help="left for the CUDA context, NCCL and allocator fragmentation (assumed)")
    parser.add_argument("--attn-kernel", choices=ATTN_KERNELS, default="efficient",
                        help="attention kernel whose saved tensors to count: efficient (GPU) or math (CPU)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch/pretrain.py")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cfg = compose_config(args.overrides)
    acts = measure_activations(cfg, args.attn_kernel)
    plan = plan_memory(cfg, args.world_size, acts)
    budget = None
    if args.gpu_mem_gb:
        budget = max_micro_batch(plan, acts, (args.gpu_mem_gb - args.reserve_gb) * GB)
    print(format_plan(plan, budget, args.gpu_mem_gb, args.reserve_gb))
    print(f"  (activations measured on the meta device: {acts.per_image / GB:.3f} GB per image "
          f"+ {acts.fixed / GB:.3f} GB fixed; planned in {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
