"""RunLogger on 2 real gloo ranks with wandb offline, read back from the offline run file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.loggers import METRICS_FILE, RunLogger, read_metrics
from tests.torchrun import torchrun
from wandb_offline import offline_runs, read_run

JOB = Path(__file__).with_name("log_job.py")
EXPECTED_KEYS = {
    "step", "train/loss", "train/l1_masked", "train/grad_norm", "lr/backbone", "lr/head", "perf/img_per_s",
    "perf/tflops_per_device", "perf/mfu", "perf/data_wait_frac", "perf/step_time_s", "perf/peak_mem_bytes",
    "train/nan_skips", "data/skipped_samples",
}


def launch(run_dir: Path, *args: str) -> None:
    torchrun(JOB, str(run_dir), *args, timeout=120)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    launch(run_dir, "--steps", "12")
    return run_dir


def scalar_rows(history: list[dict]) -> list[dict]:
    return [h for h in history if "train/loss" in h]


@pytest.mark.dist
def test_two_ranks_make_exactly_one_offline_run(first_run):
    (run_file,) = offline_runs(first_run)
    run = read_run(run_file)
    assert (first_run / "wandb_run_id").read_text().strip() == run.run_id
    assert (run.group, run.job_type) == ("exp", "simmim")
    assert run.config["stage"] == {"name": "simmim", "global_batch": 8}


@pytest.mark.dist
def test_offline_run_has_every_metric_at_every_log_step(first_run):
    rows = scalar_rows(read_run(offline_runs(first_run)[0]).history)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert EXPECTED_KEYS <= set(rows[0])
    assert rows[0]["train/loss"] == 1.5  # mean of rank 0 (1.0) and rank 1 (2.0)
    assert rows[0]["data/skipped_samples"] == 3  # 1 + 2, summed over ranks
    assert rows[0]["data/epoch"] == 1  # a position, not a count
    assert rows[0]["perf/img_per_s"] == pytest.approx(16.0)  # 2 ranks x 4 images / 0.5 s
    assert rows[0]["perf/mfu"] == pytest.approx(3 * 1e9 * 8.0 / 1e12)
    assert rows[-1]["lr/backbone"] == pytest.approx(12e-3)


@pytest.mark.dist
def test_reconstruction_images_reach_wandb_and_the_run_dir(first_run):
    history = read_run(offline_runs(first_run)[0]).history
    images = [h for h in history if h.get("simmim/reconstruction/_type") == "image-file"]
    assert [h["step"] for h in images] == [6, 12]
    media = offline_runs(first_run)[0].parent / "files"
    assert (media / images[0]["simmim/reconstruction/path"]).is_file()
    assert sorted(p.name for p in (first_run / "images").iterdir()) == [
        "simmim_reconstruction_00000006.png", "simmim_reconstruction_00000012.png"]


@pytest.mark.dist
def test_jsonl_holds_the_same_rows(first_run):
    lines = (first_run / METRICS_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert EXPECTED_KEYS <= set(rows[0])


@pytest.mark.dist
def test_resumed_job_continues_the_same_run(first_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    # A requeued job restarting from an older checkpoint (step 9) re-logs steps 12 and 15.
    launch(run_dir, "--start-step", "9", "--steps", "6")
    first, second = (read_run(p) for p in offline_runs(run_dir))
    assert first.run_id == second.run_id
    assert [r["step"] for r in scalar_rows(second.history)] == [12, 15]
    assert [r["step"] for r in read_metrics(run_dir)] == [3, 6, 9, 12, 15]
    assert len((run_dir / METRICS_FILE).read_text().splitlines()) == 6  # appended, never truncated


def test_logger_none_writes_jsonl_only(tmp_path):
    logger = RunLogger(tmp_path, {"a": 1}, rank=0, kind="none")
    logger.log(1, {"train/loss": 2.0})
    logger.log_images(1, {"panel": np.zeros((4, 4, 3), np.uint8)})
    logger.finish()
    assert read_metrics(tmp_path)[0]["train/loss"] == 2.0
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()
    assert (tmp_path / "images" / "panel_00000001.png").is_file()


def test_only_rank_zero_writes(tmp_path):
    logger = RunLogger(tmp_path / "run", {}, rank=1, kind="wandb")
    logger.log(1, {"train/loss": 2.0})
    logger.finish()
    assert not (tmp_path / "run").exists()


def test_non_finite_values_stay_visible_in_jsonl(tmp_path):
    logger = RunLogger(tmp_path, {}, rank=0, kind="none")
    logger.log(1, {"train/loss": float("nan")})
    logger.finish()
    assert read_metrics(tmp_path)[0]["train/loss"] == "nan"


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="logger.kind"):
        RunLogger(tmp_path, {}, rank=0, kind="tensorboard")


def test_image_must_be_hwc_uint8(tmp_path):
    logger = RunLogger(tmp_path, {}, rank=0, kind="none")
    with pytest.raises(ValueError, match="'panel' must be an HWC uint8"):
        logger.log_images(1, {"panel": np.zeros((3, 4, 4), np.float32)})


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = RunLogger(tmp_path, {}, rank=0, kind="wandb", mode="offline")
    logger.log(1, {"train/loss": 2.0})
    logger.finish()
    assert offline_runs(tmp_path) == [] and read_metrics(tmp_path)[0]["train/loss"] == 2.0


def test_a_row_torn_by_a_killed_job_is_skipped_and_the_resume_appends_cleanly(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')
    logger = RunLogger(tmp_path, {}, rank=0, kind="none")
    logger.log(2, {"train/loss": 2.0})
    logger.finish()
    with pytest.warns(UserWarning, match=f"{METRICS_FILE}:2: skipping a torn line"):
        rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "train/loss": 3.0}, {"step": 2, "time": rows[1]["time"], "train/loss": 2.0}]


def test_a_foreign_line_in_the_metrics_file_is_an_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text("step,loss\n")
    with pytest.raises(ValueError, match=f"{METRICS_FILE}:1 is not a JSON metrics row"):
        read_metrics(tmp_path)
