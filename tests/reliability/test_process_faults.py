"""Ranks that die or hang and checkpoints that cannot be written, for real, in a 2-rank training job (DeepSpeed
ZeRO-3, gloo): SIGKILL and SIGSTOP of one rank, SIGKILL of the whole job in the middle of a save, a full and a
read-only file system (a tmpfs mounted on the run's checkpoint directory). The job ends without hanging and
names the rank or the path; `latest` always names a complete checkpoint; a relaunch goes on exactly as the
uninterrupted run."""
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import PARTIAL, step_tag, tag_step
from pretrain.process_group import PEER_REPORT_WAIT_S
from tests.pretrain.test_training import launch, shards  # noqa: F401 (the fixture)
from tests.reliability.jobs import Job, assert_same_losses, assert_same_weights, weights
from tests.torchrun import job_env, run, torchrun_cmd

pytestmark = pytest.mark.dist

# resilience.collective_timeout_s: a healthy peer of a 2-core machine at load 10 still answers within it (a
# save or an evaluation on one rank while the other waits); only the hung-rank test waits it out
TIMEOUT_S = 60
REPORT_WAIT_S = min(TIMEOUT_S / 2, PEER_REPORT_WAIT_S)
STEPS = 6
ARGS = (f"stage.steps={STEPS}", "checkpoint.every_steps=2", "stage.mask_patch_size=16",
        f"resilience.collective_timeout_s={TIMEOUT_S}")
SILENT_RANK_1 = f"rank 1 sent no report within {REPORT_WAIT_S:g} s: killed, stopped or hung"
# gloo's error for the operation that timed out, and for every later one of the group (the pair is closed)
TIMED_OUT = re.compile(rf"Timed out waiting {TIMEOUT_S * 1000}ms|Application timeout caused pair closure")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:  # noqa: F811
    """The uninterrupted run (every checkpoint kept) that each hurt run is compared with: its run dir."""
    root = tmp_path_factory.mktemp("reference")
    launch(shards, root, "simmim", *ARGS, f"checkpoint.keep_last={STEPS // 2}")
    return root / "demo" / "simmim"


def test_a_killed_rank_and_a_kill_in_the_middle_of_a_save_each_resume_like_the_uninterrupted_run(  # noqa: F811
        shards, reference, tmp_path):
    args = (*ARGS, "checkpoint.keep_last=2")
    # 1. SIGKILL rank 1. It is stopped first, so that rank 0 waits for it in a collective when it dies (as ranks
    # mostly do); otherwise torchrun's teardown of rank 0 may come before rank 0 notices, and only torchrun
    # names rank 1.
    with Job(shards, tmp_path, *args) as job:
        job.wait_for(lambda: job.last_step() >= 3, what="step 3")
        job.signal_rank(1, signal.SIGSTOP)
        time.sleep(1)
        job.signal_rank(1, signal.SIGKILL)
        assert job.wait(timeout=TIMEOUT_S + 120) != 0  # no hang: rank 0's collective fails at once
    out = job.output()
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", out), out[-5000:]  # torchrun's summary
    assert "rank 0: a collective failed" in out and SILENT_RANK_1 in out, out[-5000:]
    tag = job.latest()
    assert tag is not None and tag_step(tag) < STEPS

    # 2. The relaunch resumes from the last complete checkpoint; SIGKILL both ranks in the middle of a save.
    with Job(shards, tmp_path, *args) as job:
        partial = job.kill_while_saving()
    assert f"resumed from {job.checkpoints / tag} at step {tag_step(tag)}" in job.output()
    tag, saved = job.latest(), partial.name.removesuffix(PARTIAL)
    assert tag_step(tag) < tag_step(saved) and not (job.checkpoints / saved).exists(), (tag, saved)

    # 3. The next relaunch ignores the partial checkpoint, resumes from the one before, redoes that save and
    # ends where the uninterrupted run did: every step's loss (the relaunches' rows replace the killed runs'),
    # the final weights, the checkpoints kept.
    out = launch(shards, tmp_path, "simmim", *args)
    assert f"resumed from {job.checkpoints / tag} at step {tag_step(tag)}" in out
    assert_same_losses(job.run, reference, range(1, STEPS + 1))
    assert_same_weights(weights(job.run, STEPS), weights(reference, STEPS))
    assert sorted(p.name for p in job.checkpoints.glob("step_*")) == [step_tag(STEPS - 2), step_tag(STEPS)]


def test_a_hung_rank_is_named_once_the_collective_timeout_ends_the_job(shards, tmp_path):  # noqa: F811
    with Job(shards, tmp_path, *ARGS) as job:
        job.wait_for(lambda: job.last_step() >= 2, what="step 2")
        job.signal_rank(1, signal.SIGSTOP)
        job.wait_for(lambda: SILENT_RANK_1 in job.output(), timeout=TIMEOUT_S + 180, what="a report naming rank 1")
        job.wait_for(lambda: "closing signal SIGTERM" in job.output(), what="torchrun's teardown")
        # torchrun's SIGTERM cannot end a stopped process (it would SIGKILL it 30 s later): the operator's kill
        job.signal_rank(1, signal.SIGKILL)
        assert job.wait() != 0
    out = job.output()
    # the collective timeout, not another failure, ended rank 0's wait; then rank 0 named rank 1
    timed_out = TIMED_OUT.search(out)
    assert timed_out and timed_out.start() < out.index(SILENT_RANK_1), out[-5000:]
    # torchrun blames the first rank to exit, rank 0; its recorded error names the hung one
    root_cause = out.split("Root Cause (first observed failure)")[-1]
    assert "rank      : 0" in root_cause and "PeerFailure" in root_cause and SILENT_RANK_1 in root_cause


def test_a_collective_after_the_timed_out_one_still_names_the_hung_rank():
    # Which operation meets gloo's timeout depends on timing (e.g. one of DeepSpeed's coalesced all-gathers in a
    # save); the others fail with a pair closure that names neither gloo nor a timeout of its own.
    job = Path(__file__).with_name("gloo_timeout_job.py")
    returncode, out = run(torchrun_cmd(job, "2"), job_env(), timeout=120)
    assert returncode != 0
    assert "dropped: " in out and "Timed out waiting 2000ms" in out, out[-5000:]
    assert ("rank 0: a collective failed (RuntimeError: Application timeout caused pair closure). "
            "rank 1 sent no report within 1 s: killed, stopped or hung") in out, out[-5000:]


@pytest.fixture
def small_disk(tmp_path, reference) -> Path:
    """A tmpfs on the run's checkpoint directory with room for 1.5 checkpoints: the second save fills it."""
    where = tmp_path / "demo" / "simmim" / "checkpoints"
    where.mkdir(parents=True)
    one = sum(f.stat().st_size for f in (reference / "checkpoints" / step_tag(2)).iterdir())
    size = int(1.5 * one) + (1 << 20)  # + DeepSpeed's recovery scripts, beside the checkpoints
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"a tmpfs cannot be mounted here (needs root): {mount.stderr.strip()}")
    yield where
    subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_a_full_then_read_only_disk_fails_the_save_and_keeps_the_last_checkpoint(shards, reference,  # noqa: F811
                                                                                  small_disk, tmp_path):
    with Job(shards, tmp_path, *ARGS) as job:
        assert job.wait() != 0
    out = job.output()
    # every rank names the checkpoint and why; `latest` and the step-2 checkpoint are as they were
    assert f"checkpoint save to {small_disk / step_tag(4)} failed" in out, out[-5000:]
    assert "No space left on device" in out
    assert job.latest() == step_tag(2) and not (small_disk / step_tag(4)).exists()
    assert_same_weights(weights(job.run, 2), weights(reference, 2))

    # A read-only file system: the relaunch resumes from step 2, trains as the reference did, fails its save
    subprocess.run(["mount", "-o", "remount,ro,size=1g", str(small_disk)], check=True)
    with Job(shards, tmp_path, *ARGS) as job:
        assert job.wait() != 0
    out = job.output()
    assert f"resumed from {small_disk / step_tag(2)} at step 2" in out
    assert_same_losses(job.run, reference, range(1, 5))  # the steps it trained, 3 and 4, as the reference
    assert f"checkpoint save to {small_disk / step_tag(4)} failed" in out and "Read-only file system" in out
    assert out.count(f"latest is still {step_tag(2)}") >= 2, out[-5000:]  # on both ranks
    assert job.latest() == step_tag(2)
