"""scripts/plot_metrics.py draws PNG curves from the local metrics record of one or more runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.loggers import RunLogger

REPO = Path(__file__).resolve().parents[2]


def write_run(run_dir: Path, scale: float) -> None:
    logger = RunLogger(run_dir, {}, rank=0, kind="none")
    for step in range(1, 21):
        logger.log(step, {"train/loss": scale / step, "lr/backbone": 1e-3, "lr/head": 1e-2,
                          "perf/img_per_s": 100.0, "perf/mfu": 0.4})
    logger.finish()


def plot(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_two_runs_make_one_png(tmp_path):
    write_run(tmp_path / "a" / "simmim", 1.0)
    write_run(tmp_path / "b" / "simmim", 2.0)
    out = tmp_path / "curves.png"
    proc = plot(tmp_path / "a" / "simmim", tmp_path / "b" / "simmim", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_folder_without_metrics_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from plot_metrics import plot as plot_runs

    with pytest.raises(SystemExit, match=f"{tmp_path} has no metrics.jsonl"):
        plot_runs([tmp_path], tmp_path / "x.png")
