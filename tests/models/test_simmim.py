import pytest
import torch
import torch.nn.functional as F

from models.simmim import SimMIM, encoder_state_dict, norm_targets
from models.swinv2 import SwinTransformerV2, load_pretrained
from swinv2_cases import MICRO


def _official_norm_targets(x, patch):
    """The SimMIM reference: 2-D average pools."""
    pool = dict(kernel_size=patch, stride=1, padding=patch // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(x), count_include_pad=True, **pool) * patch ** 2
    var = torch.clamp((mean_sq - mean ** 2) * (count / (count - 1)), min=0.0)
    return (x - mean) / (var + 1e-6) ** 0.5


def test_norm_targets_matches_reference():
    x = torch.randn(2, 3, 40, 36) * 2 + 1
    torch.testing.assert_close(norm_targets(x, 11), _official_norm_targets(x, 11), atol=1e-4, rtol=1e-4)


def test_loss_is_l1_over_masked_pixels_and_channels():
    torch.manual_seed(0)
    model = SimMIM(norm_target=False, **MICRO)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16)
    mask[:, :8] = 1
    out = model(image, mask)
    assert out["reconstruction"].shape == (2, 3, 64, 64)
    pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(-1, 3, -1, -1).bool()
    expected = (out["reconstruction"] - image).abs()[pixel_mask].mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-6)
    out["loss"].backward()
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
