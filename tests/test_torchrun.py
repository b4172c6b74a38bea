"""tests/torchrun.py's promise: a job a test ends is gone whole, torchrun and every rank with its workers,
although torchrun starts each rank in a session of its own."""
import os
import subprocess
import time

import psutil
import pytest

from tests.torchrun import job_env, kill, start, torchrun_cmd

# Each rank starts a child of its own (as a data loader worker would), records both pids, and waits forever.
RANK = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
with open(os.path.join(sys.argv[1], f"pids{os.environ['RANK']}"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
time.sleep(3600)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.dist
def test_killing_a_job_ends_torchrun_its_ranks_and_their_children(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    proc = start(torchrun_cmd(script, str(tmp_path)), job_env(), stdout=subprocess.DEVNULL,
                 stderr=subprocess.STDOUT)
    files = [tmp_path / f"pids{r}" for r in range(2)]
    deadline = time.monotonic() + 300  # a bound for a hang only: start-up on a loaded machine takes seconds
    while not all(f.exists() and f.read_text() for f in files):
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.1)
    pids = [int(p) for f in files for p in f.read_text().split()]
    assert all(os.getsid(rank) == rank for rank in pids[::2])  # killing torchrun's group alone would miss them
    assert all(running(pid) for pid in pids)
    kill(proc)
    assert proc.returncode is not None
    for pid in pids:
        deadline = time.monotonic() + 60  # SIGKILL lands at once; the kernel may take a moment to reap
        while running(pid):
            assert time.monotonic() < deadline, f"process {pid} survived the kill"
            time.sleep(0.05)
