"""scripts/plot_metrics.py draws PNG curves from the local metrics record of one or more runs."""

import sys
from pathlib import Path

import pytest

from pretrain.loggers import RunLogger
from tests.torchrun import REPO, job_env, run

sys.path.insert(0, str(REPO / "scripts"))
from plot_metrics import draw, plot  # noqa: E402

STEPS = range(1, 21)


def write_run(run_dir: Path, scale: float) -> None:
    logger = RunLogger(run_dir, {}, rank=0, kind="none")
    for step in STEPS:
        logger.log(step, {"train/loss": scale / step, "lr/backbone": 1e-3 * scale, "lr/head": 1e-2,
                          "perf/img_per_s": 100.0 * scale, "perf/mfu": 0.4})
    logger.finish()


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    dirs = [tmp_path / "a" / "simmim", tmp_path / "b" / "simmim"]
    for scale, run_dir in zip((1.0, 2.0), dirs):
        write_run(run_dir, scale)
    return dirs


def lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_each_panel_draws_every_runs_logged_values(runs):
    fig = draw(runs)
    loss, lr, speed, mfu = fig.axes
    steps = list(STEPS)
    assert lines(loss) == {"a/simmim": (steps, [1.0 / s for s in steps]),
                           "b/simmim": (steps, [2.0 / s for s in steps])}
    assert loss.get_yscale() == "log" and lr.get_yscale() == "linear"
    assert lines(lr) == {"a/simmim backbone": (steps, [1e-3] * 20), "a/simmim head": (steps, [1e-2] * 20),
                         "b/simmim backbone": (steps, [2e-3] * 20), "b/simmim head": (steps, [1e-2] * 20)}
    assert lines(speed) == {"a/simmim": (steps, [100.0] * 20), "b/simmim": (steps, [200.0] * 20)}
    assert lines(mfu) == {"a/simmim": (steps, [0.4] * 20), "b/simmim": (steps, [0.4] * 20)}


def test_the_command_writes_a_png(runs, tmp_path):
    out = tmp_path / "curves.png"
    returncode, output = run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), *map(str, runs), "-o",
                              str(out)], job_env(), timeout=120)
    assert returncode == 0 and f"wrote {out}" in output, output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_folder_without_metrics_is_named_in_the_error(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path} has no metrics.jsonl"):
        plot([tmp_path], tmp_path / "x.png")
