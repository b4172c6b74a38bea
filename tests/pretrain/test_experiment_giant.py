"""conf/experiment/swinv2_giant_in22k_ext.yaml composes, per stage, to the paper's SwinV2-G recipe."""

import pytest
from hydra import compose, initialize_config_dir

from pretrain import config
from pretrain.schedule import WarmupCosine, scale_lr

config.register_configs()
EXPERIMENT = "+experiment=swinv2_giant_in22k_ext"


def compose_stage(stage: str, world_size: int = 128, overrides: tuple[str, ...] = ()) -> config.Config:
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=[EXPERIMENT, f"+stage={stage}", *overrides])
    return config.finalize(raw, world_size)


@pytest.mark.parametrize("stage", ["simmim", "supervised"])
def test_both_stages_share_model_data_batch_and_optimiser(stage):
    cfg = compose_stage(stage)
    assert cfg.experiment_name == "swinv2_giant_in22k_ext"
    assert (cfg.model.name, cfg.model.img_size, cfg.model.embed_dim, cfg.model.depths) == \
        ("swinv2_giant", 192, 512, [2, 2, 42, 2])
    assert (cfg.data.name, cfg.data.num_classes, cfg.data.samples_per_epoch) == \
        ("imagenet22k_ext", 21841, 70_000_000)
    o = cfg.stage.optim
    assert cfg.stage.global_batch == 9216
    assert (o.lr, o.reference_batch, o.weight_decay, o.clip_grad) == (1.4e-3, 9216, 0.1, 100.0)
    assert scale_lr(o.lr, cfg.stage.global_batch, o.reference_batch) == pytest.approx(1.4e-3)
    assert config.grad_accum_steps(cfg, 128) == 9  # 8 images x 128 GPUs x 9


def test_simmim_stage():
    cfg = compose_stage("simmim")
    st = cfg.stage
    assert isinstance(st, config.SimMIMStageConfig)
    assert (st.epochs, st.optim.warmup_steps, st.optim.layer_decay) == (20, 30_000, 1.0)
    assert (st.mask_patch_size, st.mask_ratio, st.crop_scale) == (32, 0.6, [0.67, 1.0])
    assert config.total_steps(cfg) == 151_910  # ceil(20 x 70M / 9216)


def test_supervised_stage():
    cfg = compose_stage("supervised")
    st = cfg.stage
    assert isinstance(st, config.SupervisedStageConfig)
    assert (st.epochs, st.optim.warmup_steps, st.optim.layer_decay) == (30, 20_000, 0.87)
    assert cfg.model.drop_path_rate == 0.3
    assert st.init_from == "auto"
    assert st.rand_augment == "rand-m9-mstd0.5-inc1" and st.reprob == 0.25  # RandAugment, random erasing
    assert config.total_steps(cfg) == 227_865  # ceil(30 x 70M / 9216)
    schedule = WarmupCosine(st.optim.lr, st.optim.warmup_steps, config.total_steps(cfg), st.optim.min_lr,
                            st.optim.warmup_lr)
    assert schedule(20_000) == pytest.approx(1.4e-3) and schedule(227_865) == pytest.approx(1.4e-5)


def test_stage_values_do_not_leak_into_the_other_stage():
    assert compose_stage("simmim").model.drop_path_rate != 0.3
    assert compose_stage("simmim").stage.optim.layer_decay == 1.0


def test_another_cluster_overrides_the_micro_batch_and_a_misfit_is_named():
    cfg = compose_stage("supervised", world_size=96,
                        overrides=("stages.supervised.stage.micro_batch=12",))
    assert config.grad_accum_steps(cfg, 96) == 8
    with pytest.raises(config.ConfigError, match="stage.global_batch"):
        compose_stage("supervised", world_size=100)
