"""Exponential moving average of the weights, kept as fp32 copies of this rank's parameter shards.

Each rank averages only its own part of every parameter (`Engine.local_shards()`: ZeRO-3's partitions,
FSDP2's dim-0 chunks, ZeRO-1/2's whole tensors), so the EMA is sharded like the model: 4 bytes per local
element, no collective to update it. The trainer updates it after every optimizer step that changed the
weights, evaluates it by swapping it into the model and back, and saves it in each rank's client state of
the checkpoint; a checkpoint written on another world size holds shards of another shape, so the EMA then
restarts from the current weights. `merge_shards` joins every rank's saved shards into whole tensors without
a process group: `+stage=eval stage.ema=true` reads a fine-tune's EMA that way.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.distributed as dist

from pretrain.engine import Engine

log = logging.getLogger(__name__)


class WeightEMA:
    def __init__(self, engine: Engine, decay: float):
        self.engine, self.decay = engine, decay
        self.world_size = dist.get_world_size()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        self.shards = {k: v.detach().float().clone() for k, v in self.engine.local_shards().items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, live in self.engine.local_shards().items():
            self.shards[name].lerp_(live.float(), 1.0 - self.decay)

    def evaluate(self, evaluate: Callable[[Engine], dict[str, float]]) -> dict[str, float]:
        """Collective: `evaluate(engine)` with the EMA in the model, its `eval/` keys renamed `eval_ema/`."""
        live = {k: v.clone() for k, v in self.engine.local_shards().items()}
        self.engine.load_local_shards(self.shards)
        try:
            metrics = evaluate(self.engine)
        finally:
            self.engine.load_local_shards(live)
        return ema_metrics(metrics)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "world_size": self.world_size,
                "shards": {k: v.cpu() for k, v in self.shards.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        """This rank's saved EMA; None (a checkpoint without one) or another world size's: restart from the
        current weights."""
        if state is None or state["world_size"] != self.world_size:
            log.warning("EMA of the weights restarts from the current weights: the checkpoint has %s",
                        "none" if state is None else f"one of {state['world_size']} ranks, not {self.world_size}")
            self.reset()
            return
        if state["shards"].keys() != self.shards.keys():
            raise ValueError("the checkpoint's EMA holds other parameters than the model: "
                             f"{sorted(state['shards'].keys() ^ self.shards.keys())[:5]}")
        self.shards = {k: v.to(self.shards[k].device) for k, v in state["shards"].items()}


def ema_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """eval/<name> -> eval_ema/<name>."""
    return {k.replace("eval/", "eval_ema/", 1): v for k, v in metrics.items()}


def merge_shards(per_rank: list[dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from every rank's local shards (as `Engine.local_shards()` lays them out)."""
    missing = sorted(shapes.keys() - per_rank[0].keys())
    if missing:
        raise ValueError(f"the saved EMA lacks parameters of the model: {missing[:5]}")
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([shards[name].reshape(-1) for shards in per_rank])
        numel = math.prod(shape)
        if flat.numel() < numel:
            raise ValueError(f"EMA shards of {name} hold {flat.numel()} elements, the parameter {numel}")
        out[name] = flat[:numel].view(shape).float()
    return out
