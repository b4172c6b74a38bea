"""Top-1/top-5 on the val shards: the one evaluation behind the trainer's periodic eval, the EMA's eval
(`WeightEMA.evaluate(evaluator.evaluate)`) and +stage=eval (pretrain/evaluate.py)."""
from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from data.shards import ShardLoader
from pretrain import process_group
from pretrain.process_group import DistContext
from pretrain.engine import Engine
from pretrain.loaders import next_batch

log = logging.getLogger(__name__)


class Evaluator:
    """`val_loader` builds the val loader (once, at the first evaluation); `img_size` shapes the dummy batch;
    `batches` > 0 stops each rank after that many; `expected_images` > 0 (data.val_samples) warns about a
    full pass that read another number; `every` > 0: `due` every that many steps, besides the last."""

    def __init__(self, val_loader: Callable[[], ShardLoader], ctx: DistContext, *, img_size: int, batches: int = 0,
                 expected_images: int = 0, every: int = 0):
        self.val_loader, self.ctx, self.img_size = val_loader, ctx, img_size
        self.batches, self.expected_images, self.every = batches, expected_images, every
        self._val: ShardLoader | None = None

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict[str, float]:
        """Collective: {eval/top1, eval/top5, eval/loss, eval/images} over one pass of the val shards. Every image
        counts exactly once on any number of ranks and workers, and every evaluation reads the same images
        (the pass always starts from the beginning).

        Ranks may hold different numbers of val images (and last batches are short), but a sharded model
        needs every rank in every forward: a rank whose share is used up runs a one-image dummy batch,
        which is not counted, until no rank has any left."""
        if self._val is None:
            self._val = self.val_loader()
        batches = self._val.one_pass()
        if self.batches:
            batches = itertools.islice(batches, self.batches)
        counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, loss sum, images
        engine.module.eval()
        while True:
            batch = next_batch(batches)
            if process_group.all_reduce_sum(torch.tensor(float(batch is not None), device=self.ctx.device)).item() == 0:
                break
            if batch is None:
                engine.forward(torch.zeros(1, 3, self.img_size, self.img_size))
                continue
            logits = engine.forward(batch["image"]).float().cpu()
            label = batch["label"]
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            counts[0] += (top5[:, 0] == label).sum()
            counts[1] += (top5 == label[:, None]).any(-1).sum()
            counts[2] += F.cross_entropy(logits, label, reduction="sum")
            counts[3] += len(label)
        engine.module.train()
        top1, top5, loss, n = process_group.all_reduce_sum(counts.to(self.ctx.device)).tolist()
        if not self.batches and self.expected_images and n != self.expected_images:
            log.warning("evaluated %d val images, but data.val_samples is %d (unreadable samples, or a wrong "
                        "data.val_samples)", n, self.expected_images)
        return {"eval/top1": 100 * top1 / n, "eval/top5": 100 * top5 / n, "eval/loss": loss / n, "eval/images": n}
