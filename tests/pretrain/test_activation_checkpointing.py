"""Activation checkpointing applied from outside the model: every mode recomputes to the plain gradients."""
import pytest
import torch

from models.swinv2 import SwinTransformerV2
from pretrain.activation_checkpointing import MODES, apply_grad_checkpointing
from tests.models.swinv2_cases import MICRO, randomize_


def loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_every_mode_gives_the_plain_gradients(mode):
    torch.manual_seed(0)
    model = randomize_(SwinTransformerV2(num_classes=10, **{**MICRO, "drop_path_rate": 0.2})).train()
    x = torch.randn(2, 3, 64, 64)  # drop path on: the RNG must replay in the recompute
    torch.manual_seed(1)
    out_ref, grads_ref = loss_and_grads(model, x)
    apply_grad_checkpointing(model, mode)
    torch.manual_seed(1)
    out, grads = loss_and_grads(model, x)
    torch.testing.assert_close(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5)
