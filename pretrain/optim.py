"""AdamW parameter groups: weight-decay exemptions and layer-wise lr decay for SwinV2 / SimMIM.

Layer ids follow the official fine-tuning code (microsoft/Swin-Transformer `optimizer.py::get_swin_layer`):
with L = sum(depths), `patch_embed` and `mask_token` are layer 0, block j of stage i is
`sum(depths[:i]) + j + 1`, the patch merging after stage i is `sum(depths[:i+1])` (the same id as that
stage's last block), and everything else (final norm, head, SimMIM decoder) is L + 1. A group's lr is
`lr * layer_decay ** (L + 1 - id)`, carried as `lr_scale` and applied by `pretrain.schedule.set_lr`.

Names work for the bare SwinV2 (`layers.0.blocks.0...`) and the SimMIM wrapper (`encoder.layers...`,
`encoder.mask_token`, `decoder.0.weight`).
"""

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Wrappers that may sit between the names the layer-id rule expects and the model's own names.
_PREFIXES = ("encoder.",)
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.")
_STEM = ("patch_embed.", "mask_token")


def layer_id(name: str, depths: Sequence[int]) -> int:
    """The layer id (0 .. sum(depths) + 1) of parameter `name`; see the module docstring."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(_STEM):
        return 0
    if m := _BLOCK.match(name):
        stage, block = int(m[1]), int(m[2])
        _check_stage(name, stage, depths)
        if block >= depths[stage]:
            raise ValueError(f"parameter {name!r}: block {block} is beyond depths[{stage}]={depths[stage]}")
        return sum(depths[:stage]) + block + 1
    if m := _DOWNSAMPLE.match(name):
        stage = int(m[1])
        _check_stage(name, stage, depths)
        return sum(depths[:stage + 1])
    return sum(depths) + 1


def _check_stage(name: str, stage: int, depths: Sequence[int]) -> None:
    if stage >= len(depths):
        raise ValueError(f"parameter {name!r}: stage {stage} is beyond depths={list(depths)}")


def is_no_decay(name: str, param: torch.Tensor, no_decay_keywords: Iterable[str]) -> bool:
    """Biases, 1-D tensors (norm weights, q/v biases) and names holding a keyword get no weight decay.

    A keyword matches whole dotted components of the name (`cpb_mlp` matches
    `encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight`). The official SimMIM pretraining prefixes its
    keywords (`encoder.cpb_mlp`), which are then substrings of no real name, so its 2-D `cpb_mlp`
    weights and `logit_scale` silently get decay (SWINV2_REFERENCE.md §1.10); pass bare keywords here.
    Under ZeRO-3 a parameter is a partition whose `shape` is empty; `ds_shape` holds the real one.
    """
    shape = getattr(param, "ds_shape", param.shape)
    if len(shape) <= 1 or name.endswith(".bias"):
        return True
    padded = f".{name}."
    return any(f".{kw}." in padded for kw in no_decay_keywords)


def build_param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float = 1.0,
                       depths: Sequence[int] = (), no_decay_keywords: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups for `model`, one per distinct (lr_scale, weight_decay).

    Each group holds `params`, `weight_decay`, `lr_scale` and `family`: "decay" / "no_decay", suffixed
    with `/layer_<id>` when layer decay is on, for logging lr per family. `layer_decay=1.0` gives one
    scale and ignores `depths`. Frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if layer_decay != 1.0 and not depths:
        raise ValueError("layer_decay != 1 needs the model's depths")
    no_decay_keywords = tuple(no_decay_keywords)
    num_layers = sum(depths) + 1

    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if is_no_decay(name, param, no_decay_keywords) else weight_decay
        family = "decay" if wd else "no_decay"
        lr_scale = 1.0
        if layer_decay != 1.0:
            lid = layer_id(name, depths)
            lr_scale = layer_decay ** (num_layers - lid)
            family = f"{family}/layer_{lid:02d}"
        group = groups.setdefault((lr_scale, wd), {
            "params": [], "weight_decay": wd, "lr_scale": lr_scale, "family": family})
        group["params"].append(param)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return list(groups.values())
