"""Shared cases for the models tests."""
from pathlib import Path

import torch
import yaml

from pretrain.recipes import model_kwargs

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"
CONFIG_NAMES = ("nano", "tiny", "small", "base", "large", "huge", "giant", "giant_3b")
# Small enough for exact CPU checks in a fraction of a second: 64px, window 4, shifted and clamped blocks.
MICRO = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
             window_size=4, pretrained_window_sizes=[0, 0, 0, 0], mlp_ratio=2.0, drop_path_rate=0.0,
             extra_norm_period=0, sequential_attn=[False] * 4, attn_chunk_size=3, attn_impl="sdpa")


def model_cfg(name: str) -> dict:
    """A conf/model yaml as SwinTransformerV2 keyword arguments."""
    return model_kwargs(yaml.safe_load((CONF_MODEL / f"swinv2_{name}.yaml").read_text()))


def randomize_(model: torch.nn.Module, seed: int = 0):
    """Perturb every parameter so the zero-initialised post-norms and biases take part in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
