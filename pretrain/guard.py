"""The training loop's guard against bad steps (docs/RELIABILITY.md): too many non-finite steps in a row, and
loss spikes (optional rollback). Every decision comes from values that are the same on every rank (the engines'
agreed skip, the loss averaged over ranks), so all ranks take it together at the same step."""
from __future__ import annotations

import enum
import logging
import math
from collections import deque

import torch

from pretrain import process_group
from pretrain.config import ResilienceConfig

log = logging.getLogger(__name__)


class TrainingHalted(RuntimeError):
    """The run stopped by itself, without saving: `latest` is the checkpoint to resume from after a fix."""


class Verdict(enum.Enum):
    GO_ON = "go on"
    ROLL_BACK = "roll back"  # a loss spike: reload the last checkpoint, keep the data loader where it is
    HALT = "halt"  # `StepGuard.halted` says why


class StepGuard:
    """Called after every optimizer step on every rank. Its counters go into the checkpoints (`state_dict`):
    a relaunch in the middle of a streak of skips must not restart the count, and a resumed run must see the
    same spikes as an unbroken one."""

    def __init__(self, cfg: ResilienceConfig, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self.skips = 0  # every skipped step of the run
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.rolled_back_steps = 0  # optimizer steps undone: their global batches are never trained on
        self.recent_losses: deque[float] = deque(maxlen=cfg.spike_window)  # of good steps
        self.halted = ""

    def check(self, step: int, loss: torch.Tensor, *, finite_loss: torch.Tensor | bool, updated: bool) -> Verdict:
        """`loss`: this rank's mean loss of the step; `finite_loss`/`updated`: the agreed flags of train_step
        (`finite_loss` may stay on the device: it is read only for a skipped step's warning)."""
        if not updated:
            return self._skipped(step, finite_loss)
        self.consecutive_skips = 0
        if self.cfg.spike_factor <= 0:
            return Verdict.GO_ON
        mean_loss = process_group.all_reduce_sum(loss.detach().float().clone()).item() / self.world_size
        window = self.recent_losses
        baseline = sum(window) / len(window) if len(window) == window.maxlen else math.inf  # full windows only
        if mean_loss > self.cfg.spike_factor * baseline:
            return self._spike(step, mean_loss, baseline)
        window.append(mean_loss)
        return Verdict.GO_ON

    def _skipped(self, step: int, finite_loss: torch.Tensor | bool) -> Verdict:
        self.skips += 1
        self.consecutive_skips += 1
        what = "gradients (the loss was finite)" if bool(finite_loss) else "loss"
        log.warning("step %d: non-finite %s on some rank; the update was skipped on every rank (%d in a row)",
                    step, what, self.consecutive_skips)
        if self.consecutive_skips < self.cfg.max_consecutive_skips:
            return Verdict.GO_ON
        self.halted = (
            f"step {step}: {self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradients "
            f"(resilience.max_consecutive_skips={self.cfg.max_consecutive_skips}); stopped without saving. Look at "
            "the warnings above (each skip says loss or gradients) and at metrics.jsonl before the streak "
            "(train/loss, train/grad_norm, lr/*, data/skipped_samples): non-finite losses on every step mean "
            "diverged weights (resume from an earlier checkpoint with a lower lr) or a run of corrupt samples; "
            "non-finite gradients with finite losses an overflow in the backward (engine.precision=fp32 tells)")
        return Verdict.HALT

    def _spike(self, step: int, mean_loss: float, baseline: float) -> Verdict:
        what = (f"step {step}: loss {mean_loss:.4g} is above resilience.spike_factor={self.cfg.spike_factor:g} x "
                f"{baseline:.4g}, the mean of the last {len(self.recent_losses)} steps")
        if self.rollbacks >= self.cfg.max_rollbacks:
            self.halted = (f"{what}, after {self.rollbacks} rollbacks (resilience.max_rollbacks); stopped without "
                           "saving. Repeated spikes are not a few bad batches: lower the lr or look at the data")
            return Verdict.HALT
        log.warning("%s: a loss spike", what)
        return Verdict.ROLL_BACK

    def rolled_back(self, from_step: int, to_step: int) -> None:
        self.rollbacks += 1
        self.rolled_back_steps += from_step - to_step
        log.warning("rollback %d: step %d -> %d; the data loader goes on, so the %d global batches in between are "
                    "skipped", self.rollbacks, from_step, to_step, from_step - to_step)

    def metrics(self) -> dict[str, int]:
        return {"train/nan_skips": self.skips, "resilience/consecutive_skips": self.consecutive_skips,
                "resilience/rollbacks": self.rollbacks, "resilience/skipped_batches": self.rolled_back_steps}

    def state_dict(self) -> dict:
        return {"skips": self.skips, "consecutive_skips": self.consecutive_skips, "rollbacks": self.rollbacks,
                "rolled_back_steps": self.rolled_back_steps, "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict | None) -> None:
        """On resume; a checkpoint from before the guard has no state: the counts start at 0."""
        state = state or {}
        self.skips = state.get("skips", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.rolled_back_steps = state.get("rolled_back_steps", 0)
        self.recent_losses.extend(state.get("recent_losses", []))
