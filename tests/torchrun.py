"""Start a torchrun job for a test: gloo ranks on this machine, one thread each, wandb offline by default.

Imported as tests.torchrun (setup.cfg puts the repository root on pytest's sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("WANDB_MODE", None)  # offline must be the default, not something the environment provides
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    returncode, output = run(cmd, env, timeout)
    assert returncode == 0, output[-8000:]
    return output


def run(cmd: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) of `cmd` run from the repository root; a test failure when it outlasts `timeout`."""
    # Own session, so a timeout kills the workers too, not only torchrun (they would keep the CPUs busy).
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{' '.join(cmd)} timed out:\n{proc.communicate()[0][-5000:]}")
    return proc.returncode, output
