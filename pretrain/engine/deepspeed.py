"""DeepSpeed ZeRO 1/2/3 behind the Engine interface."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.z3_leaf_module import set_z3_leaf_module
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch import nn

from pretrain.activation_checkpointing import apply_grad_checkpointing
from pretrain.compile import apply_compile
from pretrain.config import Config, DeepSpeedConfig
from pretrain.process_group import DistContext
from pretrain.engine.base import Engine, InitFn, ModelRecipe, OptimizerFn, SaveFailed, write_error
from pretrain.engine import universal
from pretrain.safe_load import check_checkpoint

log = logging.getLogger(__name__)
# The plain-data classes DeepSpeed pickles into its checkpoint files (ZeRO stage, loss scaler, ZeRO-1/2 fragment
# addresses): allowed in the weights_only check of every file before DeepSpeed unpickles it without one.
SAFE_GLOBALS = (ZeroStageEnum, LossScaler, fragment_address)
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


@torch.no_grad()
def _init_like_a_plain_build(module: nn.Module, init_module: InitFn) -> None:
    """init_module on CPU fp32 copies of the module's own (gathered) parameters, copied back: the draws come
    from the CPU generator in fp32, as in a plain build (a model built on an accelerator would draw from the
    accelerator's generator), and bf16 parameters get them rounded once, as deepspeed.initialize rounds a
    plain build's weights."""
    params = list(module.parameters(recurse=False))
    stored = [p.data for p in params]
    for p in params:
        p.data = p.data.to(device="cpu", dtype=torch.float32, copy=True)
    init_module(module)
    for p, data in zip(params, stored):
        p.data = data.copy_(p.data)


def build_partitioned(recipe: ModelRecipe, ds_json: dict[str, Any]) -> nn.Module:
    """ZeRO-3: build under zero.Init, which partitions each module's parameters over the ranks as soon as
    that module is constructed, so the model is never whole on a rank (the constructors see partitioned
    parameters and leave them uninitialised). Then initialise one gathered module at a time, in modules()
    order, which is the plain build's RNG order: the weights are a plain build's from the same seed."""
    # The parameters' dtype comes from the config's bf16 switch: an explicit dtype=torch.float32 would be
    # ignored where the accelerator has no fp16 (DeepSpeed 0.19's Init._set_dtype), e.g. on CPU.
    with deepspeed.zero.Init(config_dict_or_path=ds_json):
        model = recipe.build_model()
    for m in model.modules():
        with deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)), modifier_rank=0):
            _init_like_a_plain_build(m, model.init_module)
    with torch.no_grad():  # non-persistent, shape-derived buffers; zero.Init leaves them unpartitioned
        model.init_buffers()
    return model


def load_partitioned(model: nn.Module, recipe: ModelRecipe, load_initial: InitFn, is_main: bool) -> None:
    """The recipe's starting weights into a ZeRO-3 partitioned model. Rank 0 runs the recipe's loader on a
    meta twin of the model (shapes only, so its checks all run) and keeps what the loader hands to
    load_state_dict; each module's parameters are then gathered, filled on rank 0 and partitioned again
    (the models have no persistent buffers). Only rank 0 reads the checkpoint."""
    weights: dict[str, torch.Tensor] = {}
    if is_main:
        with torch.device("meta"):
            twin = recipe.build_model()
        twin.register_load_state_dict_pre_hook(lambda module, state_dict, prefix, *_: weights.update(state_dict))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
            load_initial(twin)
    for prefix, m in model.named_modules():
        own = dict(m.named_parameters(prefix=prefix, recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
            for name, p in own.items():
                if name in weights:
                    p.data.copy_(weights[name])


class KeptWriteErrors:
    """DeepSpeed's checkpoint engine (its file writer) with write errors kept instead of raised: a rank that
    raised inside save_checkpoint would skip the save's remaining collectives and leave its peers in them."""

    def __init__(self, writer):
        self.writer, self.error = writer, ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._kept(path, self.writer.makedirs, path, exist_ok=exist_ok)

    def save(self, state_dict: dict, path: str) -> None:
        if not self._kept(path, self._save, state_dict, path):
            with contextlib.suppress(OSError):
                os.remove(path)  # give its space back to the writes that follow (DeepSpeed's own file copies)

    def _save(self, state_dict: dict, path: str) -> None:
        with open(path, "wb") as f:  # a file object: see write_error
            self.writer.save(state_dict, f)

    def _kept(self, path: str, write, *args, **kwargs) -> bool:
        try:
            write(*args, **kwargs)
            return True
        except (OSError, RuntimeError) as err:  # torch.save: see write_error
            self.error = self.error or f"{path}: {write_error(err)}"
            return False


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, ctx: DistContext, recipe: ModelRecipe, accum: int, optimizer: OptimizerFn):
        ecfg: DeepSpeedConfig = cfg.engine
        self.device = ctx.device
        self.dtype = torch.bfloat16 if ecfg.precision == "bf16" else torch.float32
        self.zero3 = ecfg.zero_stage == 3
        self.json = deepspeed_json(ecfg, micro_batch=cfg.stage.micro_batch, accum=accum,
                                   world_size=ctx.world_size, clip_grad=cfg.stage.optim.clip_grad)
        # On CPU DeepSpeed would JIT-compile a shared-memory all-reduce kernel (a minute or more, under a file
        # lock every other DeepSpeed process then waits on); gloo's collectives are what it falls back to.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed()  # adopts the process group pretrain.process_group started

        load_initial = recipe.initial_weights()
        if self.zero3:
            model = build_partitioned(recipe, self.json)
            if load_initial is not None:
                load_partitioned(model, recipe, load_initial, ctx.is_main)
        else:  # ZeRO 1/2 keep whole weights on every rank anyway
            model = recipe.build_model()
            if load_initial is not None and ctx.is_main:
                load_initial(model)  # deepspeed.initialize broadcasts rank 0's weights
        mode = cfg.model.grad_checkpointing
        if self.zero3 and mode == "torch":
            mode = "torch_reentrant"  # non-reentrant recompute sees ZeRO-3's released (empty) params
        apply_grad_checkpointing(model, mode)
        apply_compile(model, cfg.model.compile)
        if self.zero3 and cfg.model.compile == "blocks":
            # A compiled block reads its children's parameters inside the region, where ZeRO-3's gather on
            # access cannot run (dynamo takes the partitioned tensors as they are): as a ZeRO-3 leaf module,
            # the block's own pre-forward hook gathers all of them, before the region.
            for block in model.blocks():
                set_z3_leaf_module(block, True)
        self.ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model), config=self.json)
        self.ds.checkpoint_engine = KeptWriteErrors(self.ds.checkpoint_engine)
        log.info("deepspeed: ZeRO-%d %s, micro batch %d x accumulation %d x world %d = global batch %d, "
                 "grad checkpointing %s, compile %s", ecfg.zero_stage, ecfg.precision, cfg.stage.micro_batch, accum,
                 ctx.world_size, self.json["train_batch_size"], mode, cfg.model.compile)

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

    def skipped(self) -> bool:
        # Set by every ZeRO optimizer's step from the global (all-reduced) norm or overflow flag: non-finite
        # gradients are dropped there whatever their cause, a NaN-scaled loss (above) or the backward itself.
        return bool(self.ds.optimizer.overflow)

    def grad_norm(self) -> torch.Tensor | float | None:
        return self.ds.get_global_grad_norm()  # a tensor or a float, as the ZeRO stage keeps it; not read here

    def save(self, directory: Path, tag: str) -> None:
        writer = self.ds.checkpoint_engine
        writer.error = ""
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)
        if writer.error:
            raise SaveFailed(writer.error)

    def load(self, directory: Path, tag: str) -> None:
        check_checkpoint(directory / tag, SAFE_GLOBALS)
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
        check_checkpoint(directory / tag, SAFE_GLOBALS)
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)

    def local_shards(self) -> dict[str, torch.Tensor]:
        return {name: p.ds_tensor if self.zero3 else p.data for name, p in self.module.named_parameters()}

    @torch.no_grad()
    def load_local_shards(self, values: dict[str, torch.Tensor]) -> None:
        if self.zero3:  # release gathered parameters: the next forward gathers the new partitions
            self.ds.optimizer.checkpoint_event_prologue()
        for name, shard in self.local_shards().items():
            shard.copy_(values[name])
        if self.zero3:  # re-gather the small parameters ZeRO-3 keeps whole (stage3_param_persistence_threshold)
            self.ds.optimizer.checkpoint_event_epilogue()
