"""Non-finite losses and gradients, injected for real through the engines on 2 gloo ranks: the step is skipped
on every rank together, counted and logged; K skips in a row stop the run on every rank, non-zero, without
saving, with `latest` at the last good checkpoint, and the count survives a relaunch."""
import pytest
import torch

from pretrain.engine import engine_class
from pretrain.engine.deepspeed import DeepSpeedEngine
from pretrain.loggers import read_metrics
from tests.pretrain.test_nan_skip import run_job
from tests.pretrain.test_training import shards  # noqa: F401 (the fixture)
from tests.reliability.faults import run_dir, run_with_faults

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("engine,overrides", [
    ("deepspeed", ()),  # ZeRO-3 fp32
    ("deepspeed", ("engine.zero_stage=2", "engine.precision=bf16")),
    ("fsdp", ()),
])
def test_infinite_gradients_from_a_finite_loss_on_one_rank_drop_the_step_everywhere(tmp_path, engine, overrides):
    assert run_job(tmp_path / "grad", engine, "0,1g,2", *overrides) == [True, False, True]  # on both ranks
    assert run_job(tmp_path / "clean", engine, "0,2", *overrides) == [True, True]
    read = engine_class(engine).read_weights
    grad, clean = (read(tmp_path / name / "checkpoints", "final") for name in ("grad", "clean"))
    assert grad.keys() == clean.keys()
    for name, value in clean.items():
        assert torch.equal(grad[name], value), name  # weights and AdamW moments untouched by the bad step


def test_k_skips_in_a_row_stop_every_rank_at_the_last_good_checkpoint(shards, tmp_path):  # noqa: F811
    # Checkpoints every 2 steps; global batch 3 overflows in the backward, 5, 6 and 7 carry NaN pixels.
    faults = {3: "grad", 5: "nan", 6: "nan", 7: "nan"}
    args = ("stage.steps=10", "resilience.max_consecutive_skips=3")
    code, out = run_with_faults(shards, tmp_path, faults, *args)
    assert code != 0
    stop = "training stopped: step 7: 3 optimizer steps in a row had a non-finite loss or gradients"
    assert out.count(stop) == 2, out[-5000:]  # each rank stopped by itself, at the same step
    assert "Resume from: " + str(run_dir(tmp_path) / "checkpoints" / "step_00000006") in out
    assert "step 3: non-finite gradients (the loss was finite) on some rank; the update was skipped" in out
    assert "step 5: non-finite loss on some rank; the update was skipped on every rank (1 in a row)" in out
    ckpts = run_dir(tmp_path) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]  # nothing at 7
    # Step 6's checkpoint, written in the streak, holds step 4's weights: skipped steps change nothing.
    at4, at6 = (DeepSpeedEngine.read_weights(ckpts, tag) for tag in ("step_00000004", "step_00000006"))
    assert all(torch.equal(at4[k], v) for k, v in at6.items())
    rows = {r["step"]: r for r in read_metrics(run_dir(tmp_path))}
    assert max(rows) == 7 and rows[7]["train/nan_skips"] == 4 and rows[7]["resilience/consecutive_skips"] == 3
    assert rows[4]["resilience/consecutive_skips"] == 0  # a good step ends a streak

    # The same command again: it resumes at step 6 two skips into the streak, so one more stops it.
    code, out = run_with_faults(shards, tmp_path, faults, *args)
    assert code != 0 and "resumed from" in out and out.count(stop) == 2, out[-5000:]
    assert (ckpts / "latest").read_text() == "step_00000006"
