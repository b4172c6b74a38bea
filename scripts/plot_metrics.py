"""Draw loss, learning rate, throughput and MFU curves of one or more runs from their metrics.jsonl.

    python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] -o curves.png

For people without wandb: it reads only the local record every run directory holds.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.loggers import METRICS_FILE, read_metrics  # noqa: E402

# (title, key prefix or exact key, y scale)
PANELS = [
    ("loss", "train/loss", "log"),
    ("learning rate", "lr/", "linear"),
    ("images/s (global)", "perf/img_per_s", "linear"),
    ("MFU", "perf/mfu", "linear"),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def draw(run_dirs: list[Path]) -> plt.Figure:
    """One panel per PANELS entry, one line per run (and per key under a prefix)."""
    runs = {}
    for run_dir in run_dirs:
        if not (run_dir / METRICS_FILE).is_file():
            sys.exit(f"error: {run_dir} has no {METRICS_FILE}; is it a run directory?")
        runs["/".join(run_dir.resolve().parts[-2:])] = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (title, key, yscale) in zip(axes.flat, PANELS):
        values_drawn = []
        for label, rows in runs.items():
            keys = sorted({k for r in rows for k in r if k.startswith(key)}) if key.endswith("/") else [key]
            for k in keys:
                steps, values = _series(rows, k)
                if steps:
                    ax.plot(steps, values, label=label if len(keys) == 1 else f"{label} {k[len(key):]}")
                    values_drawn += values
        ax.set_title(title)
        ax.set_xlabel("step")
        if not values_drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if yscale == "log" and min(values_drawn) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    return fig


def plot(run_dirs: list[Path], out: Path) -> None:
    fig = draw(run_dirs)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path("metrics.png"))
    args = parser.parse_args()
    plot(args.run_dirs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
