"""DeepSpeed ZeRO 1/2/3 behind the Engine interface."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from pretrain.config import Config, DeepSpeedConfig
from pretrain.dist import DistContext
from pretrain.engine.base import Engine, ModelRecipe
from pretrain.engine import universal

log = logging.getLogger(__name__)
# DeepSpeed prints its whole config and per-step chatter at INFO; we log the parts that matter ourselves.
deepspeed.utils.logger.setLevel(logging.WARNING)
# DeepSpeed's ZeRO-3 gathers call a torch collective that torch deprecated: one warning per call otherwise.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_json(engine: DeepSpeedConfig, *, micro_batch: int, accum: int, world_size: int,
                   clip_grad: float) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_batch_size": micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": clip_grad,
        "bf16": {"enabled": engine.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW with our param groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(generated, engine.config)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, ctx: DistContext, recipe: ModelRecipe, accum: int):
        ecfg: DeepSpeedConfig = cfg.engine
        self.device = ctx.device
        self.dtype = torch.bfloat16 if ecfg.precision == "bf16" else torch.float32
        self.zero3 = ecfg.zero_stage == 3
        self.json = deepspeed_json(ecfg, micro_batch=cfg.stage.micro_batch, accum=accum,
                                   world_size=ctx.world_size, clip_grad=cfg.stage.optim.clip_grad)
        # On CPU DeepSpeed would JIT-compile a shared-memory all-reduce kernel (a minute or more, under a file
        # lock every other DeepSpeed process then waits on); gloo's collectives are what it falls back to.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed()  # adopts the process group pretrain.dist started

        # Every rank builds the whole model and DeepSpeed partitions it at initialize. Building under
        # deepspeed.zero.Init instead (never whole on a rank) needs a model whose init_weights() can run per
        # module on gathered parameters; models.SwinTransformerV2 initialises the whole tree at the end of
        # its constructor, which ZeRO-3 has partitioned by then.
        model = recipe.build_model()
        mode = cfg.model.grad_checkpointing
        if self.zero3 and mode == "torch":
            mode = "torch_reentrant"  # non-reentrant recompute sees ZeRO-3's released (empty) params
        model.set_grad_checkpointing(mode)
        load_initial = recipe.initial_weights()
        if load_initial is not None and ctx.is_main:
            load_initial(model)  # deepspeed.initialize broadcasts rank 0's weights

        o = cfg.stage.optim
        optimizer = torch.optim.AdamW(recipe.param_groups(model), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.json)
        log.info("deepspeed: ZeRO-%d %s, micro batch %d x accumulation %d x world %d = global batch %d, "
                 "grad checkpointing %s", ecfg.zero_stage, ecfg.precision, cfg.stage.micro_batch, accum,
                 ctx.world_size, self.json["train_batch_size"], mode)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def param_groups(self) -> list[dict]:
        return self.ds.optimizer.param_groups

    def _forward(self, *args: torch.Tensor) -> Any:
        return self.ds(*args)

    def backward(self, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        # A step to skip gets NaN gradients on every rank: the ZeRO optimizers then find the global grad norm
        # invalid and drop the step themselves (ZeRO-3 in any precision; ZeRO-1/2 through bf16's default
        # check_grad_overflow, or in fp32), keeping DeepSpeed's own step counters right.
        if finite is not None:
            loss = loss * torch.where(finite > 0, 1.0, float("nan")).to(loss.dtype)
        self.ds.backward(loss)  # scales by 1/accumulation itself

    def step(self) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        return boundary

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path, tag: str) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> None:
        resharded = universal.saved_world_size(directory / tag) != self.ds.dp_world_size
        if resharded:  # ZeRO partitions only load on the world size that wrote them
            directory, tag = universal.universal_checkpoint(directory / tag)
            self.ds._config.load_universal_checkpoint = True
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if resharded:
            universal.repair_after_load(self.ds.optimizer, groups)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {directory / tag}")

    @staticmethod
    def read_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
