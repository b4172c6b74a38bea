"""The engine interface: what the trainer needs from a sharding backend (DeepSpeed, later FSDP2)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

ModelFn = Callable[[], nn.Module]
ParamGroupsFn = Callable[[nn.Module], list[dict]]
InitFn = Callable[[nn.Module], None]


class Engine(ABC):
    """Wraps model + optimizer. Built by `build_engine`; every method is called on every rank.

    Step protocol, per micro batch: `loss = stage(engine.forward, batch)`, `engine.backward(loss, finite)`,
    `engine.step()`. The engine scales for gradient accumulation and only updates the weights (with
    clipping) at the accumulation boundary, where `step()` returns True.

    NaN/Inf skip: `finite` is a 0-dim tensor on `device`, the same on every rank: 1 while every rank's loss
    in the current optimizer step has been finite, 0 from the first micro batch where one was not (None: 1).
    An optimizer step that saw a 0 leaves the weights and optimizer state as they were and drops its gradients.
    """

    device: torch.device
    dtype: torch.dtype  # floating inputs are cast to this before forward

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The bare model (for attributes, eval mode); call through `forward`."""

    @property
    @abstractmethod
    def param_groups(self) -> list[dict]:
        """The optimizer's groups, carrying the keys of pretrain.optim.build_param_groups."""

    def forward(self, *args: Any) -> Any:
        cast = [a.to(self.device, self.dtype) if a.is_floating_point() else a.to(self.device) for a in args]
        # Parameters are already in self.dtype; autocast also brings fp32 buffers (e.g. SwinV2's
        # relative_coords_table) into matmuls with them, as the official AMP training does.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self._forward(*cast)

    @abstractmethod
    def _forward(self, *args: torch.Tensor) -> Any: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor, finite: torch.Tensor | None = None) -> None: ...

    @abstractmethod
    def step(self) -> bool:
        """Count a micro step; at the accumulation boundary clip, update, zero grads and return True."""

    @abstractmethod
    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping, of the last update (None or inf after a skipped one)."""

    @abstractmethod
    def save(self, directory: Path, tag: str) -> None:
        """Collective: write this rank's part of the model and optimizer state to directory/tag/."""

    @abstractmethod
    def load(self, directory: Path, tag: str) -> None:
        """Collective: restore what `save` wrote."""

    @staticmethod
    @abstractmethod
    def read_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
        """One fp32 state dict of the model saved at directory/tag (no process group needed)."""


class ModelRecipe(Protocol):
    """What a stage tells an engine about its model."""

    def build_model(self) -> nn.Module:
        """The initialised model; it has set_grad_checkpointing and no_weight_decay_keywords."""

    def param_groups(self, model: nn.Module) -> list[dict]: ...

    def initial_weights(self) -> InitFn | None:
        """A function that loads starting weights into the full (unsharded) model on rank 0, or None."""
