"""A stage's data: its train loader (never ends) and its val loader (read one pass at a time), from the config.

Transforms are built when a loader is asked for, not before: after the model is built and the per-rank
seed is set, as the trainer orders it, and never for an unused loader (+stage=eval has no train loader).
"""
from __future__ import annotations

from typing import Iterator

import torch

from data.shards import ShardLoader, build_loader
from data.transforms import EvalTransform, MixupCutmix, SimMIMTransform, SupervisedTransform
from pretrain.config import Config
from pretrain.process_group import DistContext


def next_batch(loader: Iterator[dict]) -> dict | None:
    """The loader seeds its own RNGs per batch (and DataLoader draws its workers' base seed from torch's);
    none of that may move the training RNG (drop path), or a resumed run would diverge from an unbroken one.
    None when a finite loader (one val pass) is used up."""
    with torch.random.fork_rng(devices=[]):
        return next(loader, None)


def _pixels(cfg: Config) -> dict:
    """Decoding and normalisation shared by every transform."""
    d = cfg.data
    return dict(mean=d.mean, std=d.std, decoder=d.decoder)


def _loader(cfg: Config, ctx: DistContext, urls: str, sample_fn, *, samples: int, resampled: bool,
            collate_fn=None, shuffle: bool = True, labels: bool = True) -> ShardLoader:
    d = cfg.data
    return build_loader(urls, sample_fn=sample_fn, batch_size=cfg.stage.micro_batch, rank=ctx.rank,
                        world_size=ctx.world_size, num_workers=d.num_workers,
                        shuffle_buffer=d.shuffle_buffer if shuffle else 1, resampled=resampled,
                        samples_per_epoch=samples, seed=cfg.seed, collate_fn=collate_fn, labels=labels,
                        label_key=d.label_key, num_classes=d.num_classes)


class MaskedImages:
    """SimMIM: random crops with a random patch mask; image-only shards serve (no labels read). No val data."""

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx

    def train_loader(self) -> ShardLoader:
        st, m, d = self.cfg.stage, self.cfg.model, self.cfg.data
        transform = SimMIMTransform(img_size=m.img_size, crop_scale=st.crop_scale, mask_patch_size=st.mask_patch_size,
                                    model_patch_size=m.patch_size, mask_ratio=st.mask_ratio, **_pixels(self.cfg))
        return _loader(self.cfg, self.ctx, d.train_urls, transform, samples=d.samples_per_epoch,
                       resampled=d.resampled, labels=False)


class LabelledImages:
    """Supervised, finetune and eval: augmented train batches with soft targets, center-cropped val batches."""

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx

    def train_loader(self) -> ShardLoader:
        st, m, d = self.cfg.stage, self.cfg.model, self.cfg.data
        transform = SupervisedTransform(img_size=m.img_size, crop_scale=st.crop_scale, rand_augment=st.rand_augment,
                                        reprob=st.reprob, **_pixels(self.cfg))
        # Soft targets always: one-hot + label smoothing, Mixup/CutMix when their alphas are > 0.
        mix = MixupCutmix(num_classes=d.num_classes, mixup_alpha=st.mixup, cutmix_alpha=st.cutmix,
                          label_smoothing=st.label_smoothing, prob=st.mixup_prob, switch_prob=st.switch_prob)
        return _loader(self.cfg, self.ctx, d.train_urls, transform, samples=d.samples_per_epoch,
                       resampled=d.resampled, collate_fn=mix)

    def val_loader(self) -> ShardLoader:
        """data.val_urls, unshuffled: shards read in order and split over the ranks' streams give every sample
        once (read it with `one_pass()`; its epoch length is never used)."""
        st = self.cfg.stage
        transform = EvalTransform(img_size=self.cfg.model.img_size, crop_pct=st.eval_crop_pct, **_pixels(self.cfg))
        return _loader(self.cfg, self.ctx, self.cfg.data.val_urls, transform,
                       samples=st.micro_batch * self.ctx.world_size, resampled=False, shuffle=False)
