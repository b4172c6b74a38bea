"""Run logging: a JSONL record in every run directory, plus wandb on global rank 0.

`metrics.jsonl` is the local record (one JSON object per line, always with `step`); it is appended to on
resume, so a step can appear twice after a restart from an older checkpoint: readers keep the last row.
wandb runs offline unless the user sets `WANDB_MODE=online` (or the config's mode) and has an API key;
`wandb sync RUN_DIR/wandb/offline-run-*` uploads an offline run later. The wandb run id lives in
`RUN_DIR/wandb_run_id`, so a resumed or requeued job continues the same run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"
WANDB_ID_FILE = "wandb_run_id"
KINDS = ("wandb", "none")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of `metrics.jsonl` merged per step, last write wins: a resumed run overwrites the steps it redid.

    A line cut short by a killed job is skipped with a warning; anything else unreadable is an error.
    """
    path = Path(run_dir) / METRICS_FILE
    rows: dict[int, dict] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n") and not line.startswith("{"):
                    raise ValueError(f"{path}:{number} is not a JSON metrics row: {line[:80]!r}") from None
                warnings.warn(f"{path}:{number}: skipping a torn line (job killed while writing?)")
                continue
            rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


class RunLogger:
    """Logs scalars and images for one run; a no-op on every rank but global rank 0."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg_dict: Mapping[str, Any],
        *,
        rank: int,
        kind: str = "wandb",
        project: str = "swinv2-pretrain",
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        mode: str = "offline",
        entity: str | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"logger.kind must be one of {KINDS}, got {kind!r}")
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self._jsonl = None
        self._wandb_run = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._jsonl = open(path, "a", buffering=1)  # line-buffered: tail -f works
        if torn:  # a killed job's last row: start ours on a line of their own
            self._jsonl.write("\n")
        if kind == "wandb":
            self._wandb_run = self._init_wandb(cfg_dict, project, group, job_type, name, mode, entity)

    def _init_wandb(self, cfg_dict, project, group, job_type, name, mode, entity):
        import wandb  # only rank 0 with logger=wandb pays the import and the service start

        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            name=name,
            id=run_id,
            resume="allow",
            config=dict(cfg_dict),
            dir=str(self.run_dir),
            mode=os.environ.get("WANDB_MODE") or mode,  # the user's environment wins over the config
        )
        # The x-axis is our own `step` metric, not wandb's internal counter: after a restart from an older
        # checkpoint the trainer logs steps it already logged, which wandb's `step=` would silently drop.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    @property
    def run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if k != "time"})

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> HWC uint8 array. Saved as PNG under RUN_DIR/images/ and sent to wandb."""
        if not self.enabled:
            return
        from PIL import Image

        for name, array in images.items():
            if array.dtype != np.uint8 or array.ndim != 3:
                raise ValueError(f"image {name!r} must be an HWC uint8 array, got {array.dtype} {array.shape}")
            path = self.run_dir / IMAGES_DIR / f"{name.replace('/', '_')}_{int(step):08d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(array).save(path)
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({"step": int(step), **{k: wandb.Image(v) for k, v in images.items()}})

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
