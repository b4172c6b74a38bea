"""Fine-tune and eval stages in one process: configs, the source's windows, class maps, EMA shard merging."""
import math

import pytest
import torch
from safetensors.torch import save_file

from models.swinv2 import WindowAttention, relative_coords_table
from pretrain import rundir, start_weights
from pretrain.config import ConfigError, EvalStageConfig, FinetuneStageConfig, finalize
from pretrain.process_group import DistContext
from pretrain.ema import merge_shards
from pretrain.preflight import resolve_start
from pretrain.stages import build_stage
from tests.pretrain.test_config import compose_cfg

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = ("model.img_size=64", "model.window_size=4")  # the source's size: maps 16, 8, 4, 2


def config(stage: str, tmp_path, *overrides: str):
    return finalize(compose_cfg(f"+stage={stage}", f"run_root={tmp_path}", "model.img_size=96", "model.window_size=6",
                                *overrides), world_size=1)


def fake_run(tmp_path, *overrides: str):
    """A supervised run dir as the trainer leaves it, as far as the fine-tune stage reads it before loading:
    config.yaml and a `latest` marker (the weights themselves are read only when the engine loads them)."""
    cfg = finalize(compose_cfg("+stage=supervised", f"run_root={tmp_path}", *overrides), world_size=1)
    run = rundir.run_dir(cfg)
    rundir.save_config(cfg, run)
    rundir.checkpoint_dir(run).mkdir()
    (rundir.checkpoint_dir(run) / rundir.LATEST).write_text("step_00000002")
    return run


@pytest.mark.parametrize("stage, schema", [("finetune", FinetuneStageConfig), ("eval", EvalStageConfig)])
def test_the_stages_compose(stage, schema, tmp_path):
    cfg = config(stage, tmp_path, "stage.init_from=somewhere")
    assert isinstance(cfg.stage, schema) and cfg.stage.name == stage


@pytest.mark.parametrize("stage, override, key", [
    ("eval", "stage.micro_batch=0", "stage.micro_batch"),
    ("eval", "stage.init_from=auto", "stage.init_from"),
    ("finetune", "stage.ema_decay=1.0", "stage.ema_decay"),
])
def test_bad_values_are_named(stage, override, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        config(stage, tmp_path, override)


def test_eval_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="stage.init_from.*needs the checkpoint"):
        config("eval", tmp_path)


def model_config(*overrides: str):
    return finalize(compose_cfg("+stage=supervised", *overrides), world_size=1).model


def test_trained_windows_are_clamped_to_the_feature_maps_like_the_official_configs():
    # PRETRAINED_WINDOW_SIZES [12, 12, 12, 6] of the official 12to16 / 12to24 fine-tuning configs
    assert start_weights.trained_windows(model_config("model.img_size=192", "model.window_size=12")) == [12, 12, 12, 6]
    # a fine-tune of a fine-tune keeps the first scale
    assert start_weights.trained_windows(model_config("model.img_size=256", "model.window_size=16",
                                                 "model.pretrained_window_sizes=[12,12,12,6]")) == [12, 12, 12, 6]


def test_finetune_takes_the_source_runs_windows_and_rebuilds_the_position_tables(tmp_path):
    fake_run(tmp_path, *SMALL)
    cfg = config("finetune", tmp_path)
    start = resolve_start(cfg)
    stage = build_stage(start, CTX)
    assert str(stage.model.source) == str(tmp_path / "demo" / "supervised" / "checkpoints" / "step_00000002")
    assert start.cfg.model.pretrained_window_sizes == [4, 4, 4, 2]  # 64px/w4: 16, 8, 4, 2 maps, the last clamped
    assert cfg.model.pretrained_window_sizes == [0, 0, 0, 0]  # the composed config is never edited
    model = stage.model.build_model()
    attns = [m for m in model.modules() if isinstance(m, WindowAttention)]
    windows = sorted({(a.window_size, a.pretrained_window_size) for a in attns})
    assert windows == [(3, 2), (6, 4)]  # 96px/w6: maps 24, 12, 6, 3; the last stage clamps to 3
    for a in attns:
        w = a.window_size
        assert a.relative_coords_table.shape == (2 * w - 1, 2 * w - 1, 2)
        assert a.relative_position_index.shape == (w * w, w * w)
        assert torch.equal(a.relative_coords_table, relative_coords_table(w, a.pretrained_window_size))
    # offsets inside the old 4x4 window get the CPB inputs they had at 64px/w4
    old = relative_coords_table(4, 0)
    new = attns[0].relative_coords_table
    assert torch.equal(new[2:-2, 2:-2], old)


def test_the_position_bias_coordinates_must_be_the_sources(tmp_path):
    fake_run(tmp_path, *SMALL, "model.cpb_coords=linear")
    with pytest.raises(ConfigError, match="model.cpb_coords=log: .* was trained with linear coordinates"):
        resolve_start(config("finetune", tmp_path))
    resolve_start(config("finetune", tmp_path, "model.cpb_coords=linear"))


def test_explicit_windows_win_and_a_weights_file_needs_them(tmp_path):
    weights = tmp_path / "export.pth"
    torch.save({"model": {}}, weights)
    with pytest.raises(ConfigError, match=r"model.pretrained_window_sizes: set it"):
        resolve_start(config("finetune", tmp_path, f"stage.init_from={weights}"))
    cfg = config("eval", tmp_path, f"stage.init_from={weights}", "model.pretrained_window_sizes=[12,12,12,6]")
    assert resolve_start(cfg).cfg.model.pretrained_window_sizes == [12, 12, 12, 6]


def test_a_missing_source_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"run \+stage=supervised first"):
        resolve_start(config("finetune", tmp_path))
    with pytest.raises(ConfigError, match="stage.init_from=/nowhere"):
        resolve_start(config("eval", tmp_path, "stage.init_from=/nowhere"))


def test_a_safetensors_weights_file_is_read_without_torch_load(tmp_path):
    weights = {"patch_embed.proj.weight": torch.randn(8, 3, 4, 4)}
    save_file(weights, tmp_path / "weights.safetensors")
    read = start_weights.read_weights(start_weights.resolve_source(str(tmp_path / "weights.safetensors"), ""))
    assert read.keys() == weights.keys()
    assert torch.equal(read["patch_embed.proj.weight"], weights["patch_embed.proj.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"hello")
    with pytest.raises(ValueError, match="stage.init_from=.*bad.safetensors: not a safetensors file"):
        start_weights.read_weights(start_weights.resolve_source(str(tmp_path / "bad.safetensors"), ""))


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04 truncated zip"])
def test_a_weights_file_that_is_not_a_torch_checkpoint_is_named(content, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"stage.init_from={path}: not a"):
        start_weights.read_weights(start_weights.resolve_source(str(path), ""))


def test_class_map_selects_head_rows(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("7\n2\n9\n")
    rows = start_weights.read_class_map(str(path), num_classes=3)
    state = {"head.weight": torch.arange(20.0).view(10, 2), "head.bias": torch.arange(10.0), "norm.bias": torch.ones(2)}
    out = start_weights.select_head_rows(state, rows, str(path))
    assert torch.equal(out["head.weight"], state["head.weight"][[7, 2, 9]])
    assert torch.equal(out["head.bias"], torch.tensor([7.0, 2.0, 9.0]))
    assert out["norm.bias"] is state["norm.bias"]


@pytest.mark.parametrize("text, num_classes, match", [
    ("1\n2\n", 3, "2 lines, but data.num_classes is 3"),
    ("1\nx\n3\n", 3, "line 2 is not a row index"),
])
def test_a_bad_class_map_file_is_named(tmp_path, text, num_classes, match):
    path = tmp_path / "map.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"stage.class_map=.*{match}"):
        start_weights.read_class_map(str(path), num_classes)


def test_class_map_rows_must_exist_in_the_source_head(tmp_path):
    with pytest.raises(ConfigError, match="line 2 names row 10, but the source head has 10 classes"):
        start_weights.select_head_rows({"head.weight": torch.zeros(10, 2)}, [3, 10], "map.txt")
    with pytest.raises(ConfigError, match="no classification head"):
        start_weights.select_head_rows({"encoder.norm.weight": torch.zeros(2)}, [0], "map.txt")


def test_the_finetune_stage_checks_the_class_map_length(tmp_path):
    fake_run(tmp_path, *SMALL)
    path = tmp_path / "map.txt"
    path.write_text("\n".join(map(str, range(9))))
    with pytest.raises(ConfigError, match="9 lines, but data.num_classes is 10"):
        build_stage(resolve_start(config("finetune", tmp_path, f"stage.class_map={path}")), CTX)


@pytest.mark.parametrize("layout", ["zero3", "fsdp2", "replicated"])
def test_merge_shards_joins_every_engines_layout(layout):
    full = {"w": torch.randn(5, 3), "b": torch.randn(3), "s": torch.randn(1)}
    world = 2
    if layout == "zero3":  # flat, equal partitions, the last padded
        parts = []
        for r in range(world):
            shard = {}
            for k, v in full.items():
                size = math.ceil(v.numel() / world)
                shard[k] = torch.cat([v.flatten(), torch.zeros(size * world - v.numel())])[r * size:(r + 1) * size]
            parts.append(shard)
    elif layout == "fsdp2":  # dim-0 chunks, possibly empty
        parts = [{k: (list(v.chunk(world)) + [v[:0]] * world)[r] for k, v in full.items()} for r in range(world)]
    else:
        parts = [dict(full) for _ in range(world)]
    merged = merge_shards(parts, {k: v.shape for k, v in full.items()})
    for k, v in full.items():
        assert torch.equal(merged[k], v), k


def test_the_official_22k_to_1k_map_ships_with_the_package():
    rows = start_weights.read_class_map("imagenet22k_to_1k", num_classes=1000)
    # first and last lines of the official data/map22kto1k.txt; 1000 distinct rows of the 21841-class head
    assert rows[:3] == [359, 368, 460] and rows[-1] == 21817
    assert len(set(rows)) == 1000 and max(rows) < 21841
    with pytest.raises(ConfigError, match="no such file .*imagenet22k_to_1k"):
        start_weights.read_class_map("imagenet22k_to_1kk", num_classes=1000)
