"""Start and stop the jobs a test runs: torchrun with gloo ranks on this machine, one thread each, wandb offline
by default. A job that outlasts its time is killed whole (torchrun, every rank, their data loader workers), so
nothing it left keeps the machine busy for the next test.

Imported as tests.torchrun (setup.cfg puts the repository root on pytest's sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job: this one without another job's rank variables and without WANDB_MODE
    (offline must be the default, not something the environment provides)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE"):
        env.pop(var, None)
    return env


def torchrun_cmd(script: Path, *args: str, nproc: int = 2) -> list[str]:
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(script), *args]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> str:
    """Run `script` on `nproc` ranks to a zero exit; its output."""
    returncode, output = run(torchrun_cmd(script, *args, nproc=nproc), job_env(), timeout)
    assert returncode == 0, output[-8000:]
    return output


def torchrun_side_by_side(jobs: list[tuple[Path, list[str], int]], timeout: float = 400) -> None:
    """Run torchrun jobs `(script, args, nproc)` at once, each to a zero exit; all of them are killed whole
    when one fails or outlasts `timeout`."""
    procs = [start(torchrun_cmd(script, *args, nproc=nproc), job_env(), stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True) for script, args, nproc in jobs]
    try:
        for proc in procs:
            output = proc.communicate(timeout=timeout)[0]
            assert proc.returncode == 0, output[-4000:]
    finally:
        for proc in procs:
            kill(proc)


def start(cmd: list[str], env: dict, **popen: object) -> subprocess.Popen:
    """`cmd` from the repository root in a session of its own (its process group is the job's)."""
    return subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, **popen)


def run(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) of `cmd`; when it outlasts `timeout` the whole job is killed and the test fails."""
    proc = start(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{proc.communicate()[0][-5000:]}")
    return proc.returncode, output


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and everything it started. torchrun starts each rank in a session of its own, so killing
    torchrun's process group alone would leave the ranks running: every descendant's group is killed too."""
    if proc.poll() is not None:
        return  # ended: its pid and its children's may belong to others by now
    kill_tree(proc.pid)
    proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL process `pid`, its descendants and their process groups (but never this process's group)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
            p.kill()  # the root first: it cannot start new processes any more
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
