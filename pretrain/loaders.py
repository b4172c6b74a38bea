"""A stage's data: its train loader (never ends) and its val loader (read one pass at a time), from the config.

Transforms are built when a loader is asked for, not before: after the model is built and the per-rank
seed is set, as the trainer orders it, and never for an unused loader (+stage=eval has no train loader).
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ShardImages:
    """Loaders over the config's shards, for this rank (`ctx`), with its decoding and normalisation."""
    cfg: Config
    ctx: DistContext | None

    def pixels(self) -> dict:
        d = self.cfg.data
        return dict(mean=d.mean, std=d.std, decoder=d.decoder)

    def loader(self, urls: str, sample_fn, *, samples: int, resampled: bool, collate_fn=None,
               shuffle: bool = True, labels: bool = True) -> ShardLoader:
        d = self.cfg.data
        return build_loader(urls, sample_fn=sample_fn, batch_size=self.cfg.stage.micro_batch, rank=self.ctx.rank,
                            world_size=self.ctx.world_size, num_workers=d.num_workers,
                            shuffle_buffer=d.shuffle_buffer if shuffle else 1, resampled=resampled,
                            samples_per_epoch=samples, seed=self.cfg.seed, collate_fn=collate_fn, labels=labels,
                            label_key=d.label_key, num_classes=d.num_classes)

    def train(self, sample_fn, **kwargs) -> ShardLoader:
        d = self.cfg.data
        return self.loader(d.train_urls, sample_fn, samples=d.samples_per_epoch, resampled=d.resampled, **kwargs)


class MaskedImages(ShardImages):
    """SimMIM: random crops with a random patch mask; image-only shards serve (no labels read). No val data."""

    def train_loader(self) -> ShardLoader:
        st, m = self.cfg.stage, self.cfg.model
        return self.train(SimMIMTransform(img_size=m.img_size, crop_scale=st.crop_scale,
                                          mask_patch_size=st.mask_patch_size, model_patch_size=m.patch_size,
                                          mask_ratio=st.mask_ratio, **self.pixels()), labels=False)


class LabelledImages(ShardImages):
    """Supervised, finetune and eval: augmented train batches with soft targets, center-cropped val batches."""

    def train_loader(self) -> ShardLoader:
        st, m, d = self.cfg.stage, self.cfg.model, self.cfg.data
        transform = SupervisedTransform(img_size=m.img_size, crop_scale=st.crop_scale, rand_augment=st.rand_augment,
                                        reprob=st.reprob, **self.pixels())
        # Soft targets always: one-hot + label smoothing, Mixup/CutMix when their alphas are > 0.
        mix = MixupCutmix(num_classes=d.num_classes, mixup_alpha=st.mixup, cutmix_alpha=st.cutmix,
                          label_smoothing=st.label_smoothing, prob=st.mixup_prob, switch_prob=st.switch_prob)
        return self.train(transform, collate_fn=mix)

    def val_loader(self) -> ShardLoader:
        """data.val_urls, unshuffled: shards read in order and split over the ranks' streams give every sample
        once (read it with `one_pass()`; its epoch length is never used)."""
        st = self.cfg.stage
        transform = EvalTransform(img_size=self.cfg.model.img_size, crop_pct=st.eval_crop_pct, **self.pixels())
        return self.loader(self.cfg.data.val_urls, transform, samples=st.micro_batch * self.ctx.world_size,
                           resampled=False, shuffle=False)
