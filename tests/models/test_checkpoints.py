"""Loading official, SimMIM, timm and old-`rpe_mlp` layouts, and transferring to another resolution/window."""
import pytest
import torch

from models import layouts
from models.swinv2 import (SwinTransformerV2, load_pretrained, region_mask, relative_coords_table,
                           relative_position_index)
from swinv2_cases import MICRO, model_cfg, randomize_


def _official_state_dict(model: SwinTransformerV2) -> dict:
    """What microsoft/Swin-Transformer saves: our keys plus its persistent shape-derived buffers."""
    sd = dict(model.state_dict())
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            W = blk.window_size
            prefix = f"layers.{i}.blocks.{j}."
            sd[prefix + "attn.relative_coords_table"] = relative_coords_table(W, 0).unsqueeze(0)
            sd[prefix + "attn.relative_position_index"] = relative_position_index(W)
            if blk.attn_regions is not None:
                sd[prefix + "attn_mask"] = region_mask(blk.attn_regions)
    return sd


@pytest.fixture
def source():
    torch.manual_seed(0)
    return randomize_(SwinTransformerV2(num_classes=10, **MICRO)).eval()


def _check_same_outputs(source, state_dict, num_classes=10):
    target = SwinTransformerV2(num_classes=num_classes, **MICRO).eval()
    result = load_pretrained(target, state_dict)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x))
    return target, result


def test_official_checkpoint_with_buffers_loads(source):
    sd = _official_state_dict(source)
    assert any(k.endswith("attn_mask") for k in sd)
    target, result = _check_same_outputs(source, {"model": sd, "epoch": 3})
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(target.head.weight, source.head.weight)


def test_official_checkpoint_buffers_are_left_out_of_the_weights_other_layouts_get(source):
    """convert_checkpoint.py turns a microsoft/Swin-Transformer `.pth` into timm or transformers weights."""
    sd = layouts.to_official(_official_state_dict(source))
    assert sd.keys() == source.state_dict().keys()
    for layout in layouts.LAYOUTS:
        assert layouts.to_official(layouts.from_official(sd, layout)).keys() == sd.keys()


def test_old_rpe_mlp_names_are_renamed(source):
    sd = {k.replace("cpb_mlp", "rpe_mlp"): v for k, v in _official_state_dict(source).items()}
    _check_same_outputs(source, sd)


def test_simmim_encoder_prefixed_checkpoint_loads_without_decoder(source):
    sd = {f"encoder.{k}": v for k, v in _official_state_dict(source).items() if not k.startswith("head.")}
    sd["encoder.mask_token"] = torch.zeros(1, 1, MICRO["embed_dim"])
    sd["decoder.0.weight"] = torch.zeros(3072, MICRO["embed_dim"] * 8, 1, 1)
    sd["decoder.0.bias"] = torch.zeros(3072)
    _, result = _check_same_outputs(source, {"model": sd})
    assert set(result.missing_keys) == {"head.weight", "head.bias"}


def test_timm_layout_maps_back_to_official(source):
    sd = {}
    for k, v in source.state_dict().items():  # timm: downsample at the start of the next stage, head.fc
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.", f"layers.{i + 1}.", 1)
        sd[k.replace("head.", "head.fc.")] = v
    target, _ = _check_same_outputs(source, sd)
    torch.testing.assert_close(target.head.bias, source.head.bias)


def test_head_of_another_size_is_left_out(source):
    _, result = _check_same_outputs(source, source.state_dict(), num_classes=5)
    assert set(result.missing_keys) == {"head.weight", "head.bias"}


def test_wrong_checkpoint_is_a_clear_error(source):
    sd = source.state_dict()
    sd["layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch.*qkv"):
        load_pretrained(SwinTransformerV2(num_classes=10, **MICRO), sd)
    del sd["layers.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="missing.*qkv"):
        load_pretrained(SwinTransformerV2(num_classes=10, **MICRO), sd)


def test_resolution_and_window_transfer(source):
    """64px/w4 -> 128px/w8 with pretrained windows [4, 4, 4, 2] (like 192/w12 -> 384/w24 with [12, 12, 12, 6])."""
    big = SwinTransformerV2(num_classes=10, **{**MICRO, "img_size": 128, "window_size": 8,
                                               "pretrained_window_sizes": [4, 4, 4, 2]}).eval()
    load_pretrained(big, source.state_dict())
    small_attn, big_attn = source.layers[0].blocks[0].attn, big.layers[0].blocks[0].attn
    # CPB inputs for offsets inside the pretraining window are unchanged: the bias learned there carries over
    inner = big_attn.relative_coords_table[4:11, 4:11]
    torch.testing.assert_close(inner, small_attn.relative_coords_table)
    # beyond it the log-spaced coordinates extrapolate gently: 4x the offset range, under 1.6x the input range
    assert big_attn.relative_coords_table.abs().max() < 1.6 * small_attn.relative_coords_table.abs().max()
    with torch.no_grad():
        bias_table = 16 * torch.sigmoid(big_attn.cpb_mlp(big_attn.relative_coords_table))  # (15, 15, nH)
        steps = bias_table.diff(dim=0).abs().max(), bias_table.diff(dim=1).abs().max()
        small_table = 16 * torch.sigmoid(small_attn.cpb_mlp(small_attn.relative_coords_table))
        small_steps = small_table.diff(dim=0).abs().max(), small_table.diff(dim=1).abs().max()
    assert max(steps) <= max(small_steps) + 1e-6  # no jumps between neighbouring offsets
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_small = source(x)
        out_big = big(torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear"))
    assert torch.isfinite(out_big).all()
    # a smooth change: the transferred model still ranks the classes much as the source does
    assert torch.corrcoef(torch.stack([out_small.flatten(), out_big.flatten()]))[0, 1] > 0.5


def test_nano_192_w12_checkpoint_loads_at_640_w40():
    torch.manual_seed(0)
    cfg = model_cfg("nano")
    source = SwinTransformerV2(num_classes=0, **cfg)
    with torch.device("meta"):
        big = SwinTransformerV2(num_classes=0, **{**cfg, "img_size": 640, "window_size": 40,
                                                  "pretrained_window_sizes": [12, 12, 12, 6]})
    big.to_empty(device="cpu")
    big.init_buffers()
    load_pretrained(big, source.state_dict())
    assert [b.window_size for b in big.blocks()] == [40] * 6 + [20] * 2
    torch.testing.assert_close(big.layers[2].blocks[0].attn.cpb_mlp[0].weight,
                               source.layers[2].blocks[0].attn.cpb_mlp[0].weight)
    inner = big.layers[3].blocks[0].attn.relative_coords_table[14:25, 14:25]  # offsets -5..5 at window 20
    torch.testing.assert_close(inner, relative_coords_table(6, 0))
