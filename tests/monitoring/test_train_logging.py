"""End to end: a 2-rank SimMIM training run writes one wandb run (offline) with the expected keys."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.demo import write_demo_shards
from wandb_offline import offline_runs, read_run

REPO = Path(__file__).resolve().parents[2]
STEPS, LOG_EVERY, IMAGE_EVERY = 4, 2, 2


def train(shards: Path, run_root: Path, *overrides: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("WANDB_MODE", None)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "pretrain.py"), "+stage=simmim", f"run_root={run_root}",
           f"data.train_urls={shards}/train.txt", "data.samples_per_epoch=96", "data.num_workers=0",
           "data.shuffle_buffer=16", "model.img_size=64", "model.window_size=4", "stage.epochs=0",
           f"stage.steps={STEPS}", "stage.global_batch=4", "stage.micro_batch=2", "stage.optim.warmup_steps=1",
           "stage.mask_patch_size=16", f"logger.every={LOG_EVERY}", f"logger.image_every={IMAGE_EVERY}",
           *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


@pytest.mark.dist
def test_two_rank_simmim_run_logs_one_wandb_run(tmp_path):
    shards = tmp_path / "shards"
    write_demo_shards(str(shards), num_classes=10, train_samples=96, val_samples=16, samples_per_shard=24,
                      image_size=(80, 64), seed=0)
    train(shards, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "demo" / "simmim"
    (run_file,) = offline_runs(run_dir)  # rank 1 made none
    run = read_run(run_file)
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
