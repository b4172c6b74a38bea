"""End to end: 2-rank training runs write one wandb run (offline) per stage, grouped by experiment."""

from pathlib import Path

import pytest
import torch
import yaml

from data.demo import write_demo_shards
from models import SimMIM
from pretrain.loggers import read_metrics
from pretrain.recipes import model_kwargs
from tests.monitoring.test_flops import counted_flops
from tests.torchrun import REPO, torchrun
from wandb_offline import offline_runs, read_run

STEPS, LOG_EVERY, IMAGE_EVERY = 4, 2, 2


def train(stage: str, shards: Path, run_root: Path, *overrides: str) -> None:
    torchrun(REPO / "launch" / "pretrain.py", f"+stage={stage}", f"run_root={run_root}",
             f"data.train_urls={shards}/train.txt", f"data.val_urls={shards}/val.txt", "data.samples_per_epoch=96",
             "data.val_samples=16", "data.num_workers=0", "data.shuffle_buffer=16", "model.img_size=64",
             "model.window_size=4", "stage.epochs=0", f"stage.steps={STEPS}", "stage.global_batch=4",
             "stage.micro_batch=2", "stage.optim.warmup_steps=1", f"logger.every={LOG_EVERY}",
             f"logger.image_every={IMAGE_EVERY}", *overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The demo experiment's SimMIM stage, whose checkpoint the supervised test starts from."""
    root = tmp_path_factory.mktemp("e2e")
    shards = root / "shards"
    write_demo_shards(str(shards), num_classes=10, train_samples=96, val_samples=16, samples_per_shard=8,
                      image_size=(80, 64), seed=0)
    train("simmim", shards, root / "runs", "stage.mask_patch_size=16")
    return root


def only_run(run_dir: Path):
    (run_file,) = offline_runs(run_dir)  # rank 1 made none
    return read_run(run_file)


@pytest.mark.dist
def test_two_rank_simmim_run_logs_one_wandb_run(runs):
    run = only_run(runs / "runs" / "demo" / "simmim")
    assert (run.group, run.job_type) == ("demo", "simmim")
    assert run.config["stage"]["steps"] == STEPS and run.config["model"]["img_size"] == 64
    rows = [h for h in run.history if "train/loss" in h]
    assert [r["step"] for r in rows] == [2, 4]
    expected = {"train/loss", "train/grad_norm", "lr/decay", "lr/no_decay", "perf/img_per_s",
                "perf/tflops_per_device", "perf/mfu", "perf/data_wait_frac", "perf/step_time_s",
                "perf/peak_mem_bytes", "train/nan_skips", "data/skipped_samples", "data/epoch"}
    assert expected <= set(rows[0]), expected - set(rows[0])
    assert all(0 < r["perf/mfu"] < 1 and r["perf/img_per_s"] > 0 for r in rows)
    images = [h["step"] for h in run.history if h.get("simmim/reconstruction/_type") == "image-file"]
    assert images == [2, 4]


@pytest.mark.dist
def test_mfu_is_the_counted_flops_of_the_logged_throughput_over_one_peak(runs):
    run = runs / "runs" / "demo" / "simmim"
    model_cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    size = model_cfg["img_size"]
    model = SimMIM(**model_kwargs(model_cfg), encoder_stride=32).eval()
    with torch.no_grad():
        forward = counted_flops(lambda: model(torch.randn(1, 3, size, size), torch.zeros(1, size // 4, size // 4)))
    rows = [r for r in read_metrics(run) if "perf/mfu" in r]
    assert [r["step"] for r in rows] == [2, 4]
    peaks = []
    for r in rows:
        # forward + backward = 3 forwards per image, at each of the 2 ranks' share of the global images/s
        achieved = 3 * forward * r["perf/img_per_s"] / 2
        assert r["perf/tflops_per_device"] * 1e12 == pytest.approx(achieved, rel=1e-9)
        peaks.append(achieved / r["perf/mfu"])
    assert peaks[0] == pytest.approx(peaks[1], rel=1e-9)  # one peak, measured once per run


@pytest.mark.dist
def test_supervised_stage_is_another_run_of_the_same_group_with_eval_metrics(runs):
    train("supervised", runs / "shards", runs / "runs", "stage.eval_every=2")
    simmim, supervised = (only_run(runs / "runs" / "demo" / stage) for stage in ("simmim", "supervised"))
    assert (supervised.group, supervised.job_type) == ("demo", "supervised")
    assert supervised.run_id != simmim.run_id
    evals = [h for h in supervised.history if "eval/top1" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert {"eval/top5", "eval/loss"} <= set(evals[0])
    assert not any("simmim/reconstruction/_type" in h for h in supervised.history)
