"""Sharding backends behind one interface; `engine.name` in the config picks one."""
from __future__ import annotations

from pretrain.config import Config
from pretrain.process_group import DistContext
from pretrain.engine.base import Engine, ModelRecipe, OptimizerFn


def engine_class(name: str) -> type[Engine]:
    if name == "deepspeed":
        from pretrain.engine.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine
    if name == "fsdp":
        from pretrain.engine.fsdp import FSDPEngine
        return FSDPEngine
    raise ValueError(f"engine.name: unknown engine {name!r}")


def build_engine(cfg: Config, ctx: DistContext, recipe: ModelRecipe, accum: int, optimizer: OptimizerFn) -> Engine:
    """The engine `engine.name` names, sharding the recipe's model and holding `optimizer(model)` over it."""
    return engine_class(cfg.engine.name)(cfg, ctx, recipe, accum, optimizer)
