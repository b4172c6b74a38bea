"""A training job (launch/pretrain.py, SimMIM, the tiny model, 2 gloo ranks under torchrun) that a test watches
and hurts: it finds each rank's process, waits for a logged step or a file, and sends real signals. Whatever
is still running when the test ends is killed. And the comparisons of a hurt run with an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from pretrain.checkpoint import PARTIAL, step_tag
from pretrain.engine.deepspeed import DeepSpeedEngine
from pretrain.loggers import read_metrics
from tests.pretrain.test_training import command
from tests.torchrun import kill, start


class Job:
    def __init__(self, shards: Path, run_root: Path, *overrides: str):
        cmd, env = command(shards, run_root, "simmim", *overrides)
        self.run = run_root / "demo" / "simmim"
        self.checkpoints = self.run / "checkpoints"
        self.log = run_root / f"job{len(list(run_root.glob('job*.log')))}.log"
        run_root.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        with open(self.log, "w") as out:  # a file, not a pipe: nobody reads while the test waits
            self.proc = start(cmd, env, stdout=out, stderr=subprocess.STDOUT)
        self.ranks: dict[int, int] = {}  # rank -> pid of torchrun's children, as last looked up

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_step(self) -> int:
        """The last step in metrics.jsonl (0 before the first)."""
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return 0
        with open(path, "rb") as f:  # only the end: a long run's file is read many times a second
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)["step"]
            except json.JSONDecodeError:  # a line being written
                continue
        return 0

    def latest(self) -> str | None:
        marker = self.checkpoints / "latest"
        return marker.read_text().strip() if marker.exists() else None

    def wait_for(self, condition: Callable[[], bool], timeout: float = 240, what: str = "",
                 poll_s: float = 0.05) -> None:
        """Poll `condition`; fail if the job ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (status {self.proc.returncode}) before {what}:\n{self.output()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n{self.output()[-5000:]}")
            time.sleep(poll_s)

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker process of `rank` (torchrun's child with RANK=rank in its environment)."""
        self.wait_for(lambda: rank in self._find_ranks(), what=f"rank {rank}'s process")
        return self.ranks[rank]

    def _find_ranks(self) -> dict[int, int]:
        """torchrun's children now, by rank (a child that ended is still a zombie until torchrun reaps it)."""
        self.ranks = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    variables = (stat.parent / "environ").read_text().split("\0")
                    environ = dict(v.split("=", 1) for v in variables if "=" in v)
                    self.ranks[int(environ["RANK"])] = int(stat.parent.name)
            except (OSError, IndexError, KeyError, ValueError):  # a process that ended meanwhile
                continue
        return self.ranks

    def signal_rank(self, rank: int, sig: signal.Signals) -> None:
        os.kill(self.rank_pid(rank), sig)

    def saving(self) -> Path | None:
        """A checkpoint folder this job is writing while an earlier one is `latest` (not one an earlier job
        left)."""
        if self.latest() is None:
            return None
        for partial in self.checkpoints.glob(f"*{PARTIAL}"):
            try:
                if partial.stat().st_mtime >= self.started and any(f.stat().st_size for f in partial.iterdir()):
                    return partial
            except OSError:  # renamed meanwhile
                continue
        return None

    def kill_while_saving(self) -> Path:
        """Stop both ranks while they write a checkpoint and SIGKILL the job there (retried at the next save if
        that one completed before the ranks stopped); the partial checkpoint folder it leaves."""
        while True:
            self.wait_for(lambda: self.saving() is not None, what="a save in progress", timeout=1800, poll_s=0.002)
            partial = self.saving()
            for rank in (0, 1):
                self.signal_rank(rank, signal.SIGSTOP)
            if partial is not None and partial.exists():
                self.kill()
                return partial
            for rank in (0, 1):
                self.signal_rank(rank, signal.SIGCONT)
            self.wait_for(lambda: not any(self.checkpoints.glob(f"*{PARTIAL}")), what="the save's end")

    def wait(self, timeout: float = 120) -> int:
        """torchrun's exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output()[-5000:]}")

    def kill(self) -> None:
        kill(self.proc)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return DeepSpeedEngine.read_weights(run / "checkpoints", step_tag(step))


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def assert_same_losses(run: Path, reference: Path, steps: range) -> None:
    got, expected = ({r["step"]: r["train/loss"] for r in read_metrics(path)} for path in (run, reference))
    assert [got.get(s) for s in steps] == [expected[s] for s in steps]
