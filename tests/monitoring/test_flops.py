"""The analytic FLOPs behind MFU, checked against torch's FlopCounterMode on the nano model."""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from models import SimMIM, SwinTransformerV2, simmim_forward_flops, swinv2_forward_flops
from pretrain.config import CONF_DIR
from pretrain.metrics import TRAIN_FLOPS_PER_FORWARD
from pretrain.recipes import model_kwargs

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def nano() -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "swinv2_nano.yaml"))
    # Plain attention: FlopCounterMode has no formula for SDPA's fused CPU kernel, so it would miss q k^T and
    # attn v there (the analytic count is the same for both implementations).
    return {**model_kwargs(cfg), "attn_impl": "plain"}


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_swinv2_forward_flops_match_the_counter(nano):
    model = SwinTransformerV2(**nano, num_classes=NUM_CLASSES).eval()
    image = torch.randn(1, 3, nano["img_size"], nano["img_size"])  # batch 1: the CPB table is per forward
    with torch.no_grad():
        assert counted_flops(lambda: model(image)) == swinv2_forward_flops(nano, NUM_CLASSES)


def test_simmim_forward_flops_match_the_counter(nano):
    model = SimMIM(**nano).eval()
    image = torch.randn(1, 3, nano["img_size"], nano["img_size"])
    mask = torch.zeros(1, nano["img_size"] // 4, nano["img_size"] // 4)
    with torch.no_grad():
        assert counted_flops(lambda: model(image, mask)) == simmim_forward_flops(nano)


def test_a_training_step_costs_three_forwards(nano):
    model = SwinTransformerV2(**nano, num_classes=NUM_CLASSES)
    batch = 2
    image = torch.randn(batch, 3, nano["img_size"], nano["img_size"])
    step = counted_flops(lambda: model(image).sum().backward())
    # Backward is about 2x forward; the first conv needs no input gradient, so a little under 3x.
    assert step / (batch * swinv2_forward_flops(nano, NUM_CLASSES)) == pytest.approx(TRAIN_FLOPS_PER_FORWARD, rel=0.03)
