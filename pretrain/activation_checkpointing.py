"""Activation checkpointing, applied to a model from outside (as torchtitan's parallelize does): the model's
own per-block torch recomputation, or fairscale's `checkpoint_wrapper` around each block, which can also keep
the saved block inputs on the host (`fairscale_offload`)."""
from __future__ import annotations

from torch import nn

from models.swinv2 import GRAD_CHECKPOINTING_MODES as MODEL_MODES

FAIRSCALE_MODES = ("fairscale", "fairscale_offload")
MODES = (*MODEL_MODES, *FAIRSCALE_MODES)


def apply_grad_checkpointing(model: nn.Module, mode: str) -> None:
    """`model` has `set_grad_checkpointing(mode)` and `blocks()` (models.swinv2, models.simmim)."""
    if mode not in FAIRSCALE_MODES:
        model.set_grad_checkpointing(mode)
        return
    from fairscale.nn.checkpoint import checkpoint_wrapper

    model.set_grad_checkpointing("none")
    for block in model.blocks():
        checkpoint_wrapper(block, offload_to_cpu=mode == "fairscale_offload")
