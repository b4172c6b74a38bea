"""Loss spikes (resilience.spike_factor > 0), injected for real on 2 gloo ranks: one rank's loss on one global
batch is made 100x, so the loss averaged over ranks jumps. The run reloads its last checkpoint in-process,
the data loader goes on past the offending batches, and training finishes; too many rollbacks stop it."""
import math

import pytest

from pretrain.loggers import read_metrics
from tests.pretrain.test_training import shards  # noqa: F401 (the fixture)
from tests.reliability.faults import run_dir, run_with_faults

pytestmark = pytest.mark.dist

# Spikes are measured against the mean of the last 3 good steps; checkpoints every 2 steps.
SPIKES = ("resilience.spike_factor=3", "resilience.spike_window=3")


def test_a_spike_rolls_back_to_the_last_checkpoint_and_skips_its_batches(shards, tmp_path):  # noqa: F811
    code, out = run_with_faults(shards, tmp_path, {7: "spike"}, "stage.steps=8", *SPIKES)
    assert code == 0, out[-5000:]
    assert "step 7: loss" in out and "is above resilience.spike_factor=3 x" in out
    assert "rollback 1: step 7 -> 6; the data loader goes on, so the 1 global batches in between are skipped" in out
    rows = {r["step"]: r for r in read_metrics(run_dir(tmp_path))}
    assert sorted(rows) == list(range(1, 9))  # the spike's step was redone on the next batch
    last = rows[8]
    assert last["resilience/rollbacks"] == 1 and last["resilience/skipped_batches"] == 1
    assert last["data/batches"] == 9 * 4  # 9 global batches of 2 micro batches x 2 ranks for 8 steps
    losses = [rows[s]["train/loss"] for s in range(1, 9)]
    assert all(math.isfinite(x) and x < 3 * losses[0] for x in losses)  # no spike left in the curve
    assert (run_dir(tmp_path) / "checkpoints" / "latest").read_text() == "step_00000008"


def test_spikes_past_max_rollbacks_stop_the_run_without_saving(shards, tmp_path):  # noqa: F811
    # Batch 5 rolls back to step 4; batch 7 spikes again at step 6, one rollback too many.
    code, out = run_with_faults(shards, tmp_path, {5: "spike", 7: "spike"}, "stage.steps=8",
                                "resilience.max_rollbacks=1", *SPIKES)
    assert code != 0
    assert "rollback 1: step 5 -> 4" in out
    assert out.count("after 1 rollbacks (resilience.max_rollbacks); stopped without saving") == 2, out[-5000:]
    assert "training stopped: step 6: loss" in out
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert not (ckpts / "step_00000006").exists()
    assert read_metrics(run_dir(tmp_path))[-1]["resilience/rollbacks"] == 1
