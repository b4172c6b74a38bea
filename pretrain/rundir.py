"""The run directory layout, in one place.

runs/<experiment>/<stage>/
  config.yaml                 resolved config of the latest launch
  metrics.jsonl, images/      written by pretrain.loggers (every logger kind)
  wandb/, wandb_run_id        wandb offline runs and the id a resumed job continues (logger=wandb)
  checkpoints/latest          tag of the newest complete checkpoint
  checkpoints/<tag>/          engine files + client_rank<r>.pt per rank
  checkpoints/<tag>.partial/  a save in progress or killed (pretrain.checkpoint: never loaded)
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pretrain.config import Config

CONFIG_FILE = "config.yaml"


def run_dir(cfg: Config, stage: str | None = None) -> Path:
    return Path(cfg.run_root) / cfg.experiment_name / (stage or cfg.stage.name)


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def save_config(cfg: Config, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f"{CONFIG_FILE}.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(run / CONFIG_FILE)
