"""Real SLURM jobs on the localhost cluster of conftest.py, submitted with the scripts users submit.

2 nodes x 1 rank (the test cluster has no GPUs, so the batch script starts one CPU rank per node), a nano
model on a few demo images. The SimMIM job of the two-stage chain is also the uninterrupted reference for
the preempted job: both run exactly the same config.
"""

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from data.demo import write_demo_shards

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
JOB_ENV = {"OMP_NUM_THREADS": "1"}  # exported to the job by sbatch, as a user's shell variables are
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.slurm


def sbatch_options(out_dir: Path) -> list[str]:
    # What a user on a cluster without GPUs would pass; the log goes next to the test's files.
    return ["--gpus-per-node=0", f"--output={out_dir}/%x-%j.out"]


def hydra_overrides(shards: Path, run_root: Path) -> list[str]:
    # FSDP2 needs no JIT-compiled op (DeepSpeed's CPU comm op is built into a cache shared by every run).
    return [f"run_root={run_root}", "engine=fsdp", "logger=none", "logger.every=1", "logger.image_every=0",
            f"data.train_urls={shards}/train.txt", f"data.val_urls={shards}/val.txt", "data.samples_per_epoch=96",
            "data.val_samples=16", "data.num_workers=0", "data.shuffle_buffer=16",
            "model.img_size=64", "model.window_size=4", f"stage.steps={STEPS}", "stage.global_batch=4",
            "stage.micro_batch=2", "stage.optim.warmup_steps=1", "+stages.simmim.stage.mask_patch_size=16"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_log(out_dir: Path, name: str, job_id: int) -> str:
    return (out_dir / f"{name}-{job_id}.out").read_text()


def assert_completed(job: dict, log: str) -> None:
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]


def assert_checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{step:08d}"
    assert sorted(p.name for p in (ckpt / f"step_{step:08d}").glob("client_rank*.pt")) == \
        ["client_rank00000.pt", "client_rank00001.pt"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(out), num_classes=10, train_samples=96, val_samples=16, samples_per_shard=8,
                      image_size=(80, 64), seed=0)
    return out


@pytest.fixture(scope="module")
def chain(slurm, shards, tmp_path_factory):
    """Both stages queued by the submit helper, run to the end."""
    out = tmp_path_factory.mktemp("chain")
    cmd = [str(REPO / "scripts" / "slurm" / "submit_two_stage.sh"), *sbatch_options(out), "--",
           *hydra_overrides(shards, out / "runs")]
    done = subprocess.run(cmd, env={**slurm.env, **JOB_ENV}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    simmim_id, supervised_id = map(int, re.fullmatch(r"simmim (\d+) supervised (\d+)\s*", done.stdout).groups())
    supervised_queued = slurm.job(supervised_id)
    simmim = slurm.wait_until_finished(simmim_id, JOB_TIMEOUT_S)
    supervised = slurm.wait_until_finished(supervised_id, JOB_TIMEOUT_S)
    return SimpleNamespace(out=out, runs=out / "runs" / "demo", simmim_id=simmim_id, supervised_id=supervised_id,
                           simmim=simmim, supervised=supervised, supervised_queued=supervised_queued)


def test_two_node_simmim_job_finishes_and_leaves_its_checkpoint(chain):
    log = job_log(chain.out, "swinv2-simmim", chain.simmim_id)
    assert_completed(chain.simmim, log)
    assert chain.simmim["NumNodes"] == "2" and chain.simmim["NodeList"] == "n[1-2]"
    assert "2 nodes x 1 ranks" in log
    assert [row["step"] for row in metrics(chain.runs / "simmim")] == list(range(1, STEPS + 1))
    assert_checkpoint(chain.runs / "simmim", STEPS)


def test_supervised_job_waits_for_simmim_and_starts_from_it(chain):
    assert chain.supervised_queued["JobState"] == "PENDING"
    assert chain.supervised_queued["Reason"] == "Dependency"
    assert chain.supervised["StartTime"] >= chain.simmim["EndTime"]  # ISO timestamps compare as strings
    log = job_log(chain.out, "swinv2-supervised", chain.supervised_id)
    assert_completed(chain.supervised, log)
    assert f"init_from {chain.runs / 'simmim'}" in log
    assert_checkpoint(chain.runs / "supervised", STEPS)


def test_signalled_job_checkpoints_requeues_and_resumes_without_a_bump(slurm, shards, chain, tmp_path):
    run_dir = tmp_path / "runs" / "demo" / "simmim"
    job_id = slurm.sbatch(*sbatch_options(tmp_path), "scripts/slurm/pretrain.sbatch", "+stage=simmim",
                          *hydra_overrides(shards, tmp_path / "runs"), env=JOB_ENV)
    slurm.wait_for(job_id, lambda job: len(metrics(run_dir)) >= 3, JOB_TIMEOUT_S, "3 steps in")
    # What SLURM does at --signal=B:USR1@<secs> before the time limit (or before a preemption).
    slurm.cmd("scancel", "--signal=USR1", "--batch", str(job_id))
    job = slurm.wait_until_finished(job_id, JOB_TIMEOUT_S)

    log = job_log(tmp_path, "swinv2", job_id)
    assert_completed(job, log)
    assert job["Restarts"] == "1", log[-4000:]
    stopped = int(re.search(r"stopping at step (\d+) on SIGUSR1", log).group(1))
    assert 3 <= stopped < STEPS
    assert re.search(rf"resumed from \S+step_{stopped:08d} at step {stopped}", log)
    assert_checkpoint(run_dir, STEPS)

    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # every step once, none lost
    # The same config, never interrupted. Two such runs differ by < 1e-4 (reduction order); a resume that
    # lost the data position, the RNG, the optimizer or the lr schedule differs by 1e-2 or more here.
    reference = metrics(chain.runs / "simmim")
    losses = [row["train/loss"] for row in rows]
    assert losses == pytest.approx([row["train/loss"] for row in reference], rel=1e-3)
