"""The engine interface: what the trainer needs from a sharding backend (DeepSpeed, later FSDP2)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

InitFn = Callable[[nn.Module], None]
OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]  # pretrain.optim.build_optimizer over the model held


class SaveFailed(Exception):
    """`Engine.save` could not write its files (disk full, unwritable directory). Raised only after the save's
    collectives have run on this rank as on its peers, so the ranks can still agree on the outcome. The message
    is this rank's reason; empty where only a peer's write failed (an engine that fails on every rank)."""


def write_error(err: BaseException) -> str:
    """Why a write failed, in the OS's words. Give torch.save a file object, not a path: to a path its zip
    writer says only "unexpected pos ..."; to a file object it raises the OSError (ENOSPC, EROFS, ...), or
    buries it under that RuntimeError, raised while closing the file."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    return str(cause or err)


class Engine(ABC):
    """Wraps model + optimizer. Built by `build_engine`; every method is called on every rank.

    Step protocol, per micro batch: `loss = stage(engine.forward, batch)`, `engine.backward(loss, finite)`,
    `engine.step()`. The engine scales for gradient accumulation and only updates the weights (with
    clipping) at the accumulation boundary, where `step()` returns True.

    NaN/Inf skip: `finite` is a 0-dim tensor on `device`, the same on every rank: 1 while every rank's loss
    in the current optimizer step has been finite, 0 from the first micro batch where one was not (None: 1).
    An optimizer step that saw a 0, or whose global gradient norm is not finite (a finite loss can still give
    inf/NaN gradients, e.g. an overflow in a bf16 backward), leaves the weights and optimizer state as they
    were and drops its gradients; `skipped()` then says so, the same on every rank.
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
    def skipped(self) -> bool | torch.Tensor:
        """Whether the last optimizer step was dropped (a non-finite loss or gradient norm on some rank): a bool
        where the engine already read it on the host, else a 0-dim bool tensor on `device` (`bool()` waits)."""

    @abstractmethod
    def grad_norm(self) -> torch.Tensor | float | None:
        """Global gradient norm before clipping, of the last update (None, inf or NaN after a skipped one); a
        tensor stays on the device, to be read with the other metrics of a log step."""

    @abstractmethod
    def save(self, directory: Path, tag: str) -> None:
        """Collective: write this rank's part of the model and optimizer state to directory/tag/. A write
        error raises SaveFailed; any other exception may leave the peers inside the save's collectives."""

    @abstractmethod
    def load(self, directory: Path, tag: str) -> None:
        """Collective: restore what `save` wrote."""

    @staticmethod
    @abstractmethod
    def read_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
        """One fp32 state dict of the model saved at directory/tag (no process group needed)."""

    @abstractmethod
    def local_shards(self) -> dict[str, torch.Tensor]:
        """This rank's part of every parameter, by name: the tensors the optimizer writes (ZeRO-3's flat
        partition, FSDP2's dim-0 chunk, the whole parameter under ZeRO-1/2). Every rank's parts, flattened
        and joined in rank order, begin with the whole flattened parameter (pretrain.ema.merge_shards)."""

    @abstractmethod
    def load_local_shards(self, values: dict[str, torch.Tensor]) -> None:
        """Collective: copy `values` (shaped as `local_shards()`) into this rank's parts, so that the next
        forward computes with them."""


class ShardableModel(Protocol):
    """What an engine needs of a model (models.swinv2.SwinTransformerV2, models.simmim.SimMIM); the model knows
    nothing of the engines."""

    def blocks(self) -> list[nn.Module]:
        """The units to shard and checkpoint one by one."""

    def init_module(self, module: nn.Module) -> None:
        """Initialise one module's own parameters, as a plain build would (a sharded build, module by module)."""

    def init_buffers(self) -> None:
        """Rebuild the non-persistent, shape-derived buffers (after a meta or partitioned build)."""

    def set_grad_checkpointing(self, mode: str) -> None: ...


class ModelRecipe(Protocol):
    """What a stage tells an engine about its model."""

    def build_model(self) -> ShardableModel:
        """The initialised model."""

    def initial_weights(self) -> InitFn | None:
        """A function that loads starting weights into the full (unsharded) model on rank 0, or None."""
