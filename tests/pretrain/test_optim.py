"""AdamW groups: weight-decay exemptions and layer-wise lr decay over the real SwinV2 / SimMIM layer ids."""
import pytest
import torch

from models import SimMIM, SwinTransformerV2
from pretrain.config import OptimConfig
from pretrain.optim import build_optimizer, build_param_groups, is_no_decay

KEYWORDS = ("cpb_mlp", "logit_scale", "mask_token")
DEPTHS = (2, 1)  # L = 3: ids 0 (stem) .. 4 (norm, head, decoder)
TINY = dict(img_size=32, patch_size=4, embed_dim=4, depths=DEPTHS, num_heads=(1, 2), window_size=4,
            pretrained_window_sizes=(0, 0))


def tiny_swin() -> SwinTransformerV2:
    return SwinTransformerV2(num_classes=5, **TINY)


def tiny_simmim() -> SimMIM:
    return SimMIM(encoder_stride=8, **TINY)


def group_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


@pytest.mark.parametrize("simmim", [False, True])
def test_layer_ids_follow_the_official_rule(simmim):
    model = tiny_simmim() if simmim else tiny_swin()
    ids = model.layer_ids()
    assert ids.keys() == dict(model.named_parameters()).keys()  # every parameter has one
    p = "encoder." if simmim else ""
    assert ids[p + "patch_embed.proj.weight"] == 0
    assert ids[p + "layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids[p + "layers.0.blocks.1.norm1.weight"] == 2
    assert ids[p + "layers.0.downsample.reduction.weight"] == 2
    assert ids[p + "layers.1.blocks.0.mlp.fc1.weight"] == 3
    assert ids[p + "norm.weight"] == 4
    if simmim:
        assert ids["encoder.mask_token"] == 0 and ids["decoder.0.weight"] == 4
    else:
        assert ids["head.weight"] == 4


def test_no_decay_on_biases_norms_and_keywords_but_decay_on_weights():
    model = tiny_simmim()
    named = dict(model.named_parameters())
    no_decay = {n for n, p in named.items() if is_no_decay(n, p, KEYWORDS)}
    blk = "encoder.layers.0.blocks.0."
    for name in ["encoder.patch_embed.proj.bias", blk + "norm1.weight", blk + "attn.q_bias",
                 blk + "attn.logit_scale", blk + "attn.cpb_mlp.0.weight", blk + "attn.cpb_mlp.2.weight",
                 "encoder.mask_token", "encoder.layers.0.downsample.norm.weight", "decoder.0.bias"]:
        assert name in no_decay, name
    for name in ["encoder.patch_embed.proj.weight", blk + "attn.qkv.weight", blk + "attn.proj.weight",
                 "encoder.layers.0.downsample.reduction.weight", "decoder.0.weight"]:
        assert name not in no_decay, name


def test_prefixed_keywords_do_not_match_like_the_official_simmim_quirk():
    # Keywords match whole name components; the official "encoder.cpb_mlp" is not a component run of
    # "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight", which is why bare keywords are required.
    weight = torch.zeros(8, 2)
    name = "encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight"
    assert not is_no_decay(name, weight, ["encoder.cpb_mlp"])
    assert is_no_decay(name, weight, ["cpb_mlp"])
    assert is_no_decay(name, weight, ["attn.cpb_mlp"])
    assert not is_no_decay("layers.0.blocks.0.attn.cpb_mlp_extra.weight", weight, ["cpb_mlp"])


def test_zero3_partitioned_parameter_uses_ds_shape():
    partition = torch.nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside a gather
    partition.ds_shape = torch.Size([16, 4])
    assert not is_no_decay("layers.0.blocks.0.attn.qkv.weight", partition, KEYWORDS)
    partition.ds_shape = torch.Size([16])
    assert is_no_decay("layers.0.blocks.0.norm1.weight", partition, KEYWORDS)


def test_without_layer_decay_two_groups_cover_every_parameter_once():
    model = tiny_simmim()
    groups = build_param_groups(model, weight_decay=0.05, no_decay_keywords=KEYWORDS)
    assert sorted(g["family"] for g in groups) == ["decay", "no_decay"]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert {g["family"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_layer_decay_scales_and_merges_groups():
    model = tiny_swin()
    groups = build_param_groups(model, weight_decay=0.1, layer_decay=0.5, no_decay_keywords=KEYWORDS)
    keys = [(g["lr_scale"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))
    # ids 0..4, each with decayed and undecayed parameters.
    assert len(groups) == 10
    assert group_of(groups, model.patch_embed.proj.weight)["lr_scale"] == pytest.approx(0.5 ** 4)
    assert group_of(groups, model.patch_embed.proj.weight)["family"] == "decay/layer_00"
    reduction = model.layers[0].downsample.reduction.weight
    assert group_of(groups, reduction) is group_of(groups, model.layers[0].blocks[1].attn.qkv.weight)
    assert group_of(groups, reduction)["lr_scale"] == pytest.approx(0.5 ** 2)
    assert group_of(groups, model.head.weight)["lr_scale"] == 1.0
    assert group_of(groups, model.head.bias)["family"] == "no_decay/layer_04"


def test_simmim_wrapper_gets_the_same_ids_as_the_bare_model():
    model = tiny_simmim()
    groups = build_param_groups(model, weight_decay=0.1, layer_decay=0.9, no_decay_keywords=KEYWORDS)
    assert group_of(groups, model.encoder.mask_token)["family"] == "no_decay/layer_00"
    assert group_of(groups, model.encoder.layers[1].blocks[0].attn.qkv.weight)["family"] == "decay/layer_03"
    assert group_of(groups, model.decoder[0].weight)["lr_scale"] == 1.0


def test_the_optimizer_is_adamw_over_the_groups_and_frozen_parameters_are_left_out():
    model = tiny_swin()
    model.head.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.9, betas=[0.8, 0.9]))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    assert not any(p is model.head.weight for g in opt.param_groups for p in g["params"])
    assert {g["family"] for g in opt.param_groups} >= {"decay/layer_00", "no_decay/layer_04"}


@pytest.mark.parametrize("kwargs, word", [
    (dict(weight_decay=0.1, layer_decay=0.0), "layer_decay"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_param_groups(tiny_swin(), **kwargs)


@pytest.mark.parametrize("simmim", [False, True])
def test_real_swinv2_names_reach_every_layer_id(simmim):
    kwargs = dict(img_size=32, patch_size=4, embed_dim=8, depths=(2, 3), num_heads=(1, 2), window_size=4,
                  pretrained_window_sizes=(0, 0), extra_norm_period=2)
    model = SimMIM(encoder_stride=8, **kwargs) if simmim else SwinTransformerV2(num_classes=3, **kwargs)
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.8,
                                no_decay_keywords=model.no_weight_decay_keywords())
    assert {g["family"].split("/")[1] for g in groups} == {f"layer_{i:02d}" for i in range(7)}
    encoder = model.encoder if simmim else model
    family = {id(p): g["family"] for g in groups for p in g["params"]}
    block = encoder.layers[1].blocks[1]  # id 2 + 1 + 1 = 4; its norm3 is the extra norm (period 2)
    assert family[id(block.attn.qkv.weight)] == "decay/layer_04"
    assert family[id(block.norm3.weight)] == "no_decay/layer_04"
    assert family[id(block.attn.cpb_mlp[0].weight)] == "no_decay/layer_04"
    assert family[id(block.attn.logit_scale)] == "no_decay/layer_04"
    assert family[id(encoder.layers[0].downsample.reduction.weight)] == "decay/layer_02"
    if simmim:
        assert family[id(encoder.mask_token)] == "no_decay/layer_00"
        assert family[id(model.decoder[0].weight)] == "decay/layer_06"
