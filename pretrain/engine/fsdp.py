"""torch FSDP2 (`fully_shard`) behind the Engine interface.

Sharding: one FSDP unit per SwinV2 block (model.blocks()) and one at the root for the rest (patch embed,
patch merging, norms, head / SimMIM decoder). Activation checkpointing is applied per block from outside
(pretrain.activation_checkpointing, `model.grad_checkpointing`), as the DeepSpeed engine does, so both engines
recompute the same blocks; the checkpointed call wraps the FSDP block, whose hooks gather the block again
for the recompute.

Materialisation: every rank builds the model on the meta device and shards it, `to_empty` gives each rank
only its own shard, and the values come from one full fp32 state dict broadcast from rank 0 (the recipe's
normal build under the run's seed, with the stage's starting weights loaded). So the first weights are the
DeepSpeed engine's bit for bit, whatever the world size; the price is one full copy in rank 0's host memory
(10.7 GB for SwinV2-G), never on an accelerator.

Optimisation is the DeepSpeed engine's: torch.optim.AdamW over fp32 master shards (DeepSpeed is handed the
same torch AdamW, not its own CPU Adam), the loss scaled by 1/accumulation, gradients averaged over ranks and
clipped by the global norm at the accumulation boundary; so in fp32 both engines give the same loss curve.

Checkpoints: torch.distributed.checkpoint (DCP), one `{"model", "optim"}` state in directory/tag/, written as
one file per rank plus `.metadata`; the names are the model's own (official layout) FQNs, so DCP reshards
to any world size on load, and `read_weights` merges the model part without a process group.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pretrain.activation_checkpointing import apply_grad_checkpointing
from pretrain.compile import apply_compile
from pretrain.config import Config, FSDPConfig
from pretrain.process_group import DistContext
from pretrain.engine.base import Engine, ModelRecipe, OptimizerFn, SaveFailed, write_error
from pretrain.safe_load import check_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shard_model(model: nn.Module, mesh, precision: str, reshard_after_forward: bool) -> nn.Module:
    """fully_shard each SwinV2 block, then the root. Gradients are reduced in fp32 whatever the compute dtype."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def materialise(model: nn.Module, recipe: ModelRecipe, ctx: DistContext) -> None:
    """Give the sharded meta model its shards and values: rank 0's full initial weights, broadcast."""
    model.to_empty(device=ctx.device)
    full: dict[str, torch.Tensor] = {}
    if ctx.is_main:
        with torch.device("cpu"):
            source = recipe.build_model()
        load_initial = recipe.initial_weights()
        if load_initial is not None:
            load_initial(source)
        full = source.state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # non-persistent, shape-derived buffers are not in any state dict
        model.init_buffers()


class FSDPEngine(Engine):
    def __init__(self, cfg: Config, ctx: DistContext, recipe: ModelRecipe, accum: int, optimizer: OptimizerFn):
        ecfg: FSDPConfig = cfg.engine
        self.device = ctx.device
        self.dtype = DTYPES[ecfg.precision]
        self.accum, self.micro_steps, self.clip_grad = accum, 0, cfg.stage.optim.clip_grad
        self._grad_norm: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None
        self._skipped = torch.zeros((), dtype=torch.bool, device=self.device)

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        with torch.device("meta"):
            model = recipe.build_model()
        apply_grad_checkpointing(model, cfg.model.grad_checkpointing)
        apply_compile(model, cfg.model.compile)
        self.model = shard_model(model, mesh, ecfg.precision, ecfg.reshard_after_forward)
        materialise(self.model, recipe, ctx)
        self.optimizer = optimizer(self.model)
        log.info("fsdp: FSDP2 %s over %d ranks (%d blocks + root), micro batch %d x accumulation %d x world %d "
                 "= global batch %d, grad checkpointing %s, compile %s", ecfg.precision, ctx.world_size, len(model.blocks()),
                 cfg.stage.micro_batch, accum, ctx.world_size, cfg.stage.micro_batch * accum * ctx.world_size,
                 cfg.model.grad_checkpointing, cfg.model.compile)

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _forward(self, *args: torch.Tensor) -> Any:
        return self.model(*args)

    def backward(self, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        # Same semantics as DeepSpeed: the mean over micro batches, averaged over ranks by the reduce-scatter.
        (loss / self.accum).backward()
        self._finite = finite

    def step(self) -> bool:
        """Clip and update without reading anything on the host: whether the step is dropped stays a device
        flag, which the fused AdamW reads itself (`found_inf`: weights, moments and step count unchanged)."""
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return False
        params = [p for p in self.model.parameters() if p.grad is not None]
        # A norm reduced over ranks: every rank sees the same inf/NaN from any rank's gradients and skips too.
        norm = self._global_grad_norm(params)
        ok = torch.isfinite(norm)
        if self._finite is not None:  # the same agreed flag on every rank
            ok = ok & (self._finite > 0)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)
        self.optimizer.found_inf = (~ok).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._grad_norm, self._skipped = norm, ~ok
        return True

    @staticmethod
    def _global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the shards' partial norms, reduced

    def skipped(self) -> torch.Tensor:
        return self._skipped

    def grad_norm(self) -> torch.Tensor | None:
        return self._grad_norm

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory: Path, tag: str) -> None:
        path = directory / tag
        path.mkdir(parents=True, exist_ok=True)
        try:
            dcp.save(self._state(), checkpoint_id=path)
        except dcp.CheckpointException as err:  # raised on every rank when any rank's write failed
            own = err.failures.get(torch.distributed.get_rank())
            raise SaveFailed(f"{path}: {write_error(own[0])}" if own else "") from err

    def load(self, directory: Path, tag: str) -> None:
        path = directory / tag
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} holds no torch.distributed.checkpoint (.metadata missing): "
                                    "not saved by engine=fsdp?")
        check_checkpoint(path)
        state = self._state()
        dcp.load(state, checkpoint_id=path)  # reshards to this world size by itself
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def read_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
        check_checkpoint(directory / tag)
        state: dict[str, Any] = {}
        # dcp.load fills a copy of `state`, so the keys the planner adds would be lost: the inner loader
        # (as torch's own dcp_to_torch_save uses) fills `state` itself.
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(directory / tag),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}

    @torch.no_grad()
    def local_shards(self) -> dict[str, torch.Tensor]:
        return {name: p.to_local() for name, p in self.model.named_parameters()}  # no grad: the shard itself

    @torch.no_grad()
    def load_local_shards(self, values: dict[str, torch.Tensor]) -> None:
        for name, shard in self.local_shards().items():
            shard.copy_(values[name])
        for m in self.model.modules():  # the root stays gathered after a no-grad forward: drop that copy
            if isinstance(m, FSDPModule):
                m.reshard()
