"""What the launcher settles once, on every rank, before any process group, model or loader exists.

It checks the files the config names (the data shards, `stage.init_from`) and decides where the run starts
from: its own latest checkpoint (a resume), a source run or weights file (supervised, finetune, eval), or
nothing. For a fine-tune or an eval it also takes the windows the source's position bias was trained at
(`model.pretrained_window_sizes`, pretrain/start_weights.py) into the config. `Start` carries the result; its
config is final, and nothing edits a config after this.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from data.shards import shard_list
from pretrain import rundir, start_weights
from pretrain.config import (Config, ConfigError, EvalStageConfig, FinetuneStageConfig, SupervisedStageConfig,
                             evaluates)

log = logging.getLogger(__name__)

# The stage of the same experiment whose run `stage.init_from: auto` starts from.
AUTO_SOURCE = {"supervised": "simmim", "finetune": "supervised"}


@dataclass(frozen=True)
class Start:
    cfg: Config
    source: start_weights.Source | None = None  # starting weights; None from scratch and when resuming


def preflight(cfg: Config, world_size: int) -> Start:
    """The launcher's check: data files, then the start. A ConfigError names the key."""
    check_data(cfg, world_size)
    return resolve_start(cfg)


def check_data(cfg: Config, world_size: int) -> None:
    """Local shards exist and are enough for every rank x worker (remote ones, pipe: or http://, are only
    tried when read)."""
    if not isinstance(cfg.stage, EvalStageConfig):
        _check_shards("data.train_urls", cfg.data.train_urls, cfg, world_size, cfg.data.resampled)
    if evaluates(cfg):
        _check_shards("data.val_urls", cfg.data.val_urls, cfg, world_size, resampled=False)


def _check_shards(key: str, urls: str, cfg: Config, world_size: int, resampled: bool) -> None:
    try:
        shard_list(urls, world_size=world_size, num_workers=cfg.data.num_workers, resampled=resampled)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def resolve_start(cfg: Config) -> Start:
    resuming = rundir.latest_tag(rundir.checkpoint_dir(rundir.run_dir(cfg))) is not None
    source = None if resuming else _source(cfg)
    if isinstance(cfg.stage, (FinetuneStageConfig, EvalStageConfig)):
        _check_coords(cfg, source)
        windows = _pretrained_windows(cfg, source, resuming)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_window_sizes=windows))
    return Start(cfg, source)


def _source(cfg: Config) -> start_weights.Source | None:
    if not isinstance(cfg.stage, (SupervisedStageConfig, EvalStageConfig)) or cfg.stage.init_from == "none":
        return None
    auto = AUTO_SOURCE.get(cfg.stage.name, "supervised")  # eval: a fine-tune or supervised run, never auto
    spec = rundir.run_dir(cfg, auto) if cfg.stage.init_from == "auto" else cfg.stage.init_from
    return start_weights.resolve_source(str(spec), f"run +stage={auto} first, or set stage.init_from")


def _check_coords(cfg: Config, source: start_weights.Source | None) -> None:
    if source is None or source.config is None:
        return
    trained = source.config.model.get("cpb_coords", "log")  # runs from before the option: log
    if trained != cfg.model.cpb_coords:
        raise ConfigError(f"model.cpb_coords={cfg.model.cpb_coords}: {source.path} was trained with {trained} "
                          "coordinates, which its position bias weights only fit")


def _pretrained_windows(cfg: Config, source: start_weights.Source | None, resuming: bool) -> list[int]:
    m = cfg.model
    if any(m.pretrained_window_sizes) or (source is None and not resuming):
        return list(m.pretrained_window_sizes)
    if resuming:  # the windows this run started with
        return list(rundir.saved_config(rundir.run_dir(cfg)).model.pretrained_window_sizes)
    if source.config is None:
        raise ConfigError(f"model.pretrained_window_sizes: set it, per stage, to the windows the position bias of "
                          f"{source} was trained at (e.g. [12,12,12,6] after 192px/window 12): a weights file does "
                          "not say")
    trained = source.config.model
    windows = start_weights.trained_windows(trained)
    log.info("model.pretrained_window_sizes %s: the windows the position bias of %s was trained at (its img_size "
             "%d, window_size %d, pretrained_window_sizes %s)", windows, source.path, trained.img_size,
             trained.window_size, list(trained.pretrained_window_sizes))
    return windows
