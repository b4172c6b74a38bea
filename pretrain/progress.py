"""Console progress on global rank 0: a tqdm bar on a terminal, plain periodic lines otherwise (SLURM logs)."""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """`update(step, loss=..., img_per_s=...)` every step; silent on every rank but global rank 0.

    A bar redraws cheaply, so it follows every step; plain lines would flood a log file, so they are
    written at most once per `line_every_s` seconds (and at the last step).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        rank: int,
        start_step: int = 0,
        desc: str = "train",
        line_every_s: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.start_step = start_step
        self.desc = desc
        self.line_every_s = line_every_s
        self.stream = stream or sys.stdout
        self.t0 = self.last_line_t = time.monotonic()
        self.step = start_step
        self.stats: dict[str, float] = {}
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", file=self.stream,
                            dynamic_ncols=True)

    def update(self, step: int, **stats: float | None) -> None:
        """`stats` (e.g. loss, img_per_s) are shown as given; None values keep the last shown one."""
        if not self.enabled:
            return
        self.stats.update({k: v for k, v in stats.items() if v is not None})
        if self.bar is not None:
            self.bar.update(step - self.step)
            if stats:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.stats.items()}, refresh=False)
        self.step = step
        now = time.monotonic()
        if self.bar is None and (now - self.last_line_t >= self.line_every_s or step >= self.total_steps):
            self.last_line_t = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        done = self.step - self.start_step
        eta = elapsed / done * (self.total_steps - self.step) if done > 0 else float("nan")
        parts = [f"{self.desc} step {self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.1f}%)"]
        parts += [f"{k} {v:.4g}" for k, v in self.stats.items()]
        parts += [f"elapsed {_hms(elapsed)}", f"eta {_hms(eta) if done > 0 else '?'}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
