"""Analytic forward FLOPs per image (2 per multiply-add), counting what torch's FlopCounterMode counts:
convolutions, linear layers and attention matmuls (elementwise ops, norms and softmax are not counted)."""
from collections.abc import Mapping

from models.swinv2 import block_window, feature_map_sides

_HIDDEN_CPB = 512


def _stage_windows(model_cfg: Mapping, img_size: int):
    """(tokens per side, channels, heads, window, depth) for each stage, with the window clamped."""
    sides = feature_map_sides(img_size, model_cfg["patch_size"], len(model_cfg["depths"]))
    for i, side in enumerate(sides):
        yield side, model_cfg["embed_dim"] * 2 ** i, model_cfg["num_heads"][i], \
            block_window(side, model_cfg["window_size"]), model_cfg["depths"][i]


def _encoder_flops(model_cfg: Mapping, img_size: int) -> int:
    p, C = model_cfg["patch_size"], model_cfg["embed_dim"]
    tokens = (img_size // p) ** 2
    flops = 2 * tokens * C * model_cfg.get("in_chans", 3) * p * p  # patch conv
    n = len(model_cfg["depths"])
    for i, (side, c, heads, window, depth) in enumerate(_stage_windows(model_cfg, img_size)):
        L, N = side * side, window * window
        hidden = int(c * model_cfg["mlp_ratio"])
        block = (2 * L * c * 3 * c          # qkv
                 + 4 * L * N * c            # q k^T and attn v over all windows and heads
                 + 2 * L * c * c            # proj
                 + 4 * L * c * hidden       # fc1 + fc2
                 + 2 * (2 * window - 1) ** 2 * (2 * _HIDDEN_CPB + _HIDDEN_CPB * heads))  # CPB MLP table
        flops += depth * block
        if i < n - 1:
            flops += 2 * (L // 4) * 4 * c * 2 * c  # patch merging reduction
    return flops


def swinv2_forward_flops(model_cfg: Mapping, num_classes: int, img_size: int | None = None) -> int:
    img_size = img_size or model_cfg["img_size"]
    num_features = model_cfg["embed_dim"] * 2 ** (len(model_cfg["depths"]) - 1)
    return _encoder_flops(model_cfg, img_size) + 2 * num_features * num_classes


def simmim_forward_flops(model_cfg: Mapping, img_size: int | None = None, encoder_stride: int = 32) -> int:
    img_size = img_size or model_cfg["img_size"]
    n = len(model_cfg["depths"])
    num_features = model_cfg["embed_dim"] * 2 ** (n - 1)
    last_tokens = feature_map_sides(img_size, model_cfg["patch_size"], n)[-1] ** 2
    return _encoder_flops(model_cfg, img_size) + 2 * last_tokens * num_features * encoder_stride ** 2 * 3
