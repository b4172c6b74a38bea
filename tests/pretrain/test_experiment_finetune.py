"""The fine-tuning recipes compose to the paper's values and build, on the meta device, at their windows."""
import pytest
import torch

from pretrain import config
from pretrain.preflight import resolve_start
from pretrain.schedule import scale_lr
from pretrain.stages import Stage, build_stage
from tests.pretrain.test_config import compose_cfg
from tests.pretrain.test_transfer import CTX, fake_run

GIANT = "+experiment=swinv2_giant_in1k_ft"
BASE_LARGE = "+experiment=swinv2_in22k_to_in1k"


def compose(experiment: str, stage: str, world_size: int, *overrides: str) -> config.Config:
    return config.finalize(compose_cfg(experiment, f"+stage={stage}", *overrides), world_size)


def block_windows(model) -> list[tuple[int, int, int]]:
    """(window, shift, pretrained window) of each stage's last block (an odd one: shifted where the map allows)."""
    out = []
    for layer in model.layers:
        blk = layer.blocks[-1]
        out.append((blk.window_size, blk.shift_size, blk.attn.pretrained_window_size))
    return out


def meta_model(stage: Stage):
    with torch.device("meta"):
        return stage.model.build_model()


def test_giant_in1k_recipe_is_the_papers():
    cfg = compose(GIANT, "finetune", 64)
    m, st, o = cfg.model, cfg.stage, cfg.stage.optim
    assert cfg.experiment_name == "swinv2_giant_in22k_ext"  # init_from auto = the pretraining's supervised run
    assert (m.name, m.img_size, m.window_size, m.drop_path_rate) == ("swinv2_giant", 640, 40, 0.5)
    assert (cfg.data.name, cfg.data.num_classes) == ("imagenet1k", 1000)
    assert isinstance(st, config.FinetuneStageConfig) and st.init_from == "auto"
    assert (st.epochs, st.global_batch, o.lr, o.reference_batch, o.weight_decay, o.clip_grad) == \
        (10, 576, 2.1e-5, 576, 0.1, 100.0)
    assert scale_lr(o.lr, st.global_batch, o.reference_batch) == pytest.approx(2.1e-5)
    assert o.warmup_steps == int(2 * cfg.data.samples_per_epoch / st.global_batch)  # 2-epoch warmup
    assert config.total_steps(cfg) == 22_243  # ceil(10 x 1,281,167 / 576)
    assert st.rand_augment == "rand-m9-mstd0.5-inc1" and st.reprob == 0.25 and st.mixup == st.cutmix == 0
    assert m.grad_checkpointing == "torch_reentrant" and m.sequential_attn == [True, False, False, False]
    assert config.grad_accum_steps(cfg, 64) == 1  # 9 images x 64 GPUs
    assert compose(GIANT, "eval", 64, "stage.init_from=/ckpt").stage.eval_crop_pct == st.eval_crop_pct


def test_giant_finetune_takes_its_windows_from_the_supervised_run(tmp_path):
    fake_run(tmp_path, "+experiment=swinv2_giant_in22k_ext")  # 192px, window 12
    cfg = compose(GIANT, "finetune", 64, f"run_root={tmp_path}")
    start = resolve_start(cfg)
    stage = build_stage(start, CTX)
    assert start.cfg.model.pretrained_window_sizes == [12, 12, 12, 6]  # the official configs' value for 192/w12
    model = meta_model(stage)
    # 640px: maps 160, 80, 40, 20; stage 3's map is one window (no shift), stage 4 is clamped to its map
    assert block_windows(model) == [(40, 20, 12), (40, 20, 12), (40, 0, 12), (20, 0, 6)]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.6e9, rel=0.01)


@pytest.mark.parametrize("overrides, windows", [
    ((), [(16, 8, 12), (16, 8, 12), (16, 0, 12), (8, 0, 6)]),  # B 256: maps 64, 32, 16, 8
    (("model=swinv2_large", "model.img_size=384", "model.window_size=24", "stage.eval_crop_pct=1.0"),
     [(24, 12, 12), (24, 12, 12), (24, 0, 12), (12, 0, 6)]),  # L 384: maps 96, 48, 24, 12
])
def test_base_large_22k_to_1k_recipe_is_the_official_one(overrides, windows, tmp_path):
    weights = tmp_path / "swinv2_base_patch4_window12_192_22k.pth"
    weights.touch()  # the stage only checks the file is there before the engine loads it
    cfg = compose(BASE_LARGE, "finetune", 16, f"stage.init_from={weights}", *overrides)
    st, o = cfg.stage, cfg.stage.optim
    assert cfg.model.pretrained_window_sizes == [12, 12, 12, 6] and cfg.model.drop_path_rate == 0.2
    assert (st.epochs, st.global_batch, scale_lr(o.lr, st.global_batch, o.reference_batch)) == \
        (30, 1024, pytest.approx(4e-5))  # paper: lr 4e-5 at batch 1024
    assert (o.weight_decay, o.warmup_lr, o.min_lr, o.layer_decay) == (1e-8, 2e-8, 2e-7, 1.0)
    assert (st.mixup, st.cutmix, st.label_smoothing, st.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert st.eval_crop_pct == (1.0 if overrides else 0.875)
    assert block_windows(meta_model(build_stage(resolve_start(cfg), CTX))) == windows
