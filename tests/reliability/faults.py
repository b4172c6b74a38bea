"""Run launch/pretrain.py (SimMIM, the tiny model, 2 gloo ranks) with faults injected by fault_job.py."""
from __future__ import annotations

import json
from pathlib import Path

from tests.pretrain.test_training import command
from tests.torchrun import run

JOB = Path(__file__).resolve().parent / "fault_job.py"


def run_with_faults(shards: Path, run_root: Path, faults: dict[int, str], *overrides: str,
                    timeout: float = 300) -> tuple[int, str]:
    """(torchrun's exit code, output); a hang fails the test at `timeout`. `faults`: global batch number ->
    `nan` | `grad` | `spike`."""
    cmd, env = command(shards, run_root, "simmim", "stage.mask_patch_size=16", "checkpoint.every_steps=2",
                       *overrides, script=JOB)
    env["FAULTS"] = json.dumps(faults)
    return run(cmd, env, timeout)


def run_dir(run_root: Path) -> Path:
    return run_root / "demo" / "simmim"
