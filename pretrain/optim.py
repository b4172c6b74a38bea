"""AdamW and its parameter groups: weight-decay exemptions and layer-wise lr decay.

The layer ids come from the model (`model.layer_ids()`, the official fine-tuning rule of microsoft/Swin-Transformer
`optimizer.py::get_swin_layer`, in models/swinv2.py): with L + 1 the largest id, a group's lr is
`lr * layer_decay ** (L + 1 - id)`, carried as `lr_scale` and applied by `pretrain.schedule.set_lr`.
Engines build the optimizer over the model they shard with `build_optimizer`.
"""

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from pretrain.config import OptimConfig


def is_no_decay(name: str, param: torch.Tensor, no_decay_keywords: Iterable[str]) -> bool:
    """Biases, 1-D tensors (norm weights, q/v biases) and names holding a keyword get no weight decay.

    A keyword matches whole dotted components of the name (`cpb_mlp` matches
    `encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight`). The official SimMIM pretraining prefixes its
    keywords (`encoder.cpb_mlp`), which are then substrings of no real name, so its 2-D `cpb_mlp`
    weights and `logit_scale` silently get decay; pass bare keywords here.
    Under ZeRO-3 a parameter is a partition whose `shape` is empty; `ds_shape` holds the real one.
    """
    shape = getattr(param, "ds_shape", param.shape)
    if len(shape) <= 1 or name.endswith(".bias"):
        return True
    padded = f".{name}."
    return any(f".{kw}." in padded for kw in no_decay_keywords)


def build_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float = 1.0,
                       no_decay_keywords: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups for `model`, one per distinct (lr_scale, weight_decay).

    Each group holds `params`, `weight_decay`, `lr_scale` and `family`: "decay" / "no_decay", suffixed
    with `/layer_<id>` when layer decay is on (it needs `model.layer_ids()`), for logging lr per family.
    Frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_keywords = tuple(no_decay_keywords)
    layer_ids = model.layer_ids() if layer_decay != 1.0 else {}
    num_layers = max(layer_ids.values(), default=0)

    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if is_no_decay(name, param, no_decay_keywords) else weight_decay
        family = "decay" if wd else "no_decay"
        lr_scale = 1.0
        if layer_decay != 1.0:
            lid = layer_ids[name]
            lr_scale = layer_decay ** (num_layers - lid)
            family = f"{family}/layer_{lid:02d}"
        group = groups.setdefault((lr_scale, wd), {
            "params": [], "weight_decay": wd, "lr_scale": lr_scale, "family": family})
        group["params"].append(param)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return list(groups.values())


def param_groups_for(model: nn.Module, o: OptimConfig) -> list[dict]:
    """The groups a stage's optimizer settings give `model`."""
    return build_param_groups(model, weight_decay=o.weight_decay, layer_decay=o.layer_decay,
                              no_decay_keywords=model.no_weight_decay_keywords())


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s groups (the model an engine holds: sharded, or partitioned by ZeRO-3). Fused: one
    kernel per device for the whole update, on CPU as on CUDA, over plain tensors (ZeRO's flat fp32
    partitions) and DTensors (FSDP2's shards) alike; it also skips a step on a device flag (`found_inf`,
    pretrain.engine.fsdp) without reading it on the host."""
    return torch.optim.AdamW(param_groups_for(model, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def optimizer_for(o: OptimConfig) -> Callable[[nn.Module], torch.optim.AdamW]:
    """What an engine is handed: `build_optimizer` with the stage's settings, for the model it holds."""
    return functools.partial(build_optimizer, o=o)
