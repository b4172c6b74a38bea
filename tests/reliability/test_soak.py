"""Soak (`make soak`, outside `make test`): thousands of steps of the nano model on 2 gloo ranks, SIGKILLed again
and again (one rank, the whole job, the whole job in the middle of a save) and relaunched each time, end with
the uninterrupted run's loss curve and final weights, bit for bit.

ZeRO-1 keeps the steps short (about 3x faster than ZeRO-3 here); ZeRO-3 and the hang and disk faults are in
test_process_faults.py. With 48 global batches per epoch the run crosses some 40 epochs of the demo shards."""
import random
import signal
from pathlib import Path

import pytest

from pretrain.checkpoint import PARTIAL, step_tag
from tests.pretrain.test_training import shards  # noqa: F401 (the fixture)
from tests.reliability.jobs import Job, assert_same_losses, assert_same_weights, weights

pytestmark = [pytest.mark.soak, pytest.mark.timeout(4 * 3600)]

STEPS, EVERY, LOG_EVERY = 2000, 100, 10
ARGS = (f"stage.steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
        f"logger.every={LOG_EVERY}", "model.img_size=32", "stage.mask_patch_size=8", "stage.global_batch=2",
        "stage.micro_batch=1", "stage.optim.warmup_steps=100", "engine.zero_stage=1",
        "resilience.collective_timeout_s=60")
FAULTS = ("rank", "job", "save") * 2  # one every STEPS / 7 steps or so


def run_to_the_end(shards: Path, root: Path) -> Job:  # noqa: F811
    with Job(shards, root, *ARGS) as job:
        assert job.wait(timeout=3 * 3600) == 0, job.output()[-5000:]
    return job


def hurt(job: Job, fault: str, at_step: int, rng: random.Random) -> None:
    """Once the job reaches `at_step`: SIGKILL one rank, or every rank, or every rank while they write the next
    checkpoint."""
    job.wait_for(lambda: job.last_step() >= at_step, timeout=3600, what=f"step {at_step}")
    if fault == "rank":
        job.signal_rank(rng.randrange(2), signal.SIGKILL)
        assert job.wait(timeout=120) != 0  # the other rank must not hang
    elif fault == "job":
        job.kill()
    else:
        job.kill_while_saving()


def test_a_long_run_killed_and_relaunched_again_and_again_ends_as_the_uninterrupted_run(shards, tmp_path):  # noqa: F811
    reference = run_to_the_end(shards, tmp_path / "reference").run
    rng = random.Random(0)
    root = tmp_path / "hurt"
    jobs, resumed_from = [], []  # resumed_from[i]: `latest` after job i was killed
    for i, fault in enumerate(FAULTS):
        with Job(shards, root, *ARGS) as job:
            hurt(job, fault, (i + 1) * STEPS // (len(FAULTS) + 1) + rng.randrange(EVERY), rng)
        jobs.append(job)
        resumed_from.append(job.latest())
    jobs.append(run_to_the_end(shards, root))

    assert len(set(resumed_from)) == len(FAULTS), resumed_from  # each job got further than the one before
    for job, tag in zip(jobs[1:], resumed_from):
        assert f"resumed from {job.checkpoints / tag} at step" in job.output()
    assert not list(job.checkpoints.glob(f"*{PARTIAL}"))
    assert sorted(p.name for p in job.checkpoints.glob("step_*")) == [step_tag(STEPS - EVERY), step_tag(STEPS)]
    assert_same_losses(job.run, reference, range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert_same_weights(weights(job.run, STEPS), weights(reference, STEPS))
