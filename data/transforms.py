"""Per-sample transforms (encoded bytes -> dict of tensors) and the batch-level Mixup/CutMix collate.

All randomness comes from torch's global generator (torchvision v2 draws with it too), which the loader
seeds per batch so that a resumed run replays exactly.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from data.decode import DECODERS, decode_crop_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float]):
    """torchvision's RandomResizedCrop parameters, as a (left, top, right, bottom) box in source pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return left, top, left + w, top + h
    # fallback: the whole image, cropped to the allowed aspect range
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, crop_pct: float):
    """The source region that 'resize the shorter side to S / crop_pct, center crop S x S' keeps."""
    side = min(width, height) * crop_pct
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _checked_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r}: expected one of {DECODERS}")
    return decoder


class _Normalize:
    """uint8 (3, H, W) -> contiguous float32 (x / 255 - mean) / std, in two passes."""

    def __init__(self, mean, std):
        self.shift = torch.tensor(mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32, memory_format=torch.contiguous_format).sub_(self.shift).mul_(self.scale)


class MaskGenerator:
    """SimMIM random mask: `ceil(ratio * n)` of the n mask patches, returned at model-patch resolution.

    Defaults (192 px, mask patch 32, model patch 4, ratio 0.6): 22 of 36 patches, a 48x48 0/1 mask.
    """

    def __init__(self, *, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of mask_patch_size {mask_patch_size},"
                             f" which must be a multiple of model_patch_size {model_patch_size}")
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.mask_count = math.ceil(self.rand_size ** 2 * mask_ratio)

    def __call__(self) -> torch.Tensor:
        mask = torch.zeros(self.rand_size ** 2, dtype=torch.int64)
        mask[torch.randperm(self.rand_size ** 2)[:self.mask_count]] = 1
        mask = mask.view(self.rand_size, self.rand_size)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


class RandomResizedCropFlip:
    """Decode with a random crop resized to img_size x img_size, flip: bytes -> uint8 (3, H, W)."""

    def __init__(self, *, img_size: int, crop_scale, crop_ratio, hflip: float, interpolation: str, decoder: str):
        self.img_size, self.crop_scale, self.crop_ratio = img_size, tuple(crop_scale), tuple(crop_ratio)
        self.hflip, self.interpolation, self.decoder = hflip, interpolation, _checked_decoder(decoder)

    def __call__(self, data: bytes) -> torch.Tensor:
        img = decode_crop_resize(data, lambda w, h: random_resized_box(w, h, self.crop_scale, self.crop_ratio),
                                 (self.img_size, self.img_size), interpolation=self.interpolation,
                                 decoder=self.decoder)
        return img.flip(-1) if torch.rand(1).item() < self.hflip else img


class SimMIMTransform:
    """RandomResizedCrop (bilinear) + flip + normalise, plus a SimMIM mask: bytes -> {image, mask}."""

    def __init__(self, *, img_size: int = 192, crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, mean=IMAGENET_MEAN, std=IMAGENET_STD, decoder: str = "simplejpeg"):
        self.crop = RandomResizedCropFlip(img_size=img_size, crop_scale=crop_scale, crop_ratio=crop_ratio,
                                          hflip=hflip, interpolation="bilinear", decoder=decoder)
        self.normalize = _Normalize(mean, std)
        self.mask_generator = MaskGenerator(input_size=img_size, mask_patch_size=mask_patch_size,
                                            model_patch_size=model_patch_size, mask_ratio=mask_ratio)

    def __call__(self, data: bytes) -> dict:
        return dict(image=self.normalize(self.crop(data)), mask=self.mask_generator())


class _RandAugment(v2.RandAugment):
    """torchvision RandAugment driven by a timm spec such as "rand-m9-mstd0.5-inc1" (n ops, magnitude m,
    magnitude drawn per image from N(m, mstd)).

    With 11 bins, magnitude m is m/10 of each op's range as in timm (torchvision's default 31 bins would
    make m9 a much weaker 9/30). torchvision's posterize and solarize already grow stronger with the
    magnitude, which is what timm's `inc1` selects.
    """

    def __init__(self, spec: str):
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"rand_augment {spec!r}: expected a timm-style spec like 'rand-m9-mstd0.5-inc1'")
        opts = dict(n=2.0, m=9.0, mstd=0.0, inc=1.0)
        for part in parts[1:]:
            key = re.match(r"[a-z]+", part)
            if not key or key.group() not in opts:
                raise ValueError(f"rand_augment {spec!r}: unknown option {part!r} (known: n, m, mstd, inc)")
            opts[key.group()] = float(part[key.end():])
        super().__init__(num_ops=int(opts["n"]), magnitude=round(opts["m"]), num_magnitude_bins=11)
        self.mean_magnitude, self.mstd = opts["m"], opts["mstd"]

    def forward(self, *inputs):
        if self.mstd > 0:
            m = torch.normal(torch.tensor(self.mean_magnitude), self.mstd).item()
            self.magnitude = int(min(max(round(m), 0), self.num_magnitude_bins - 1))
        return super().forward(*inputs)


class SupervisedTransform:
    """Bicubic RandomResizedCrop + flip + RandAugment + normalise + random erasing: bytes -> {image}."""

    def __init__(self, *, img_size: int = 192, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, rand_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, decoder: str = "simplejpeg"):
        self.crop = RandomResizedCropFlip(img_size=img_size, crop_scale=crop_scale, crop_ratio=crop_ratio,
                                          hflip=hflip, interpolation="bicubic", decoder=decoder)
        self.normalize = _Normalize(mean, std)
        self.randaug = _RandAugment(rand_augment) if rand_augment else None  # "" = off
        # value="random": per-pixel normal noise, timm's mode="pixel"
        self.erase = v2.RandomErasing(p=reprob, value="random") if reprob > 0 else None

    def __call__(self, data: bytes) -> dict:
        img = self.crop(data)
        if self.randaug is not None:  # on a PIL image: torchvision's PIL ops are ~2.5x faster than its tensor ops
            pil = self.randaug(Image.fromarray(img.permute(1, 2, 0).numpy()))
            img = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        x = self.normalize(img)
        if self.erase is not None:
            x = self.erase(x)
        return dict(image=x)


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct, center crop img_size (bicubic): bytes -> {image}."""

    def __init__(self, *, img_size: int = 192, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, decoder: str = "simplejpeg"):
        self.img_size, self.crop_pct, self.interpolation = img_size, crop_pct, interpolation
        self.normalize, self.decoder = _Normalize(mean, std), _checked_decoder(decoder)

    def __call__(self, data: bytes) -> dict:
        img = decode_crop_resize(data, lambda w, h: center_box(w, h, self.crop_pct),
                                 (self.img_size, self.img_size), interpolation=self.interpolation,
                                 decoder=self.decoder)
        return dict(image=self.normalize(img))


class MixupCutmix:
    """Batch collate: stack the samples, then Mixup or CutMix and label smoothing -> adds `target` (B, K).

    With both alphas > 0, CutMix is chosen with probability `switch_prob`; the whole batch is mixed with
    probability `prob`, otherwise only smoothed (timm's Mixup, batch mode).
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 label_smoothing: float = 0.1, prob: float = 1.0, switch_prob: float = 0.5):
        self.num_classes, self.smoothing, self.prob = num_classes, label_smoothing, prob
        choices, p = [], []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            p.append(1 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            p.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(choices, p=p) if choices else None

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        if self.mix is not None and torch.rand(1).item() < self.prob:
            batch["image"], target = self.mix(batch["image"], batch["label"])
        else:
            target = torch.nn.functional.one_hot(batch["label"], self.num_classes).float()
        batch["target"] = target * (1 - self.smoothing) + self.smoothing / self.num_classes
        return batch
