"""StepGuard's counts (single process): every skipped step of the run, the streak, and both across a resume."""
import torch

from pretrain.config import ResilienceConfig
from pretrain.guard import StepGuard, Verdict


def test_skips_are_counted_over_the_run_and_survive_a_resume():
    guard = StepGuard(ResilienceConfig(max_consecutive_skips=3), world_size=1)
    loss = torch.tensor(1.0)
    verdicts = [guard.check(step, loss, finite_loss=True, updated=updated)
                for step, updated in enumerate([True, False, True, False, False], 1)]
    assert verdicts == [Verdict.GO_ON] * 5
    assert guard.metrics()["train/nan_skips"] == 3 and guard.metrics()["resilience/consecutive_skips"] == 2

    resumed = StepGuard(ResilienceConfig(max_consecutive_skips=3), world_size=1)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.check(6, loss, finite_loss=False, updated=False) is Verdict.HALT  # the streak went on: 3 in a row
    assert resumed.metrics()["train/nan_skips"] == 4

    fresh = StepGuard(ResilienceConfig(), world_size=1)
    fresh.load_state_dict(None)  # a checkpoint from before the guard
    assert fresh.metrics()["train/nan_skips"] == 0
