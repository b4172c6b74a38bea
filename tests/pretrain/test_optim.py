import pytest
import torch
from torch import nn

from pretrain.optim import build_param_groups, is_no_decay, layer_id

KEYWORDS = ("cpb_mlp", "logit_scale", "mask_token")
DEPTHS = (2, 1)  # L = 3: ids 0 (stem) .. 4 (norm, head, decoder)


class Attn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(heads, 1, 1))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads, bias=False))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = Attn(dim, 2)
        self.norm1 = nn.LayerNorm(dim)


class Stage(nn.Module):
    def __init__(self, depth, dim, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        if downsample:
            self.downsample = nn.Module()
            self.downsample.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
            self.downsample.norm = nn.LayerNorm(2 * dim)


class TinySwin(nn.Module):
    """Just the official SwinV2 parameter names (microsoft/Swin-Transformer), at toy sizes."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 4, 4)
        self.layers = nn.ModuleList([Stage(2, 4, True), Stage(1, 8, False)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)


class TinySimMIM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = TinySwin()
        self.encoder.head = nn.Identity()
        self.encoder.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.decoder = nn.Sequential(nn.Conv2d(8, 48, 1), nn.PixelShuffle(4))


def group_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


@pytest.mark.parametrize("prefix", ["", "encoder."])
def test_layer_ids_follow_the_official_rule(prefix):
    assert layer_id(prefix + "patch_embed.proj.weight", DEPTHS) == 0
    assert layer_id(prefix + "mask_token", DEPTHS) == 0
    assert layer_id(prefix + "layers.0.blocks.0.attn.qkv.weight", DEPTHS) == 1
    assert layer_id(prefix + "layers.0.blocks.1.norm1.weight", DEPTHS) == 2
    assert layer_id(prefix + "layers.0.downsample.reduction.weight", DEPTHS) == 2
    assert layer_id(prefix + "layers.1.blocks.0.mlp.fc1.weight", DEPTHS) == 3
    assert layer_id(prefix + "norm.weight", DEPTHS) == 4
    assert layer_id("head.weight", DEPTHS) == 4
    assert layer_id("decoder.0.weight", DEPTHS) == 4


def test_layer_id_rejects_names_beyond_depths():
    with pytest.raises(ValueError, match="layers.2.blocks.0"):
        layer_id("layers.2.blocks.0.attn.qkv.weight", DEPTHS)
    with pytest.raises(ValueError, match=r"depths\[1\]=1"):
        layer_id("layers.1.blocks.1.attn.qkv.weight", DEPTHS)


def test_no_decay_on_biases_norms_and_keywords_but_decay_on_weights():
    model = TinySimMIM()
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
    partition = nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside a gather
    partition.ds_shape = torch.Size([16, 4])
    assert not is_no_decay("layers.0.blocks.0.attn.qkv.weight", partition, KEYWORDS)
    partition.ds_shape = torch.Size([16])
    assert is_no_decay("layers.0.blocks.0.norm1.weight", partition, KEYWORDS)


def test_without_layer_decay_two_groups_cover_every_parameter_once():
    model = TinySimMIM()
    groups = build_param_groups(model, weight_decay=0.05, no_decay_keywords=KEYWORDS)
    assert sorted(g["family"] for g in groups) == ["decay", "no_decay"]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert {g["family"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_layer_decay_scales_and_merges_groups():
    model = TinySwin()
    groups = build_param_groups(model, weight_decay=0.1, layer_decay=0.5, depths=DEPTHS,
                                no_decay_keywords=KEYWORDS)
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
    model = TinySimMIM()
    groups = build_param_groups(model, weight_decay=0.1, layer_decay=0.9, depths=DEPTHS,
                                no_decay_keywords=KEYWORDS)
    assert group_of(groups, model.encoder.mask_token)["family"] == "no_decay/layer_00"
    assert group_of(groups, model.encoder.layers[1].blocks[0].attn.qkv.weight)["family"] == "decay/layer_03"
    assert group_of(groups, model.decoder[0].weight)["lr_scale"] == 1.0


def test_groups_drive_adamw_and_frozen_parameters_are_left_out():
    model = TinySwin()
    model.head.requires_grad_(False)
    groups = build_param_groups(model, weight_decay=0.1, no_decay_keywords=KEYWORDS)
    assert not any(p is model.head.weight for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["family"] for g in opt.param_groups] == [g["family"] for g in groups]


@pytest.mark.parametrize("kwargs, word", [
    (dict(weight_decay=0.1, layer_decay=0.0), "layer_decay"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay=0.1, layer_decay=0.9), "depths"),
])
def test_bad_arguments_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_param_groups(TinySwin(), **kwargs)


@pytest.mark.parametrize("simmim", [False, True])
def test_real_swinv2_names_reach_every_layer_id(simmim):
    """Guards the name patterns against the real model: a renamed module would silently fall to L + 1."""
    from models import SimMIM, SwinTransformerV2

    kwargs = dict(img_size=32, patch_size=4, embed_dim=8, depths=(2, 3), num_heads=(1, 2), window_size=4,
                  pretrained_window_sizes=(0, 0), extra_norm_period=2)
    model = SimMIM(encoder_stride=8, **kwargs) if simmim else SwinTransformerV2(num_classes=3, **kwargs)
    groups = build_param_groups(model, weight_decay=0.05, layer_decay=0.8, depths=kwargs["depths"],
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
