import pytest
import torch

from models.simmim import SimMIM, encoder_state_dict
from models.swinv2 import SwinTransformerV2, load_pretrained
from swinv2_cases import MICRO

# The loss (masked L1 over normalised targets) is the trainer's: tests/pretrain/test_objectives.py.


def test_forward_is_a_float32_reconstruction_that_trains_the_mask_token():
    torch.manual_seed(0)
    model = SimMIM(**MICRO)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16)
    mask[:, :8] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruction = model(image, mask)
    assert reconstruction.shape == (2, 3, 64, 64) and reconstruction.dtype == torch.float32
    reconstruction.abs().mean().backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0


def test_mask_token_replaces_masked_patches_only():
    torch.manual_seed(0)
    model = SimMIM(**MICRO).eval()
    image = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16)
    mask[0, 0, 0] = 1
    other = image.clone()
    other[..., :4, :4] += 5  # only the masked patch's pixels change
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(image, mask), model.encoder(other, mask))


def test_state_dict_names_and_encoder_weights_load_into_backbone():
    model = SimMIM(**MICRO)
    keys = set(model.state_dict())
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias", "encoder.norm.weight"} <= keys
    assert model.state_dict()["decoder.0.weight"].shape == (32 * 32 * 3, MICRO["embed_dim"] * 8, 1, 1)
    bare = encoder_state_dict(model.state_dict())
    assert not any(k.startswith(("decoder", "encoder")) or k == "mask_token" for k in bare)
    backbone = SwinTransformerV2(num_classes=5, **MICRO)
    assert set(load_pretrained(backbone, bare).missing_keys) == {"head.weight", "head.bias"}
    # the SimMIM checkpoint itself (encoder.-prefixed, with decoder) loads the same way
    assert set(load_pretrained(backbone, {"model": model.state_dict()}).missing_keys) == {"head.weight", "head.bias"}
    torch.testing.assert_close(backbone.layers[0].blocks[0].attn.qkv.weight,
                               model.encoder.layers[0].blocks[0].attn.qkv.weight)


def test_bad_mask_shape_is_a_clear_error():
    model = SimMIM(**MICRO)
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 8, 8))
