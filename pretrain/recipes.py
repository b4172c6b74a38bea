"""A stage's model recipe: how to build the model, its forward FLOPs per image, and its starting weights.

A recipe is what an engine is handed (pretrain.engine.ModelRecipe: `build_model()`, `initial_weights()`);
the trainer also reads `flops_per_image()` for MFU.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from models import SimMIM, SwinTransformerV2, encoder_state_dict, load_pretrained
from models.flops import simmim_forward_flops, swinv2_forward_flops
from models.swinv2 import total_stride
from pretrain import start_weights
from pretrain.config import ModelConfig
from pretrain.start_weights import Source

log = logging.getLogger(__name__)


def model_kwargs(m: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """The model config (or a conf/model yaml as a dict) as SwinTransformerV2's keyword arguments."""
    kwargs = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m)
    for key in ("name", "grad_checkpointing", "compile"):  # the last two are applied by the engines
        kwargs.pop(key)
    return kwargs


@dataclasses.dataclass(frozen=True)
class SimMIMRecipe:
    """SimMIM (encoder + decoder) from random weights."""
    model: ModelConfig

    def build_model(self) -> nn.Module:
        m = self.model
        return SimMIM(encoder_stride=total_stride(m.patch_size, len(m.depths)), **model_kwargs(m))

    def flops_per_image(self) -> int:
        return simmim_forward_flops(dataclasses.asdict(self.model))

    def initial_weights(self) -> Callable[[nn.Module], None] | None:
        return None


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """SwinV2 with a `num_classes` head, from random weights or from `source` (a run dir or a weights file,
    pretrain.start_weights.Source): a SimMIM source gives its encoder (the decoder and mask token are
    dropped), a classifier its weights. `class_rows` (read from the class map `class_map`) selects the source
    head's rows; without it a head of another class count starts anew. `from_ema`: the EMA of the weights a
    fine-tune kept instead of its weights (+stage=eval stage.ema).

    The CPB meta network's weights load unchanged and see inputs on the scale it was trained at
    (model.pretrained_window_sizes, which pretrain.preflight takes from the source run when all 0); the
    position buffers are rebuilt for the model's own window."""
    model: ModelConfig
    num_classes: int
    source: Source | None = None
    class_map: str = ""
    class_rows: tuple[int, ...] | None = None
    from_ema: bool = False

    def build_model(self) -> nn.Module:
        return SwinTransformerV2(num_classes=self.num_classes, **model_kwargs(self.model))

    def flops_per_image(self) -> int:
        return swinv2_forward_flops(dataclasses.asdict(self.model), self.num_classes)

    def source_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The starting state dict (rank 0 reads it); load_pretrained maps its layout onto `model`."""
        if self.from_ema:
            full = start_weights.read_ema_weights(self.source, {k: p.shape for k, p in model.named_parameters()})
        else:
            full = start_weights.read_weights(self.source)
        if self.class_rows is None:
            return full
        return start_weights.select_head_rows(full, list(self.class_rows), self.class_map)

    def initial_weights(self) -> Callable[[nn.Module], None] | None:
        if self.source is None:
            return None

        def load(model: nn.Module) -> None:
            full = self.source_weights(model)
            simmim = any(k.startswith("encoder.") for k in full)
            encoder = encoder_state_dict(full) if simmim else full
            result = load_pretrained(model, encoder)
            dropped = sorted({k.split(".")[0] for k in full if not k.startswith("encoder.")} |
                             ({"encoder.mask_token"} & set(full))) if simmim else []
            log.info("init_from %s: loaded %d tensors; dropped %s; new (not loaded) %s",
                     self.source, len(encoder) - len(result.unexpected_keys), dropped, result.missing_keys)

        return load
