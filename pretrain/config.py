"""Structured configs: the typed shape of the Hydra tree in conf/.

Every yaml group is merged over one of these dataclasses, so a wrong key or type fails while Hydra
composes. Value checks that a type cannot express live in `validate`; the files the config names are checked
by pretrain.preflight. Experiments set values per stage under `stages.<name>`; `finalize` merges the chosen
stage's entry over the whole config. This module is the bottom of pretrain/: it imports none of the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.swinv2 import ATTN_IMPLS, CPB_COORDS, block_window, feature_map_sides, total_stride
from pretrain.activation_checkpointing import MODES as GRAD_CHECKPOINTING_MODES
from pretrain.compile import MODES as COMPILE_MODES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    name: str = MISSING
    img_size: int = 192
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 12
    pretrained_window_sizes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    extra_norm_period: int = 0
    sequential_attn: list[bool] = field(default_factory=lambda: [False, False, False, False])
    attn_chunk_size: int = 0
    attn_impl: str = "sdpa"
    cpb_coords: str = "log"  # log | linear (the paper's Table 1 ablation)
    grad_checkpointing: str = "none"  # none | torch | torch_reentrant | fairscale | fairscale_offload
    compile: str = "off"  # off | blocks (torch.compile each block) | full (the whole forward); pretrain.compile


@dataclass
class DemoDataConfig:
    """What `python -m data.demo` writes (data.demo.write_demo_shards arguments)."""
    out_dir: str = "demo_shards"
    num_classes: int = 10
    train_samples: int = 2000
    val_samples: int = 500
    samples_per_shard: int = 125
    image_size: list[int] = field(default_factory=lambda: [128, 96])
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    train_urls: str = MISSING  # brace pattern or list-like string understood by webdataset
    val_urls: str = ""
    num_classes: int = MISSING
    samples_per_epoch: int = MISSING  # train samples per epoch over all ranks
    val_samples: int = 0  # images in val_urls; an evaluation that reads another number warns; 0 = unknown
    label_key: str = "label"  # where .cls is missing, the label is this key of the sample's .json; "" = .cls only
    num_workers: int = 1
    shuffle_buffer: int = 1000
    resampled: bool = False
    decoder: str = "simplejpeg"  # simplejpeg | pillow
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    demo: Optional[DemoDataConfig] = None


@dataclass
class DeepSpeedConfig:
    name: str = "deepspeed"
    zero_stage: int = 3
    precision: str = "bf16"  # bf16 | fp32
    offload_optimizer: bool = False
    offload_param: bool = False
    # Expert keys deep-merged last into the generated DeepSpeed JSON (e.g. zero_optimization.reduce_bucket_size).
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class FSDPConfig:
    name: str = "fsdp"
    precision: str = "bf16"  # bf16 | fp32
    reshard_after_forward: bool = True


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "swinv2-pretrain"
    mode: str = "offline"  # WANDB_MODE in the environment wins
    entity: Optional[str] = None
    every: int = 10  # log every N optimizer steps
    image_every: int = 100  # SimMIM reconstruction panels every N optimizer steps; 0 = off


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2


@dataclass
class ResilienceConfig:
    """Defences against faults of long runs (docs/RELIABILITY.md)."""
    collective_timeout_s: int = 600  # a collective that waits longer (a hung or dead peer) fails the job
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    # Loss spikes (PaLM): a step whose mean loss over ranks exceeds spike_factor x the mean of the last
    # spike_window good steps rolls back to the last checkpoint; the data loader keeps going, so the batches
    # since that checkpoint are not seen again. 0 = off: it costs one host sync per step.
    spike_factor: float = 0.0
    spike_window: int = 100
    max_rollbacks: int = 3  # rollbacks in one run before it stops


@dataclass
class OptimConfig:
    # lr, min_lr and warmup_lr are given at reference_batch and scaled linearly to stage.global_batch.
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    reference_batch: int = 512
    warmup_steps: int = 0
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # 1.0 = off
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 5.0  # 0 = off


@dataclass
class StageConfig:
    name: str = MISSING
    epochs: float = 0.0  # exactly one of epochs / steps is > 0
    steps: int = 0
    global_batch: int = MISSING
    micro_batch: int = MISSING  # per rank; accumulation = global_batch / (micro_batch * world)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SimMIMStageConfig(StageConfig):
    name: str = "simmim"
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target: bool = True
    norm_target_patch: int = 47
    crop_scale: list[float] = field(default_factory=lambda: [0.67, 1.0])


@dataclass
class SupervisedStageConfig(StageConfig):
    name: str = "supervised"
    init_from: str = "auto"  # auto = simmim run dir of this experiment | none | a run dir
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm-style RandAugment spec; "" = off
    reprob: float = 0.25
    label_smoothing: float = 0.1
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    eval_crop_pct: float = 0.875
    eval_every: int = 0  # optimizer steps between evals; 0 = only at the end
    eval_batches: int = 0  # per rank; 0 = one pass over the val shards


@dataclass
class FinetuneStageConfig(SupervisedStageConfig):
    """Supervised training from a trained classifier, usually at a larger model.img_size / window_size."""
    name: str = "finetune"
    init_from: str = "auto"  # auto = supervised run dir of this experiment | a run dir | a weights file
    class_map: str = ""  # text file, line i = the source head row of new class i (e.g. 21841 -> 1000)
    ema_decay: float = 0.0  # EMA of the weights, evaluated beside them (eval_ema/*); 0 = off


@dataclass
class EvalStageConfig(StageConfig):
    """Top-1/top-5 of a checkpoint on data.val_urls; no training, so epochs, steps, global_batch and
    optim are unused (the engine is still built to shard the model)."""
    name: str = "eval"
    global_batch: int = 0
    init_from: str = ""  # required: a run dir or a weights file
    class_map: str = ""  # as for finetune
    ema: bool = False  # also evaluate the EMA a finetune run with stage.ema_decay > 0 saved
    eval_crop_pct: float = 0.875
    eval_batches: int = 0  # per rank; 0 = one pass over the val shards


@dataclass
class Config:
    seed: int = 0
    experiment_name: str = "demo"
    run_root: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: Any = MISSING  # typed by its group's schema (schema_deepspeed, ...)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    stage: Any = MISSING  # typed by its group's schema; chosen with +stage=NAME
    stages: dict[str, Any] = field(default_factory=dict)  # per-stage overlays, see conf/config.yaml


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="stage", name="schema_simmim", node=SimMIMStageConfig)
    cs.store(group="stage", name="schema_supervised", node=SupervisedStageConfig)
    cs.store(group="stage", name="schema_finetune", node=FinetuneStageConfig)
    cs.store(group="stage", name="schema_eval", node=EvalStageConfig)
    cs.store(group="engine", name="schema_deepspeed", node=DeepSpeedConfig)
    cs.store(group="engine", name="schema_fsdp", node=FSDPConfig)


def available_stages() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))


def finalize(cfg: DictConfig, world_size: int) -> Config:
    """Apply the chosen stage's overlay, check values and return the typed config."""
    if OmegaConf.is_missing(cfg, "stage"):
        raise ConfigError(f"no stage chosen: add +stage=NAME, one of {available_stages()}")
    name = cfg.stage.name
    if name in cfg.stages:
        overlay = OmegaConf.to_container(cfg.stages[name])
        if "stages" in overlay:
            raise ConfigError(f"stages.{name} must not contain 'stages'")
        try:
            cfg = OmegaConf.merge(cfg, overlay)
        except OmegaConfBaseException as err:
            raise ConfigError(f"stages.{name}: {err}") from None
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. a mandatory value (???) left unset
        raise ConfigError(f"{err.full_key}: {err.msg.splitlines()[0]}") from None
    validate(config, world_size)
    return config


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, allowed: set, key: str) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {sorted(allowed)}")


def _validate_schedule(cfg: Config, world_size: int) -> None:
    st = cfg.stage
    _check((st.epochs > 0) != (st.steps > 0), "stage.epochs/stage.steps", "set exactly one of them > 0")
    per_step = st.micro_batch * world_size
    _check(st.global_batch > 0 and st.global_batch % per_step == 0, "stage.global_batch",
           f"{st.global_batch} is not a multiple of micro_batch x world = {st.micro_batch} x {world_size}")
    _check(0 <= st.optim.warmup_steps <= total_steps(cfg), "stage.optim.warmup_steps",
           f"{st.optim.warmup_steps} must be in [0, total steps = {total_steps(cfg)}]")
    _check(0 < st.optim.layer_decay <= 1, "stage.optim.layer_decay", f"must be in (0, 1], got {st.optim.layer_decay}")
    _check(len(st.optim.betas) == 2, "stage.optim.betas", "needs two values")
    _check(cfg.data.samples_per_epoch >= per_step, "data.samples_per_epoch",
           f"{cfg.data.samples_per_epoch} is less than one micro batch on every rank ({st.micro_batch} x {world_size})")


def _validate_windows(m: ModelConfig) -> None:
    """The model's own rule (models.swinv2.block_window), checked before anything is built."""
    _check(m.window_size > 0, "model.window_size", f"must be > 0, got {m.window_size}")
    for i, side in enumerate(feature_map_sides(m.img_size, m.patch_size, len(m.depths))):
        _check(side % block_window(side, m.window_size) == 0, "model.window_size",
               f"{m.window_size} does not divide the {side}x{side} map of feature-map stage {i + 1} (img_size "
               f"{m.img_size} / patch_size {m.patch_size} / 2^{i}); a map no larger than the window is one window")


def evaluates(cfg: Config) -> bool:
    return isinstance(cfg.stage, (SupervisedStageConfig, EvalStageConfig)) and bool(cfg.data.val_urls)


def validate(cfg: Config, world_size: int) -> None:
    st, m = cfg.stage, cfg.model
    _check(st.micro_batch > 0, "stage.micro_batch", f"must be > 0, got {st.micro_batch}")
    if isinstance(st, EvalStageConfig):
        _check(st.init_from not in ("", "auto", "none"), "stage.init_from",
               f"+stage=eval needs the checkpoint to evaluate: a run dir or a weights file, got {st.init_from!r}")
    else:
        _validate_schedule(cfg, world_size)
    if isinstance(st, SupervisedStageConfig) and (st.mixup > 0 or st.cutmix > 0):
        _check(st.micro_batch % 2 == 0, "stage.micro_batch", f"{st.micro_batch} is odd, but Mixup/CutMix (timm, "
               "batch mode) mixes each rank's batch with itself reversed: it must be even")
    if isinstance(st, FinetuneStageConfig):
        _check(0 <= st.ema_decay < 1, "stage.ema_decay", f"must be in [0, 1), got {st.ema_decay}")
    _one_of(m.grad_checkpointing, set(GRAD_CHECKPOINTING_MODES), "model.grad_checkpointing")
    _one_of(m.attn_impl, set(ATTN_IMPLS), "model.attn_impl")
    _one_of(m.compile, set(COMPILE_MODES), "model.compile")
    if isinstance(cfg.engine, DeepSpeedConfig) and cfg.engine.zero_stage == 3:
        _check(m.compile != "full", "model.compile", "full would trace ZeRO-3's parameter gathers (module hooks "
               "inside the compiled forward); use blocks, which keeps them outside")
    _one_of(m.cpb_coords, set(CPB_COORDS), "model.cpb_coords")
    _check(m.img_size % total_stride(m.patch_size, len(m.depths)) == 0, "model.img_size",
           "must be divisible by patch_size x 2^(stages-1)")
    _validate_windows(m)
    _one_of(cfg.engine.precision, {"bf16", "fp32"}, "engine.precision")
    if isinstance(cfg.engine, DeepSpeedConfig):
        _one_of(cfg.engine.zero_stage, {1, 2, 3}, "engine.zero_stage")
    _one_of(cfg.logger.kind, {"wandb", "none"}, "logger.kind")
    _one_of(cfg.data.decoder, {"simplejpeg", "pillow"}, "data.decoder")
    _check(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    _check(cfg.checkpoint.keep_last > 0, "checkpoint.keep_last", "must be > 0")
    r = cfg.resilience
    _check(r.max_consecutive_skips > 0, "resilience.max_consecutive_skips", "must be > 0")
    _check(r.spike_factor == 0 or r.spike_factor > 1, "resilience.spike_factor",
           f"must be 0 (off) or > 1, got {r.spike_factor}")
    _check(r.spike_window > 0, "resilience.spike_window", "must be > 0")
    _check(r.max_rollbacks >= 0, "resilience.max_rollbacks", "must be >= 0")
    if isinstance(st, SimMIMStageConfig):
        _check(m.img_size % st.mask_patch_size == 0 and st.mask_patch_size % m.patch_size == 0,
               "stage.mask_patch_size", "must divide model.img_size and be a multiple of model.patch_size")
        _check(0 < st.mask_ratio < 1, "stage.mask_ratio", "must be in (0, 1)")
        _check(st.norm_target_patch % 2 == 1, "stage.norm_target_patch", "must be odd")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    return cfg.stage.global_batch // (cfg.stage.micro_batch * world_size)


def total_steps(cfg: Config) -> int:
    if cfg.stage.steps > 0:
        return cfg.stage.steps
    return math.ceil(cfg.stage.epochs * cfg.data.samples_per_epoch / cfg.stage.global_batch)
