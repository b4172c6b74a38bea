"""torch.compile, applied to a model from outside (as torchtitan's parallelize does: activation checkpointing
first, then compile, then sharding).

`blocks`: regional compilation, each SwinV2 block's `forward` compiled and the rest of the model eager. The
forward is compiled, not the module's call (`nn.Module.compile()` compiles `_call_impl`, hooks and all), so
the engines' module hooks (ZeRO-3's parameter gathers, FSDP2's all-gathers and reshards) run eagerly around
the compiled region, which only ever sees gathered parameters. Blocks of the same shapes share compiled
code: a model compiles once per (feature-map stage, shifted or not), not once per block. Checkpointing stays outside the
region too: torch's calls the (compiled) block, fairscale's wrapper calls the compiled inner forward.
`full`: the model's whole forward in one region, engine hooks included (not under ZeRO-3: pretrain.config).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch._dynamo.utils import calculate_time_spent, counters

from models.swinv2 import allow_recompiles

log = logging.getLogger(__name__)

MODES = ("off", "blocks", "full")


def apply_compile(model: nn.Module, mode: str) -> None:
    """`model` has `blocks()` (models.swinv2, models.simmim); call after pretrain.activation_checkpointing."""
    if mode not in MODES:
        raise ValueError(f"model.compile must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return
    blocks = model.blocks()
    # Every block variant is a recompile of the one SwinTransformerBlock.forward code object, at most two per
    # block (with and without grad: reentrant checkpointing and evaluation).
    allow_recompiles(2 * len(blocks))
    if mode == "full":
        model.forward = torch.compile(model.forward)
        return
    for block in blocks:
        block.forward = _compiled_forward(block.forward)


def _compiled_forward(forward):
    """fairscale's checkpoint_wrapper makes `forward` a partial(_checkpointed_forward, type(block).forward,
    ...): the block's own forward inside it is the one compiled, so that fairscale's autograd.Function stays
    eager (traced, its per-block weakref guards would recompile the wrapper for every block)."""
    if isinstance(forward, functools.partial):
        inner, *rest = forward.args
        return functools.partial(forward.func, torch.compile(inner), *rest, **forward.keywords)
    return torch.compile(forward)


class CompileWatch:
    """What torch.compile has cost this process, from dynamo's own counters: `perf/compile_s` (dynamo and
    inductor, forward and backward graphs), `compile/frames` (frames compiled) and `compile/recompiles`
    (frames compiled after the first training step, which compiles everything a step runs: each one is a
    guard that failed, e.g. a shape that changed)."""

    def __init__(self) -> None:
        self.first_step_frames: int | None = None

    @staticmethod
    def frames() -> int:
        return counters["frames"]["ok"]

    @staticmethod
    def seconds() -> float:
        return calculate_time_spent()["total_wall_time"]

    def first_step_done(self) -> None:
        self.first_step_frames = self.frames()
        if self.first_step_frames:
            log.info("torch.compile: %d frames compiled in %.1f s during the first step", self.first_step_frames,
                     self.seconds())

    def metrics(self) -> dict[str, float]:
        first = self.frames() if self.first_step_frames is None else self.first_step_frames
        return {"perf/compile_s": self.seconds(), "compile/frames": self.frames(),
                "compile/recompiles": self.frames() - first}
