"""What differs between the stages: model, data, loss, evaluation, starting weights."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.shards import ShardLoader, build_loader
from data.transforms import EvalTransform, MixupCutmix, SimMIMTransform, SupervisedTransform
from models import SimMIM, SwinTransformerV2, encoder_state_dict, load_pretrained
from models.flops import simmim_forward_flops, swinv2_forward_flops
from models.swinv2 import total_stride
from pretrain import dist, transfer
from pretrain.config import (ConfigError, EvalStageConfig, FinetuneStageConfig, SimMIMStageConfig,
                             SupervisedStageConfig)
from pretrain.dist import DistContext
from pretrain.ema import WeightEMA
from pretrain.engine import Engine
from pretrain.loggers import simmim_panel
from pretrain.preflight import Start

log = logging.getLogger(__name__)


def next_batch(loader: Iterator[dict]) -> dict | None:
    """The loader seeds its own RNGs per batch (and DataLoader draws its workers' base seed from torch's);
    none of that may move the training RNG (drop path), or a resumed run would diverge from an unbroken one.
    None when a finite loader (one val pass) is used up."""
    with torch.random.fork_rng(devices=[]):
        return next(loader, None)


class Stage:
    """Shared wiring; subclasses say how to build the model, read the data and compute the loss."""

    def __init__(self, start: Start, ctx: DistContext):
        self.start, self.cfg, self.ctx = start, start.cfg, ctx

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = dataclasses.asdict(self.cfg.model)
        for key in ("name", "grad_checkpointing", "compile"):  # the last two are applied by the engines
            kwargs.pop(key)
        return kwargs

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def initial_weights(self) -> Callable[[nn.Module], None] | None:
        return None

    def flops_per_image(self) -> int:
        raise NotImplementedError

    def pixels(self) -> dict[str, Any]:
        """Decoding and normalisation shared by every transform."""
        d = self.cfg.data
        return dict(mean=d.mean, std=d.std, decoder=d.decoder)

    def _loader(self, urls: str, sample_fn, *, samples: int, resampled: bool, collate_fn=None,
                shuffle: bool = True, labels: bool = True) -> ShardLoader:
        d = self.cfg.data
        return build_loader(urls, sample_fn=sample_fn, batch_size=self.cfg.stage.micro_batch, rank=self.ctx.rank,
                            world_size=self.ctx.world_size, num_workers=d.num_workers,
                            shuffle_buffer=d.shuffle_buffer if shuffle else 1, resampled=resampled,
                            samples_per_epoch=samples, seed=self.cfg.seed, collate_fn=collate_fn, labels=labels,
                            label_key=d.label_key, num_classes=d.num_classes)

    def train_loader(self) -> ShardLoader:
        raise NotImplementedError

    def loss(self, engine: Engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro batch: (loss to backward, extra metrics)."""
        raise NotImplementedError

    def images(self) -> dict[str, np.ndarray]:
        """Pictures of the last micro batch for the logger (HWC uint8), where the stage has any."""
        return {}

    def eval_due(self, step: int, total: int) -> bool:
        return False

    def evaluate(self, engine: Engine) -> dict[str, float]:
        return {}

    def weight_ema(self, engine: Engine) -> WeightEMA | None:
        """An EMA of the weights for the trainer to keep and evaluate beside them, or None."""
        return None


class SimMIMStage(Stage):
    def build_model(self) -> nn.Module:
        st, m = self.cfg.stage, self.cfg.model
        return SimMIM(encoder_stride=total_stride(m.patch_size, len(m.depths)), norm_target=st.norm_target,
                      norm_target_patch=st.norm_target_patch, **self.model_kwargs())

    def flops_per_image(self) -> int:
        return simmim_forward_flops(dataclasses.asdict(self.cfg.model))

    def train_loader(self) -> ShardLoader:
        st, m = self.cfg.stage, self.cfg.model
        transform = SimMIMTransform(img_size=m.img_size, crop_scale=st.crop_scale, mask_patch_size=st.mask_patch_size,
                                    model_patch_size=m.patch_size, mask_ratio=st.mask_ratio, **self.pixels())
        return self._loader(self.cfg.data.train_urls, transform, samples=self.cfg.data.samples_per_epoch,
                            resampled=self.cfg.data.resampled, labels=False)  # image-only shards serve too

    def loss(self, engine, batch):
        out = engine.forward(batch["image"], batch["mask"])
        self._last = (batch["image"][0], batch["mask"][0], out["reconstruction"][0].detach())  # for images()
        return out["loss"], {}

    def images(self) -> dict[str, np.ndarray]:
        st, d = self.cfg.stage, self.cfg.data
        image, mask, reconstruction = self._last
        panel = simmim_panel(image, mask, reconstruction, d.mean, d.std,
                             norm_target_patch=st.norm_target_patch if st.norm_target else None)
        return {"simmim/reconstruction": panel}


class SupervisedStage(Stage):
    def __init__(self, start: Start, ctx: DistContext):
        super().__init__(start, ctx)
        self.source = start.source
        self._val: ShardLoader | None = None

    def build_model(self) -> nn.Module:
        return SwinTransformerV2(num_classes=self.cfg.data.num_classes, **self.model_kwargs())

    def flops_per_image(self) -> int:
        return swinv2_forward_flops(dataclasses.asdict(self.cfg.model), self.cfg.data.num_classes)

    def source_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The starting state dict (rank 0 reads it); load_pretrained maps its layout onto `model`."""
        return transfer.read_weights(self.source)

    def initial_weights(self) -> Callable[[nn.Module], None] | None:
        if self.source is None:
            return None

        def load(model: nn.Module) -> None:
            full = self.source_weights(model)
            simmim = any(k.startswith("encoder.") for k in full)
            encoder = encoder_state_dict(full) if simmim else full
            result = load_pretrained(model, encoder)
            dropped = sorted({k.split(".")[0] for k in full if not k.startswith("encoder.")} |
                             ({"encoder.mask_token"} & set(full))) if simmim else []
            log.info("init_from %s: loaded %d tensors; dropped %s; new (not loaded) %s",
                     self.source, len(encoder) - len(result.unexpected_keys), dropped, result.missing_keys)

        return load

    def train_loader(self) -> ShardLoader:
        st, m, d = self.cfg.stage, self.cfg.model, self.cfg.data
        transform = SupervisedTransform(img_size=m.img_size, crop_scale=st.crop_scale, rand_augment=st.rand_augment,
                                        reprob=st.reprob, **self.pixels())
        # Soft targets always: one-hot + label smoothing, Mixup/CutMix when their alphas are > 0.
        mix = MixupCutmix(num_classes=d.num_classes, mixup_alpha=st.mixup, cutmix_alpha=st.cutmix,
                          label_smoothing=st.label_smoothing, prob=st.mixup_prob, switch_prob=st.switch_prob)
        return self._loader(d.train_urls, transform, samples=d.samples_per_epoch, resampled=d.resampled,
                            collate_fn=mix)

    def loss(self, engine, batch):
        logits = engine.forward(batch["image"]).float()
        target = batch["target"].to(logits.device)
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean(), {}

    def eval_due(self, step: int, total: int) -> bool:
        every = self.cfg.stage.eval_every
        return bool(self.cfg.data.val_urls) and (step == total or (every > 0 and step % every == 0))

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Top-1/top-5 over one pass of the val shards: every image counts exactly once on any number of ranks
        and workers, and every evaluation reads the same images (the pass always starts from the beginning).

        Ranks may hold different numbers of val images (and last batches are short), but a sharded model
        needs every rank in every forward: a rank whose share is used up runs a one-image dummy batch,
        which is not counted, until no rank has any left. `stage.eval_batches` > 0 stops each rank earlier."""
        d, st = self.cfg.data, self.cfg.stage
        if self._val is None:
            transform = EvalTransform(img_size=self.cfg.model.img_size, crop_pct=st.eval_crop_pct, **self.pixels())
            # Unshuffled: shards read in order and split over the ranks' streams give every sample once.
            # (its epoch length is never used: one_pass() reads it)
            self._val = self._loader(d.val_urls, transform, samples=st.micro_batch * self.ctx.world_size,
                                     resampled=False, shuffle=False)
        batches = self._val.one_pass()
        if st.eval_batches:
            batches = itertools.islice(batches, st.eval_batches)
        counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, loss sum, images
        engine.module.eval()
        while True:
            batch = next_batch(batches)
            if dist.all_reduce_sum(torch.tensor(float(batch is not None), device=self.ctx.device)).item() == 0:
                break
            if batch is None:
                size = self.cfg.model.img_size
                engine.forward(torch.zeros(1, 3, size, size))
                continue
            logits = engine.forward(batch["image"]).float().cpu()
            label = batch["label"]
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            counts[0] += (top5[:, 0] == label).sum()
            counts[1] += (top5 == label[:, None]).any(-1).sum()
            counts[2] += F.cross_entropy(logits, label, reduction="sum")
            counts[3] += len(label)
        engine.module.train()
        top1, top5, loss, n = dist.all_reduce_sum(counts.to(self.ctx.device)).tolist()
        if not st.eval_batches and d.val_samples and n != d.val_samples:
            log.warning("evaluated %d val images, but data.val_samples is %d (unreadable samples, or a wrong "
                        "data.val_samples)", n, d.val_samples)
        return {"eval/top1": 100 * top1 / n, "eval/top5": 100 * top5 / n, "eval/loss": loss / n, "eval/images": n}


class FinetuneStage(SupervisedStage):
    """Supervised training from a trained classifier at a new image size and window (also the model that
    +stage=eval evaluates). The CPB meta network's weights load unchanged and see inputs on the scale it was
    trained at (model.pretrained_window_sizes, which pretrain.preflight takes from the source run when all 0);
    the position buffers are rebuilt for the new window; `stage.class_map` selects head rows, otherwise a
    head of another class count starts anew."""

    def __init__(self, start: Start, ctx: DistContext):
        super().__init__(start, ctx)
        st = self.cfg.stage
        self.class_rows = transfer.read_class_map(st.class_map, self.cfg.data.num_classes) if st.class_map else None
        self.from_ema = False  # +stage=eval stage.ema: start from the EMA the source fine-tune kept

    def weight_ema(self, engine: Engine) -> WeightEMA | None:
        decay = self.cfg.stage.ema_decay
        return WeightEMA(engine, decay) if decay > 0 else None

    def source_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.from_ema:
            full = transfer.read_ema_weights(self.source, {k: p.shape for k, p in model.named_parameters()})
        else:
            full = super().source_weights(model)
        if self.class_rows is None:
            return full
        return transfer.select_head_rows(full, self.class_rows, self.cfg.stage.class_map)


def build_stage(start: Start, ctx: DistContext) -> Stage:
    stage = start.cfg.stage
    if isinstance(stage, SimMIMStageConfig):
        return SimMIMStage(start, ctx)
    if isinstance(stage, (FinetuneStageConfig, EvalStageConfig)):
        return FinetuneStage(start, ctx)
    if isinstance(stage, SupervisedStageConfig):
        return SupervisedStage(start, ctx)
    raise ConfigError(f"stage: no stage implementation for {type(stage).__name__}")
