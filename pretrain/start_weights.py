"""Where fine-tuning and evaluation start from: a run directory or one weights file, the windows its
position bias was trained at, the head rows a class map keeps, and the EMA a fine-tune saved.

SwinV2's continuous position bias transfers to a larger window when the meta network (`cpb_mlp`) keeps
its weights and its inputs keep their scale: offsets are divided by (pretrained window - 1), so offsets
inside the old window give the network exactly the inputs it was trained on, and only the larger ones are
new (paper §3.3; the official fine-tuning configs pass PRETRAINED_WINDOW_SIZES [12, 12, 12, 6] from
192px/window 12, whose last stage is a 6x6 map). The position tables themselves are shape-derived buffers
that the model rebuilds for its own window; they are never loaded.
"""
from __future__ import annotations

from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from models import layouts
from models.swinv2 import block_window, feature_map_sides
from pretrain import rundir
from pretrain.checkpoint import read_client_states, tag_step
from pretrain.config import ConfigError
from pretrain.ema import merge_shards
from pretrain.engine import engine_class

HEAD_KEYS = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")  # official and timm layouts


@dataclass(frozen=True)
class Source:
    """A run directory (its latest checkpoint, read with the engine that wrote it) or one weights file."""
    path: Path
    config: DictConfig | None = None  # the run's config.yaml; None for a weights file

    @property
    def tag_dir(self) -> Path:
        directory = rundir.checkpoint_dir(self.path)
        return directory / rundir.latest_tag(directory)

    @property
    def step(self) -> int:
        return tag_step(self.tag_dir.name) if self.config is not None else 0

    def __str__(self) -> str:
        return str(self.tag_dir if self.config is not None else self.path)


def resolve_source(spec: str, hint: str) -> Source:
    """stage.init_from as a Source; a clear error when it is neither a weights file nor a finished run."""
    path = Path(spec)
    if path.is_file():
        return Source(path)
    if rundir.finished(path):
        return Source(path, rundir.saved_config(path))
    raise ConfigError(f"stage.init_from={spec}: neither a weights file nor a run dir with a finished checkpoint "
                      f"({hint})")


def read_weights(source: Source) -> dict[str, torch.Tensor]:
    """The source's whole state dict, on the CPU."""
    if source.config is not None:
        tag_dir = source.tag_dir
        return engine_class(rundir.checkpoint_engine(tag_dir)).read_weights(tag_dir.parent, tag_dir.name)
    try:  # a torch file, or convert_checkpoint.py's pickle-free .safetensors export (any layout)
        state = layouts.read_weights(source.path)
    except ValueError as err:  # the message starts with the path
        raise ValueError(f"stage.init_from={err}") from None
    return state["model"] if isinstance(state.get("model"), dict) else state


def read_ema_weights(source: Source, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The EMA of the weights a fine-tune kept (stage.ema_decay > 0), joined from every rank's client state."""
    if source.config is None:
        raise ConfigError(f"stage.ema: the EMA lives in a run dir's checkpoint, but stage.init_from is the file "
                          f"{source.path}")
    states = [client.get("ema") for client in read_client_states(source.tag_dir)]
    if not states or any(s is None for s in states):
        raise ConfigError(f"stage.ema: {source.tag_dir} holds no EMA of the weights (fine-tune with "
                          "stage.ema_decay > 0 to keep one)")
    return merge_shards([s["shards"] for s in states], shapes)


def trained_windows(model: Any) -> list[int]:
    """Per stage, the window size the position bias of a model with this config was trained at: its own
    `pretrained_window_sizes` where set (a fine-tune of a fine-tune keeps the first scale), else its window,
    clamped to the stage's feature map as the model clamps it."""
    maps = feature_map_sides(model.img_size, model.patch_size, len(model.depths))
    return [given if given > 0 else block_window(resolution, model.window_size)
            for given, resolution in zip(model.pretrained_window_sizes, maps)]


# Class maps shipped in the data package, by name; `imagenet22k_to_1k` is the official repo's
# data/map22kto1k.txt (microsoft/Swin-Transformer): line i = the ImageNet-22K head row of ImageNet-1K class i.
CLASS_MAPS = {"imagenet22k_to_1k": "imagenet22k_to_1k.txt"}


def read_class_map(path: str, num_classes: int) -> list[int]:
    """Line i of the file is the source head row that becomes class i (the official map22kto1k.txt format);
    `path` is a file or the name of a shipped map (CLASS_MAPS)."""
    file = Path(str(resources.files("data") / CLASS_MAPS[path])) if path in CLASS_MAPS else Path(path)
    if not file.is_file():
        raise ConfigError(f"stage.class_map={path}: no such file (nor one of the shipped maps {sorted(CLASS_MAPS)})")
    rows = []
    for i, line in enumerate(file.read_text().strip().splitlines(), 1):
        try:
            rows.append(int(line))
        except ValueError:
            raise ConfigError(f"stage.class_map={path}: line {i} is not a row index: {line!r}") from None
    if len(rows) != num_classes:
        raise ConfigError(f"stage.class_map={path}: {len(rows)} lines, but data.num_classes is {num_classes} "
                          "(one line per class)")
    return rows


def select_head_rows(state: dict[str, torch.Tensor], rows: list[int], path: str) -> dict[str, torch.Tensor]:
    """The state dict with its head cut down to `rows`, in that order."""
    keys = [k for k in HEAD_KEYS if k in state]
    if not keys:
        raise ConfigError(f"stage.class_map={path}: the source has no classification head to take rows from")
    source_classes = state[keys[0]].shape[0]
    bad = [(line, row) for line, row in enumerate(rows, 1) if not 0 <= row < source_classes]
    if bad:
        raise ConfigError(f"stage.class_map={path}: line {bad[0][0]} names row {bad[0][1]}, but the source head "
                          f"has {source_classes} classes ({len(bad)} such lines)")
    index = torch.tensor(rows)
    return {**state, **{k: state[k].index_select(0, index) for k in keys}}
