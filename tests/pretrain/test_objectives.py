"""The stages' objectives (pretrain/objectives.py): SimMIM's masked L1 over normalised targets and the
supervised soft-target cross-entropy, against the official formulas, through an engine's casts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.simmim import SimMIM
from pretrain.engine import Engine
from pretrain.objectives import (MaskedReconstruction, SoftTargetCrossEntropy, masked_l1, norm_targets,
                                 soft_target_cross_entropy)
from tests.models.swinv2_cases import MICRO

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _official_norm_targets(x, patch):
    """The SimMIM reference: 2-D average pools."""
    pool = dict(kernel_size=patch, stride=1, padding=patch // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(x), count_include_pad=True, **pool) * patch ** 2
    var = torch.clamp((mean_sq - mean ** 2) * (count / (count - 1)), min=0.0)
    return (x - mean) / (var + 1e-6) ** 0.5


def _official_loss(reconstruction, target, mask, patch_size):
    """Mean |reconstruction - target| over the masked pixels and the channels."""
    pixel_mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    return (reconstruction - target).abs()[pixel_mask.expand_as(target).bool()].mean()


class OneDeviceEngine:
    """What an objective uses of an engine: `Engine.forward` itself (the cast to the engine's dtype and the
    autocast) around a plain model."""
    forward = Engine.forward

    def __init__(self, model, dtype):
        self.model, self.device, self.dtype = model.to(dtype), torch.device("cpu"), dtype

    def _forward(self, *args):
        return self.model(*args)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, 64, 64, generator=gen) * 2 + 1,
            "mask": (torch.rand(2, 16, 16, generator=gen) > 0.4).long()}


def test_norm_targets_matches_reference():
    x = torch.randn(2, 3, 40, 36) * 2 + 1
    torch.testing.assert_close(norm_targets(x, 11), _official_norm_targets(x, 11), atol=1e-4, rtol=1e-4)


def test_loss_is_l1_over_masked_pixels_and_channels():
    torch.manual_seed(0)
    model = SimMIM(**MICRO)
    image, mask = batch().values()
    reconstruction = model(image, mask)
    loss = masked_l1(reconstruction, image, mask, norm_target_patch=None)
    torch.testing.assert_close(loss, _official_loss(reconstruction, image, mask, 4), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simmim_objective_targets_the_pixels_the_model_saw(dtype):
    """Through an engine the target is built from the input as cast for the model (bf16 under a bf16
    engine), normalised over norm_target_patch: the official formula on those pixels."""
    torch.manual_seed(0)
    engine = OneDeviceEngine(SimMIM(**MICRO), dtype)
    objective = MaskedReconstruction(11, MEAN, STD)
    b = batch()
    loss, extras = objective.loss(engine, b)
    assert extras == {} and loss.dtype == torch.float32 and loss.requires_grad
    seen = b["image"].to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        reconstruction = engine.model(seen, b["mask"])
    assert torch.equal(loss.detach(), masked_l1(reconstruction, seen, b["mask"], 11))
    official = _official_loss(reconstruction, _official_norm_targets(seen.float(), 11), b["mask"], 4)
    torch.testing.assert_close(loss.detach(), official, rtol=1e-4, atol=1e-5)


def test_simmim_objective_shows_its_last_micro_batch():
    torch.manual_seed(0)
    objective = MaskedReconstruction(None, MEAN, STD)
    assert objective.images() == {}
    objective.loss(OneDeviceEngine(SimMIM(**MICRO), torch.float32), batch())
    panel = objective.images()["simmim/reconstruction"]
    assert panel.dtype == np.uint8 and panel.shape == (64, 3 * 64 + 2 * 4, 3)


def test_soft_target_cross_entropy_is_label_smoothed_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, generator=gen), torch.tensor([0, 3, 4, 1])
    smoothing = 0.1
    target = F.one_hot(labels, 5).float() * (1 - smoothing) + smoothing / 5
    torch.testing.assert_close(soft_target_cross_entropy(logits, target),
                               F.cross_entropy(logits, labels, label_smoothing=smoothing))
    loss, extras = SoftTargetCrossEntropy().loss(OneDeviceEngine(torch.nn.Identity(), torch.float32),
                                                 {"image": logits, "target": target})
    assert extras == {} and torch.equal(loss, soft_target_cross_entropy(logits, target))
    assert SoftTargetCrossEntropy().images() == {}
