"""A small version of the SwinV2 paper's Table 1: a classifier trained at a small image size and window,
evaluated at larger sizes and windows without fine-tuning, then after a short fine-tune at one of them, once
with log-spaced and once with linear-spaced continuous position bias (CPB) coordinates.

    make transfer                                     (= python -m scripts.transfer_table)
    python -m scripts.transfer_table --seeds 0 --train-steps 100 [-- HYDRA_OVERRIDE ...]

Every number comes from the real stages through launch/pretrain.py on `--nproc` ranks: `+stage=supervised
stage.init_from=none` at --train, then `+stage=eval stage.init_from=<that run>` at each --eval-at size,
then `+stage=finetune` at --finetune-at. The eval and fine-tune stages read the windows the position bias
was trained at from the source run's config, so offsets inside the training window keep their inputs and
only the larger ones are extrapolated; log coordinates extrapolate less (paper §3.3). The default sizes
keep the number of windows per stage (128/w8, 256/w16: as the paper's 256/w8 -> 384/w12 -> 768/w24
columns) or keep the image and grow only the window (64/w8, 64/w16). Runs go to
<run-root>/<coords>_s<seed>[_<size>w<window>]/<stage>/ (each replaced when rerun), with the launch output
beside them as <stage>.log. Overrides after `--` go to every launch (tests point data.* at tiny shards);
without data overrides the demo shards are written if missing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.loggers import read_metrics

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    img: int
    window: int

    @classmethod
    def parse(cls, text: str) -> Size:
        img, _, window = text.partition("/")
        return cls(int(img), int(window))

    def __str__(self) -> str:
        return f"{self.img}/w{self.window}"

    def overrides(self) -> list[str]:
        return [f"model.img_size={self.img}", f"model.window_size={self.window}"]


def launch(args, experiment: str, stage: str, *overrides: str) -> Path:
    """One stage on args.nproc ranks; returns its run dir. A failed launch stops the table with its output."""
    run = Path(args.run_root) / experiment / stage
    shutil.rmtree(run, ignore_errors=True)  # a finished run would be resumed instead of redone
    run.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}",
           str(REPO / "launch" / "pretrain.py"), f"+stage={stage}", f"run_root={args.run_root}",
           f"experiment_name={experiment}", "logger=none", f"engine={args.engine}", *overrides, *args.overrides]
    log = run.parent / f"{stage}.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nfailed (exit {proc.returncode}); its output, {log}:\n"
                 f"{log.read_text()[-4000:]}")
    return run


def last_top1(run: Path) -> float:
    return [row for row in read_metrics(run) if "eval/top1" in row][-1]["eval/top1"]


def columns(args) -> list[str]:
    return [f"trained {args.train}", *(f"{size}, no fine-tune" for size in args.eval_at),
            f"{args.finetune_at}, fine-tuned {args.finetune_steps} steps"]


def row(args, coords: str, seed: int) -> dict:
    """Train at --train, evaluate at each --eval-at, fine-tune at --finetune-at: top-1 of each, in the order
    of columns(args)."""
    name = f"{coords}_s{seed}"
    common = [f"seed={seed}", f"model.cpb_coords={coords}"]
    train = launch(args, name, "supervised", *common, *args.train.overrides(), "stage.init_from=none",
                   f"stage.steps={args.train_steps}", "stage.eval_every=0",
                   f"checkpoint.every_steps={args.train_steps}")
    top1 = [last_top1(train)]
    for size in args.eval_at:
        top1.append(last_top1(launch(args, f"{name}_{size.img}w{size.window}", "eval", *common,
                                     *size.overrides(), f"stage.init_from={train}")))
    size = args.finetune_at
    top1.append(last_top1(launch(args, f"{name}_{size.img}w{size.window}", "finetune", *common, *size.overrides(),
                                 f"stage.init_from={train}", f"stage.steps={args.finetune_steps}",
                                 "stage.eval_every=0", f"checkpoint.every_steps={args.finetune_steps}")))
    return dict(coords=coords, seed=seed, top1=top1)


def format_table(rows: list[dict], args) -> str:
    heads = ("CPB coords", "seed", *columns(args))
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for coords in args.coords:
        mine = [r for r in rows if r["coords"] == coords]
        if len(mine) > 1:
            per_column = zip(*(r["top1"] for r in mine))
            mine.append(dict(coords=coords, seed="mean", top1=[sum(c) / len(c) for c in per_column]))
        lines += [f"| {r['coords']} | {r['seed']} | " + " | ".join(f"{t:.1f}" for t in r["top1"]) + " |"
                  for r in mine]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Size.parse, default=Size(64, 4), help="IMG/WINDOW trained at")
    p.add_argument("--eval-at", type=Size.parse, nargs="+",
                   default=[Size(128, 8), Size(256, 16), Size(64, 8), Size(64, 16)],
                   help="IMG/WINDOW ... evaluated at without fine-tuning")
    p.add_argument("--finetune-at", type=Size.parse, default=Size(256, 16), help="IMG/WINDOW fine-tuned at")
    p.add_argument("--train-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--coords", nargs="+", default=["log", "linear"], choices=["log", "linear"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--engine", default="fsdp", help="fsdp is the faster engine for the nano model on CPU")
    p.add_argument("--run-root", default="runs/transfer")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every launch (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run_root = str(Path(args.run_root).resolve())
    if not any(o.startswith("data.") for o in args.overrides):
        subprocess.run([sys.executable, "-m", "data.demo"], cwd=REPO, check=True)
    start = time.perf_counter()
    rows = [row(args, coords, seed) for seed in args.seeds for coords in args.coords]
    launches = len(rows) * (len(args.eval_at) + 2)
    print(f"\ntop-1 (%) on the val shards, {launches} launches in {time.perf_counter() - start:.0f} s\n")
    print(format_table(rows, args))


if __name__ == "__main__":
    main()
