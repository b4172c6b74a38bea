"""The config tree: defaults compose for each stage; wrong keys, types and values fail early, naming the key."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from pretrain.config import (CONF_DIR, ConfigError, DeepSpeedConfig, SimMIMStageConfig, SupervisedStageConfig,
                             finalize, grad_accum_steps, register_configs)

REPO = Path(__file__).resolve().parents[2]


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("stage, schema", [("simmim", SimMIMStageConfig), ("supervised", SupervisedStageConfig)])
def test_default_stage_composes_to_typed_config(stage, schema):
    cfg = finalize(compose_cfg(f"+stage={stage}"), world_size=2)
    assert isinstance(cfg.stage, schema) and cfg.stage.name == stage
    assert isinstance(cfg.engine, DeepSpeedConfig)
    assert (cfg.engine.zero_stage, cfg.engine.precision) == (3, "bf16")
    assert cfg.model.name == "swinv2_nano" and cfg.data.name == "demo"
    assert grad_accum_steps(cfg, 2) * cfg.stage.micro_batch * 2 == cfg.stage.global_batch


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="stage.foo") as err:
        compose_cfg("+stage=simmim", "stage.foo=1")
    assert "SimMIMStageConfig" in str(err.value.__cause__)


def test_wrong_type_is_named():
    with pytest.raises(ConfigCompositionException, match="stage.steps=abc") as err:
        compose_cfg("+stage=simmim", "stage.steps=abc")
    assert "could not be converted to Integer" in str(err.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("engine.zero_stage=4", "engine.zero_stage"),
    ("engine.precision=fp16", "engine.precision"),
    ("stage.global_batch=33", "stage.global_batch"),
    ("stage.optim.warmup_steps=100000", "stage.optim.warmup_steps"),
    ("model.grad_checkpointing=always", "model.grad_checkpointing"),
    ("model.cpb_coords=loglinear", "model.cpb_coords"),
    ("model.compile=max-autotune", "model.compile"),
    ("model.compile=full", "model.compile: full would trace ZeRO-3's parameter gathers"),  # default ZeRO-3
    ("stage.steps=0", "stage.epochs/stage.steps"),
    ("resilience.max_consecutive_skips=0", "resilience.max_consecutive_skips"),
    ("resilience.spike_factor=0.5", "resilience.spike_factor"),
    ("resilience.spike_window=0", "resilience.spike_window"),
    ("model.window_size=5", "model.window_size"),
    ("data.samples_per_epoch=16", "data.samples_per_epoch"),  # one micro batch on 2 ranks is 32
    ("data.train_urls=???", "data.train_urls"),
])
def test_bad_value_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        finalize(compose_cfg("+stage=simmim", override), world_size=2)


def test_compile_defaults_to_blocks_except_on_nano_and_off_parses_as_a_word():
    assert finalize(compose_cfg("+stage=simmim"), world_size=2).model.compile == "off"  # nano, the default model
    assert finalize(compose_cfg("+stage=simmim", "model=swinv2_tiny"), world_size=1).model.compile == "blocks"
    assert finalize(compose_cfg("+stage=simmim", "model=swinv2_tiny", "model.compile=off"),
                    world_size=1).model.compile == "off"
    assert finalize(compose_cfg("+stage=simmim", "engine=fsdp", "model.compile=full"),
                    world_size=2).model.compile == "full"


def test_window_must_divide_each_feature_map_larger_than_it():
    # 192px / patch 4: maps 48, 24, 12, 6. Window 24 divides 48; 24 and below are one window each.
    assert finalize(compose_cfg("+stage=simmim", "model.window_size=24"), world_size=2).model.window_size == 24
    with pytest.raises(ConfigError, match="model.window_size: 16 does not divide the 24x24 map of feature-map stage 2"):
        finalize(compose_cfg("+stage=simmim", "model.window_size=16"), world_size=2)


def test_global_batch_must_split_over_the_world():
    cfg = compose_cfg("+stage=simmim", "stage.global_batch=48", "stage.micro_batch=16")
    assert finalize(cfg, world_size=1).stage.global_batch == 48
    with pytest.raises(ConfigError, match="micro_batch x world = 16 x 2"):
        finalize(cfg, world_size=2)


STAGES = "++stages={simmim:{model:{drop_path_rate:0.0}},supervised:{model:{drop_path_rate:0.3},stage:{optim:{layer_decay:0.87}}}}"


def test_per_stage_values_apply_to_the_chosen_stage_only():
    sim = finalize(compose_cfg("+stage=simmim", STAGES), world_size=2)
    sup = finalize(compose_cfg("+stage=supervised", STAGES), world_size=2)
    assert (sim.model.drop_path_rate, sim.stage.optim.layer_decay) == (0.0, 1.0)
    assert (sup.model.drop_path_rate, sup.stage.optim.layer_decay) == (0.3, 0.87)


def test_per_stage_unknown_key_is_named():
    with pytest.raises(ConfigError, match="stages.simmim"):
        finalize(compose_cfg("+stage=simmim", "++stages={simmim:{stage:{mask_ratoi:0.5}}}"), world_size=2)


def test_launcher_without_stage_lists_the_stages(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), f"run_root={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "+stage=NAME" in proc.stderr and "simmim" in proc.stderr and "supervised" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no run dir


def test_deepspeed_json_is_generated_from_the_engine_config_with_expert_keys_last():
    from pretrain.engine.deepspeed import deepspeed_json

    engine = DeepSpeedConfig(zero_stage=2, precision="fp32", offload_optimizer=True,
                             config={"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 7})
    ds = deepspeed_json(engine, micro_batch=4, accum=3, world_size=2, clip_grad=100.0)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["gradient_clipping"] == 100.0 and ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                       "reduce_bucket_size": 1000}
    assert ds["steps_per_print"] == 7


def test_mixup_needs_an_even_micro_batch():
    with pytest.raises(ConfigError, match="stage.micro_batch: 3 is odd, but Mixup/CutMix"):
        finalize(compose_cfg("+stage=supervised", "stage.mixup=0.8", "stage.micro_batch=3", "stage.global_batch=6"),
                 world_size=2)
    finalize(compose_cfg("+stage=supervised", "stage.micro_batch=3", "stage.global_batch=6"), world_size=2)  # no mixing
