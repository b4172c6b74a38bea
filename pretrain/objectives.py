"""What a stage trains for: the loss of one micro batch, and the pictures it can show of it.

Both objectives forward through the engine and compute their loss outside the model, in float32:
- SimMIM (`MaskedReconstruction`): the model returns its reconstruction; the loss is the L1 distance to the
  target over the masked pixels and the channels, the target being the input pixels, each normalised by the
  mean and std of its `norm_target_patch` neighbourhood (the official SimMIM target for SwinV2) or raw.
- Supervised (`SoftTargetCrossEntropy`): cross-entropy against the loader's soft targets (one-hot + label
  smoothing, mixed by Mixup/CutMix).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.engine import Engine


class Objective(Protocol):
    def loss(self, engine: Engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro batch: (loss to backward, extra metrics)."""

    def images(self) -> dict[str, np.ndarray]:
        """Pictures of the last micro batch for the logger (HWC uint8); {} where there are none."""


# ------------------------------------------------------------------------------------------------ SimMIM

def _box_mean(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean over each pixel's patch x patch neighbourhood (`patch` odd) with zero padding (avg_pool2d with
    count_include_pad=True), from cumulative sums: O(1) per pixel instead of O(patch^2)."""
    pad = patch // 2
    c = F.pad(x, (pad + 1, pad)).cumsum(-1)
    x = c[..., patch:] - c[..., :-patch]
    c = F.pad(x, (0, 0, pad + 1, pad)).cumsum(-2)
    return (c[..., patch:, :] - c[..., :-patch, :]) / (patch * patch)


def local_mean_std(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel, the mean and the std (unbiased variance + 1e-6, square-rooted) of its patch x patch
    neighbourhood inside the image: what the official SimMIM target for SwinV2 divides out. `patch` is odd
    (pretrain.config checks stage.norm_target_patch)."""
    # centred per image and channel, the float32 running sums stay small and exact enough
    centre = x.float().mean(dim=(-2, -1), keepdim=True)
    x = x.float() - centre
    valid = _box_mean(torch.ones_like(x[:1, :1]), patch)  # fraction of the window inside the image
    mean = _box_mean(x, patch) / valid
    mean_sq = _box_mean(x * x, patch) / valid
    count = valid * patch * patch
    var = ((mean_sq - mean * mean) * (count / (count - 1))).clamp(min=0.0)
    return mean + centre, (var + 1e-6).sqrt()


def norm_targets(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Each pixel normalised by its neighbourhood's mean and std (`local_mean_std`)."""
    mean, std = local_mean_std(x, patch)
    return (x.float() - mean) / std


def masked_l1(reconstruction: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
              norm_target_patch: int | None) -> torch.Tensor:
    """SimMIM's loss: mean L1 over the masked pixels and the channels. reconstruction (B, 3, H, W) float32;
    image (B, 3, H, W) as the model saw it; mask (B, H/p, W/p) 0/1, 1 = masked; `norm_target_patch`: the
    neighbourhood of the normalised target, None for raw pixels."""
    p = image.shape[-1] // mask.shape[-1]
    target = image.float()
    if norm_target_patch:
        target = norm_targets(target, norm_target_patch)
    pixel_mask = mask.float().repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
    loss = (F.l1_loss(reconstruction, target, reduction="none") * pixel_mask).sum()
    return loss / (pixel_mask.sum() + 1e-5) / image.shape[1]


def _to_uint8(image: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8 pixels."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    pixels = (image * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def simmim_panel(image, mask, reconstruction, mean, std, *, norm_target_patch: int | None = None) -> np.ndarray:
    """Input | masked input | reconstruction, side by side, as one HWC uint8 picture.

    image, reconstruction: (3, H, W) in normalised units; mask: (h, w) 0/1 with 1 = masked, upsampled to
    pixels. The reconstruction panel shows predicted pixels where the model had to predict them and the
    input elsewhere. With SimMIM's norm_target the model predicts locally normalised pixels: pass
    `norm_target_patch` to put the input's local mean/std back (as MAE's visualisation does).
    """
    image = torch.as_tensor(image).detach().float().cpu()
    reconstruction = torch.as_tensor(reconstruction).detach().float().cpu()
    mask = torch.as_tensor(mask).detach().float().cpu()
    scale = image.shape[-2] // mask.shape[-2]
    pixel_mask = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None]  # (1, H, W)
    if norm_target_patch:
        local_mean, local_std = local_mean_std(image[None], norm_target_patch)
        reconstruction = reconstruction * local_std[0] + local_mean[0]
    black = -torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1) / torch.as_tensor(std).view(-1, 1, 1)
    masked = image * (1 - pixel_mask) + black * pixel_mask
    pasted = image * (1 - pixel_mask) + reconstruction * pixel_mask
    gap = np.full((image.shape[-2], 4, 3), 255, np.uint8)
    panels = [_to_uint8(x, mean, std) for x in (image, masked, pasted)]
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


class MaskedReconstruction:
    """SimMIM: `masked_l1` of the model's reconstruction; the picture is `simmim_panel` of the last micro
    batch's first image. `mean`/`std`: the loader's pixel normalisation, to show pixels."""

    def __init__(self, norm_target_patch: int | None, mean, std):
        self.norm_target_patch, self.mean, self.std = norm_target_patch, mean, std
        self._last: tuple[torch.Tensor, ...] | None = None

    def loss(self, engine: Engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The target is made of the pixels the model sees: engine.forward would cast them just so.
        image = batch["image"].to(engine.device, engine.dtype)
        mask = batch["mask"].to(engine.device)
        reconstruction = engine.forward(image, mask)
        self._last = (batch["image"][0], batch["mask"][0], reconstruction[0].detach())
        return masked_l1(reconstruction, image, mask, self.norm_target_patch), {}

    def images(self) -> dict[str, np.ndarray]:
        if self._last is None:
            return {}
        image, mask, reconstruction = self._last
        return {"simmim/reconstruction": simmim_panel(image, mask, reconstruction, self.mean, self.std,
                                                      norm_target_patch=self.norm_target_patch)}


# -------------------------------------------------------------------------------------------- supervised

def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)), in float32."""
    logits = logits.float()
    return torch.sum(-target.to(logits.device) * F.log_softmax(logits, dim=-1), dim=-1).mean()


class SoftTargetCrossEntropy:
    """Supervised: `soft_target_cross_entropy` of the logits and the batch's `target`; no pictures."""

    def loss(self, engine: Engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return soft_target_cross_entropy(engine.forward(batch["image"]), batch["target"]), {}

    def images(self) -> dict[str, np.ndarray]:
        return {}
