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

from omegaconf import DictConfig, OmegaConf

from pretrain.config import Config

CONFIG_FILE = "config.yaml"
LATEST = "latest"


def run_dir(cfg: Config, stage: str | None = None) -> Path:
    return Path(cfg.run_root) / cfg.experiment_name / (stage or cfg.stage.name)


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest_tag(checkpoints: Path) -> str | None:
    """The newest complete checkpoint under a checkpoint folder, or None before the first."""
    marker = checkpoints / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def finished(run: Path) -> bool:
    """A run dir with its config and at least one complete checkpoint: something to resume or start from."""
    return latest_tag(checkpoint_dir(run)) is not None and (run / CONFIG_FILE).is_file()


def saved_config(run: Path) -> DictConfig:
    return OmegaConf.load(run / CONFIG_FILE)


def checkpoint_engine(tag_dir: Path) -> str:
    """The engine whose format a checkpoint folder holds, told apart by its files."""
    if (tag_dir / ".metadata").is_file():
        return "fsdp"  # torch.distributed.checkpoint
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*model_states.pt")):
        return "deepspeed"  # any ZeRO stage
    raise ValueError(f"{tag_dir} is not a checkpoint: expected DeepSpeed '*model_states.pt' + "
                     "'*optim_states.pt' files or a torch.distributed.checkpoint '.metadata' file")


def save_config(cfg: Config, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f"{CONFIG_FILE}.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(run / CONFIG_FILE)
