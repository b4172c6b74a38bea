import copy
import math

import pytest
import timm.models.swin_transformer_v2 as timm_swinv2
import torch

from models.swinv2 import SwinTransformerV2, checkpoint_filter_fn, load_pretrained, relative_coords_table
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


@pytest.mark.parametrize("img_size,window_size,pretrained_window_sizes", [
    (192, 12, [0, 0, 0, 0]),  # the pretraining resolution
    (256, 16, [12, 12, 12, 6]),  # fine-tuned from 192/w12: stage 4's 8x8 map clamps the window to 8
])
def test_tiny_matches_timm_port_at_pretraining_and_fine_tuning_windows(img_size, window_size, pretrained_window_sizes):
    cfg = {**model_cfg("tiny"), "img_size": img_size, "window_size": window_size,
           "pretrained_window_sizes": pretrained_window_sizes, "attn_impl": "plain"}
    torch.manual_seed(0)
    ref = randomize_(timm_swinv2.SwinTransformerV2(
        num_classes=10, **{k: cfg[k] for k in ("img_size", "window_size", "pretrained_window_sizes", "embed_dim",
                                                "depths", "num_heads")}), seed=1).eval()
    ours = SwinTransformerV2(num_classes=10, **cfg).eval()
    result = load_pretrained(ours, ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


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


def _micro(**overrides):
    return SwinTransformerV2(num_classes=10, **{**MICRO, **overrides})


# --- block math -------------------------------------------------------------------------------------

def test_blocks_start_as_identity_and_official_init():
    torch.manual_seed(0)
    model = _micro()
    blk = model.layers[0].blocks[1]
    x = torch.randn(2, 16 * 16, MICRO["embed_dim"])
    torch.testing.assert_close(blk(x), x)  # zero-initialised res-post norms
    for b in model.blocks():
        assert b.norm1.weight.abs().sum() == 0 and b.norm2.bias.abs().sum() == 0
        torch.testing.assert_close(b.attn.logit_scale, torch.full_like(b.attn.logit_scale, math.log(10)))
        assert b.attn.q_bias.abs().sum() == 0 and b.attn.v_bias.abs().sum() == 0
    w = torch.cat([b.attn.cpb_mlp[0].weight.flatten() for b in model.blocks()] +
                  [b.mlp.fc1.weight.flatten() for b in model.blocks()])
    assert 0.018 < w.std() < 0.022 and abs(w.mean()) < 0.002  # trunc_normal_(std=.02), cut at +-2 (absolute)
    assert model.norm.weight.eq(1).all() and model.patch_embed.norm.weight.eq(1).all()


def test_logit_scale_is_clamped_at_100():
    torch.manual_seed(0)
    model = randomize_(_micro()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for b in model.blocks():
            b.attn.logit_scale.fill_(math.log(100))
        at_cap = model(x)
        for b in model.blocks():
            b.attn.logit_scale.fill_(math.log(1000))
        torch.testing.assert_close(model(x), at_cap)


def test_cpb_coordinates_and_bias_range():
    attn = _micro().layers[0].blocks[0].attn
    table = attn.relative_coords_table
    assert table.shape == (7, 7, 2)
    torch.testing.assert_close(table.abs().max(), torch.tensor(math.log2(9) / 3))  # +-8 -> log2(9)/log2(8)
    bias = attn.position_bias()
    assert bias.shape == (1, 16, 16) and bias.min() > 0 and bias.max() < 16  # 16 * sigmoid
    idx = attn.relative_position_index
    assert idx[0, 0] == 3 * 7 + 3 and idx.max() == 7 * 7 - 1 and idx.min() == 0


def test_linear_cpb_coordinates_are_the_normalised_offsets():
    linear = relative_coords_table(4, 0, "linear")
    offsets = torch.arange(-3, 4, dtype=torch.float32) / 3  # offsets / (window - 1), no log
    torch.testing.assert_close(linear[:, 3, 0], offsets)
    torch.testing.assert_close(linear[3, :, 1], offsets)
    assert linear.abs().max() == 1
    log = relative_coords_table(4, 0, "log")  # the official values: x = offset / 3 * 8, log2(1 + |x|) / 3
    torch.testing.assert_close(log[3, 4], torch.tensor([0.0, math.log2(1 + 8 / 3) / 3]))
    torch.testing.assert_close(log, torch.sign(linear) * torch.log2(linear.abs() * 8 + 1) / 3)


@pytest.mark.parametrize("coords", ["log", "linear"])
@pytest.mark.parametrize("window, pretrained", [(8, 4), (6, 4)])
def test_cpb_transfer_keeps_pretraining_coordinates_and_extrapolates(coords, window, pretrained):
    small = relative_coords_table(pretrained, 0, coords)
    big = relative_coords_table(window, pretrained, coords)
    assert big.shape == (2 * window - 1, 2 * window - 1, 2)
    inner = slice(window - pretrained, window + pretrained - 1)
    torch.testing.assert_close(big[inner, inner], small)  # offsets the pretraining window saw: same inputs
    far = (window - 1) / (pretrained - 1)  # the largest offset in pretraining units
    expected = far if coords == "linear" else math.log2(far * 8 + 1) / 3
    torch.testing.assert_close(big.abs().max(), torch.tensor(expected))


def test_linear_cpb_model_takes_the_same_weights_with_another_bias():
    log = _micro()
    linear = _micro(cpb_coords="linear")
    load_pretrained(linear, log.state_dict())
    attn_log, attn_linear = log.layers[0].blocks[0].attn, linear.layers[0].blocks[0].attn
    assert not torch.allclose(attn_log.position_bias(), attn_linear.position_bias())
    with pytest.raises(ValueError, match="cpb_coords"):
        _micro(cpb_coords="loglinear")


def test_window_clamping_and_shifts_at_192_w12():
    cfg = model_cfg("tiny")
    with torch.device("meta"):
        model = SwinTransformerV2(num_classes=0, **cfg)
    windows = [[(b.window_size, b.shift_size) for b in layer.blocks] for layer in model.layers]
    assert windows[0] == [(12, 0), (12, 6)] and windows[1] == [(12, 0), (12, 6)]
    assert windows[2] == [(12, 0)] * 6  # 12x12 map: one window, no shift
    assert windows[3] == [(6, 0), (6, 0)]  # window clamped to the 6x6 map


def test_shift_mask_separates_regions():
    from models.swinv2 import region_mask, shift_regions
    mask = region_mask(shift_regions(8, 8, 4, 2))
    assert mask.shape == (4, 16, 16)
    assert mask[0].eq(0).all()  # the top-left window holds one region
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    last = mask[3].view(4, 4, 4, 4)  # bottom-right window mixes four regions
    assert last[0, 0, 0, 0] == 0 and last[0, 0, 3, 3] == -100 and last[0, 0, 1, 1] == 0


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = randomize_(_micro(drop_path_rate=0.5))
    x = torch.randn(4, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    from models.swinv2 import DropPath
    out = DropPath(0.5).train()(torch.ones(1000, 3))
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_patch_merging_is_official_order_with_norm_after_reduction():
    from models.swinv2 import PatchMerging
    merge = PatchMerging(dim=2, resolution=4)
    x = torch.randn(1, 4, 4, 2)
    reference = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    expected = merge.norm(merge.reduction(reference.view(1, 4, 8)))
    torch.testing.assert_close(merge(x.view(1, 16, 2)), expected)
    assert merge.norm.normalized_shape == (4,)


def test_extra_norm_every_period_blocks_per_stage():
    with torch.device("meta"):
        giant = SwinTransformerV2(num_classes=0, **model_cfg("giant"))
    with_norm3 = [(i, j) for i, layer in enumerate(giant.layers) for j, b in enumerate(layer.blocks)
                  if b.norm3 is not None]
    assert with_norm3 == [(2, j) for j in range(5, 42, 6)]
    torch.manual_seed(0)
    model = randomize_(_micro(extra_norm_period=2)).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        model.layers[1].blocks[1].norm3.weight.mul_(2)
    assert not torch.allclose(model(x), before)  # norm3 sits on the main branch


# --- sequential attention ---------------------------------------------------------------------------

def _loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
def test_sequential_attention_equals_batched(attn_impl):
    torch.manual_seed(0)
    batched = randomize_(_micro(attn_impl=attn_impl)).eval()
    sequential = _micro(attn_impl=attn_impl, sequential_attn=[True, True, True, True], attn_chunk_size=3).eval()
    sequential.load_state_dict(batched.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_b, grads_b = _loss_and_grads(batched, x)
    out_s, grads_s = _loss_and_grads(sequential, x)
    assert (out_b - out_s).abs().max() <= 1e-5
    for name, g in grads_b.items():
        assert (g - grads_s[name]).abs().max() <= 1e-5, name


def test_plain_and_sdpa_paths_agree():
    torch.manual_seed(0)
    sdpa = randomize_(_micro()).eval()
    plain = _micro(attn_impl="plain").eval()
    plain.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_s, grads_s = _loss_and_grads(sdpa, x)
    out_p, grads_p = _loss_and_grads(plain, x)
    assert (out_s - out_p).abs().max() <= 1e-5
    assert all((g - grads_p[n]).abs().max() <= 1e-5 for n, g in grads_s.items())


# --- activation checkpointing -----------------------------------------------------------------------

def test_grad_checkpointing_rejects_unknown_mode():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        _micro().set_grad_checkpointing("deepspeed")


# --- meta build, materialise, init ------------------------------------------------------------------

def test_meta_build_materialised_equals_normal_build():
    torch.manual_seed(123)
    normal = _micro()
    with torch.device("meta"):
        meta = _micro()
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.init_weights()
    for (name, a), b in zip(normal.state_dict().items(), meta.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(normal.named_buffers(), meta.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_module_by_module_init_equals_init_weights():
    """What an engine does under ZeRO-3: initialise each module's own parameters in turn."""
    from models.simmim import SimMIM
    from models.swinv2 import init_module
    torch.manual_seed(7)
    normal = SimMIM(**MICRO)
    with torch.device("meta"):
        meta = SimMIM(**MICRO)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    for m in meta.modules():
        init_module(m)
    meta.encoder.init_buffers()
    for (name, a), b in zip(normal.state_dict().items(), meta.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert meta.encoder.mask_token.abs().sum() > 0


def test_giant_builds_on_meta_without_touching_memory():
    with torch.device("meta"):
        model = SwinTransformerV2(num_classes=21841, **model_cfg("giant_3b"))
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))  # nothing allocated, nothing initialised
    assert sum(p.numel() for p in model.parameters()) > 3e9


# --- parameter counts and FLOPs ---------------------------------------------------------------------

@pytest.mark.parametrize("name,expected,tolerance", [
    ("tiny", 28.35e6, 1e-3), ("small", 49.73e6, 1e-3), ("base", 87.92e6, 1e-3), ("large", 196.74e6, 1e-3),
    ("huge", 657.9e6, 1e-3), ("giant", 2.60e9, 5e-3), ("giant_3b", 3.00e9, 5e-3)])
def test_parameter_counts_with_1000_class_head(name, expected, tolerance):
    with torch.device("meta"):
        model = SwinTransformerV2(num_classes=1000, **model_cfg(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < tolerance, count


@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_analytic_flops_match_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    from models.flops import simmim_forward_flops, swinv2_forward_flops
    from models.simmim import SimMIM
    cfg = model_cfg(name)
    with torch.device("meta"):
        model = SwinTransformerV2(num_classes=1000, **cfg)
        simmim = SimMIM(**cfg)
        x = torch.randn(1, 3, 192, 192)
        with FlopCounterMode(display=False) as counter:
            model(x)
        with FlopCounterMode(display=False) as simmim_counter:
            simmim(x, torch.ones(1, 48, 48))
    assert abs(swinv2_forward_flops(cfg, 1000) / counter.get_total_flops() - 1) < 0.02
    assert abs(simmim_forward_flops(cfg) / simmim_counter.get_total_flops() - 1) < 0.02
    # another resolution and window: 256/w16 clamps stage 4 to an 8x8 window
    cfg = {**cfg, "window_size": 16}
    with torch.device("meta"):
        big = SwinTransformerV2(num_classes=10, **{**cfg, "img_size": 256})
        with FlopCounterMode(display=False) as counter:
            big(torch.randn(1, 3, 256, 256))
    assert abs(swinv2_forward_flops(cfg, 10, img_size=256) / counter.get_total_flops() - 1) < 0.02


@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
@pytest.mark.parametrize("sequential", [False, True])
def test_bf16_shifted_blocks_keep_their_mask(attn_impl, sequential):
    """A randomised model cast to bf16 (as ZeRO-3 bf16 holds it): each shifted block agrees with fp32 within a
    tolerance that a block without its shift mask misses several times over (the mask follows the bias dtype)."""
    torch.manual_seed(0)
    model = randomize_(_micro(attn_impl=attn_impl, sequential_attn=[sequential] * 4)).eval()
    low = copy.deepcopy(model).to(torch.bfloat16)
    assert low(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    tolerance, checked = 0.05, 0
    for block, block_low in zip(model.blocks(), low.blocks()):
        if block.attn_regions is None:
            continue
        unmasked = copy.deepcopy(block)
        unmasked.attn_regions.zero_()  # one region: nothing masked
        x = torch.randn(2, block.attn_regions.numel(), block.norm1.weight.numel())
        with torch.no_grad():
            expected = block(x)
            bf16_error = (block_low(x.bfloat16()).float() - expected).abs().max()
            mask_effect = (unmasked(x) - expected).abs().max()
        assert bf16_error < tolerance < mask_effect / 5, (bf16_error, mask_effect)
        checked += 1
    assert checked == 2  # stages 1 and 2 of the 64px/w4 model shift; stages 3 and 4 are one window each
