"""Per-sample transforms (encoded bytes -> dict of tensors) and the batch-level Mixup/CutMix collate.

Randomness comes from torch's global generator (crops, flips, masks), and from Python's and numpy's (timm's
RandAugment, RandomErasing and Mixup); the loader seeds all three per batch, so a resumed run replays exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, rand_augment_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from torch.utils.data import default_collate

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


def _rand_augment(spec: str, img_size: int, mean):
    """timm's RandAugment for a spec such as "rand-m9-mstd0.5-inc1", with create_transform's hyper-parameters."""
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean),
                   interpolation=Image.BICUBIC)
    try:
        return posterize_to_zero_bits(rand_augment_transform(spec, hparams))
    except (AssertionError, ValueError):
        raise ValueError(f"rand_augment {spec!r}: not a timm RandAugment spec like 'rand-m9-mstd0.5-inc1' "
                         "(options m, n, p, mstd, mmax, inc, t)") from None


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # no bit kept: black, as Pillow < 12 gave for 0 bits
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def posterize_to_zero_bits(rand_augment):
    """timm's PosterizeIncreasing keeps 4 down to 0 bits (0 once the noisy magnitude reaches 10, about 2% of
    its draws at m9 mstd0.5); Pillow 12+ rejects 0 bits with a ValueError, which would drop the sample. Its
    posterize ops get a function that gives the 0-bit result of older Pillow (a black image) instead."""
    for op in rand_augment.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return rand_augment


class SupervisedTransform:
    """Bicubic RandomResizedCrop + flip, timm's RandAugment, normalise, timm's RandomErasing: bytes -> {image}.

    The official SwinV2/SimMIM fine-tuning recipe is timm's create_transform(is_training=True,
    auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic");
    the RandAugment and RandomErasing here are timm's own, with the hyper-parameters create_transform gives
    them (translate 45% of the image size, the mean colour as fill, bicubic). Only the crop differs in how
    it runs: the crop box is decoded and resized alone (data.decode), not the whole image.
    """

    def __init__(self, *, img_size: int = 192, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, rand_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, decoder: str = "simplejpeg"):
        self.crop = RandomResizedCropFlip(img_size=img_size, crop_scale=crop_scale, crop_ratio=crop_ratio,
                                          hflip=hflip, interpolation="bicubic", decoder=decoder)
        self.normalize = _Normalize(mean, std)
        self.randaug = _rand_augment(rand_augment, img_size, mean) if rand_augment else None  # "" = off
        self.erase = RandomErasing(reprob, mode="pixel", max_count=1, device="cpu") if reprob > 0 else None

    def __call__(self, data: bytes) -> dict:
        img = self.crop(data)
        if self.randaug is not None:  # timm's ops work on PIL images
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
    """Batch collate: stack the samples, then timm's Mixup/CutMix (batch mode) with label smoothing -> adds
    `target` (B, K); with both alphas 0, the smoothed one-hot targets alone (as the official code).

    Batch mode mixes each sample with the batch reversed, so the (per-rank) batch size must be even."""

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 label_smoothing: float = 0.1, prob: float = 1.0, switch_prob: float = 0.5):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                         mode="batch", label_smoothing=label_smoothing, num_classes=num_classes) \
            if mixup_alpha > 0 or cutmix_alpha > 0 else None

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        if self.mix is not None:
            batch["image"], batch["target"] = self.mix(batch["image"], batch["label"])
        else:
            batch["target"] = mixup_target(batch["label"], self.num_classes, smoothing=self.smoothing)
        return batch
