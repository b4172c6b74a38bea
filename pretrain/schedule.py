"""Learning-rate schedule: linear warmup in steps, then cosine to a floor; lr scaling by global batch.

The schedule is a pure function of the optimizer step, so resuming needs only the step counter.
Per-group multipliers (`lr_scale`, from layer-wise decay in `pretrain.optim`) are applied once, in
`set_lr`; the schedule itself knows nothing of groups (timm >= 0.6 applied `lr_scale` a second time on
top of the official code's own scaling, squaring it: one place avoids that).
"""

import math


def scale_lr(lr: float, global_batch: int, reference_batch: int | None = 512) -> float:
    """The linear scaling rule: `lr` is the value for `reference_batch` images per step.

    The official microsoft/Swin-Transformer code writes every lr for a batch of 512 and multiplies by
    `batch_per_gpu * world_size / 512 * accumulation_steps`, i.e. by `global_batch / 512` with
    `global_batch = micro batch x accumulation x world size`, as here.
    The SwinV2 paper quotes lrs at the batch actually used instead: SwinV2-G's 1.4e-3 is for a global
    batch of 9216 (the official-code equivalent would be 1.4e-3 * 512 / 9216 = 7.8e-5). The recipe in
    conf/experiment/swinv2_giant_in22k_ext.yaml therefore sets `reference_batch: 9216`, which keeps the
    paper's number in the config and still rescales it when a smaller cluster runs a smaller global batch.
    `reference_batch=None` disables scaling (the lr is used as given).
    """
    if reference_batch is None:
        return lr
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"scale_lr: global_batch ({global_batch}) and reference_batch ({reference_batch}) "
                         "must be positive")
    return lr * global_batch / reference_batch


class WarmupCosine:
    """lr(step): linear from `warmup_lr` (step 0) to `base_lr` (step `warmup_steps`), then a half cosine
    from `base_lr` to `min_lr` at `total_steps`, and `min_lr` after that.

    This is the official code's timm CosineLRScheduler (warmup_prefix, no cycles, `t_in_epochs=False`)
    written in steps, so a warmup given in steps (the paper's 30k / 20k) needs no epoch conversion.
    """

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                 warmup_lr: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"WarmupCosine: total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosine: warmup_steps ({warmup_steps}) must be in [0, total_steps="
                             f"{total_steps}]")
        if min(base_lr, min_lr, warmup_lr) < 0:
            raise ValueError(f"WarmupCosine: learning rates must be >= 0, got base_lr={base_lr}, "
                             f"min_lr={min_lr}, warmup_lr={warmup_lr}")
        if min_lr > base_lr:
            raise ValueError(f"WarmupCosine: min_lr ({min_lr}) is above base_lr ({base_lr})")
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.warmup_lr = warmup_lr

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"WarmupCosine: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"WarmupCosine(base_lr={self.base_lr}, warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}, min_lr={self.min_lr}, warmup_lr={self.warmup_lr})")


def set_lr(param_groups: list[dict], lr: float) -> None:
    """Set every optimizer group's lr to `lr * group["lr_scale"]` (1 where a group has no scale)."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
