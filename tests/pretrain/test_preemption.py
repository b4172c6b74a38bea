"""PreemptionWatcher on 2 real gloo ranks: a signal on one rank stops both after the same step."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.torchrun import job_env, start, torchrun_cmd

# Each rank steps until the watcher says stop, then reports the step it stopped after.
WORKER = """
import json, os, sys, time
import torch.distributed as dist
from pretrain.preemption import PreemptionWatcher

out = sys.argv[1]
watcher = PreemptionWatcher()
dist.init_process_group("gloo")
rank = dist.get_rank()
with open(f"{out}/pid{rank}", "w") as f:
    f.write(str(os.getpid()))
step = 0
while step < 2000:
    step += 1
    time.sleep(0.02)
    if watcher.agree()[1]:
        break
with open(f"{out}/result{rank}.json", "w") as f:
    json.dump({"step": step, "signal": watcher.signal_name}, f)
dist.destroy_process_group()
"""


def _start_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return start(torchrun_cmd(script, str(tmp_path)), job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True)


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    time.sleep(0.5)  # let the ranks step a few times before the signal


def _results(tmp_path, proc):
    output = proc.communicate(timeout=240)[0]
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1)], output


@pytest.mark.dist
def test_sigusr1_on_one_rank_stops_both_after_the_same_step(tmp_path):
    proc = _start_ranks(tmp_path)
    _wait_for(tmp_path / "pid1", proc)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGUSR1)
    (r0, r1), output = _results(tmp_path, proc)
    assert proc.returncode == 0, output
    assert r1["signal"] == "SIGUSR1" and r0["signal"] is None
    assert r0["step"] == r1["step"] < 2000


@pytest.mark.dist
def test_sigterm_to_torchrun_reaches_every_worker(tmp_path):
    # SLURM's step signal reaches torchrun's agent, which forwards SIGTERM to its workers.
    proc = _start_ranks(tmp_path)
    _wait_for(tmp_path / "pid1", proc)
    proc.send_signal(signal.SIGTERM)
    (r0, r1), output = _results(tmp_path, proc)
    assert r0["signal"] == r1["signal"] == "SIGTERM"
    assert r0["step"] == r1["step"] < 2000
