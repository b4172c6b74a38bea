"""Run launch/pretrain.py (SimMIM, the tiny model, 2 gloo ranks) with faults injected by fault_job.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.pretrain.test_training import REPO, command

JOB = Path(__file__).resolve().parent / "fault_job.py"


def run_with_faults(shards: Path, run_root: Path, faults: dict[int, str], *overrides: str,
                    timeout: float = 300) -> tuple[int, str]:
    """(torchrun's exit code, output). `faults`: global batch number -> `nan` | `grad` | `spike`."""
    cmd, env = command(shards, run_root, "simmim", "stage.mask_patch_size=16", "checkpoint.every_steps=2",
                       *overrides, script=JOB)
    env["FAULTS"] = json.dumps(faults)
    # Own session, so a hang is killed with its workers (the test then fails on the timeout).
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung: {' '.join(cmd)}\n{proc.communicate()[0][-5000:]}")


def run_dir(run_root: Path) -> Path:
    return run_root / "demo" / "simmim"
