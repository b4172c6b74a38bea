import math

import pytest
import timm.models.swin_transformer_v2 as timm_swinv2
import torch

from models.swinv2 import SwinTransformerV2, checkpoint_filter_fn, load_pretrained
from swinv2_cases import CONFIG_NAMES, MICRO, model_cfg, randomize_


def _timm_micro(num_classes=10, **overrides):
    cfg = {k: v for k, v in MICRO.items()
           if k not in ("extra_norm_period", "sequential_attn", "attn_chunk_size", "attn_impl")}
    cfg.update(overrides)
    return timm_swinv2.SwinTransformerV2(num_classes=num_classes, **cfg).eval()


@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
def test_matches_timm_port_through_checkpoint_filter(attn_impl):
    torch.manual_seed(0)
    ref = randomize_(_timm_micro())
    ours = SwinTransformerV2(num_classes=10, **{**MICRO, "attn_impl": attn_impl}).eval()
    result = load_pretrained(ours, ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x).flatten(1, 2),
                                   atol=1e-5, rtol=1e-5)


def test_state_dict_uses_official_keys():
    model = SwinTransformerV2(num_classes=10, **MICRO)
    keys = set(model.state_dict())
    for key in ("patch_embed.proj.weight", "patch_embed.norm.weight", "layers.0.blocks.1.attn.logit_scale",
                "layers.0.blocks.1.attn.q_bias", "layers.0.blocks.1.attn.v_bias", "layers.0.blocks.1.attn.qkv.weight",
                "layers.0.blocks.1.attn.cpb_mlp.0.weight", "layers.0.blocks.1.attn.cpb_mlp.0.bias",
                "layers.0.blocks.1.attn.cpb_mlp.2.weight", "layers.0.downsample.reduction.weight",
                "layers.2.downsample.norm.bias", "norm.weight", "head.weight", "head.bias"):
        assert key in keys, key
    assert "layers.3.downsample.reduction.weight" not in keys
    assert not any(k.endswith(("qkv.bias", "cpb_mlp.2.bias", "k_bias")) for k in keys)
    assert not any(b in k for k in keys for b in ("relative_coords_table", "relative_position_index", "attn_mask"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_builds_on_meta_with_forward_contract(name):
    with torch.device("meta"):
        model = SwinTransformerV2(num_classes=1000, **model_cfg(name))
    assert all(p.is_meta for p in model.parameters())
    assert len(model.blocks()) == sum(model_cfg(name)["depths"])
    assert {"cpb_mlp", "logit_scale"} <= model.no_weight_decay_keywords()


def test_nano_forward_shapes():
    cfg = {**model_cfg("nano"), "img_size": 64, "window_size": 4}
    model = SwinTransformerV2(num_classes=7, **cfg)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 4, cfg["embed_dim"] * 8)
    assert isinstance(SwinTransformerV2(num_classes=0, **cfg).head, torch.nn.Identity)
