"""Start a 2-rank torchrun job for a test, with wandb offline by default and one thread per rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def torchrun(script: Path, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("WANDB_MODE", None)  # offline must be the default, not something the environment provides
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), *args]
    # Own session, so a timeout kills the workers too, not only torchrun (they would keep the CPUs busy).
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{script.name} {' '.join(args)} timed out:\n{proc.communicate()[0][-5000:]}")
    assert proc.returncode == 0, output[-8000:]
    return output
