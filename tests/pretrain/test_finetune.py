"""Real 2-rank fine-tunes at a larger window (DeepSpeed ZeRO-3 and FSDP2), the EMA of the weights, and
+stage=eval on its own, all from one tiny supervised run at 64px/window 4."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.checkpoint import read_client_states
from pretrain.ema import merge_shards
from pretrain.engine.deepspeed import DeepSpeedEngine
from pretrain.engine.fsdp import FSDPEngine
from tests.data.test_shards import foreign_shard
from tests.pretrain.test_training import launch, losses, metric_rows, shards  # noqa: F401 (shards is a fixture)

pytestmark = pytest.mark.dist
LARGER = ("model.img_size=96", "model.window_size=6", "engine.precision=fp32")  # maps 24/12/6/3: windows 6,6,6,3
LR_0 = ("stage.optim.lr=0", "stage.optim.min_lr=0", "stage.optim.warmup_lr=0", "stage.optim.warmup_steps=0")


@pytest.fixture(scope="module")
def root(shards, tmp_path_factory) -> Path:  # noqa: F811
    """run_root holding demo/supervised: 2 steps at 64px/w4 on 2 ranks (ZeRO-3, fp32)."""
    root = tmp_path_factory.mktemp("runs")
    launch(shards, root, "supervised", "stage.init_from=none", "stage.steps=2", "engine.precision=fp32",
           "stage.eval_batches=1")
    return root


def test_finetune_at_a_larger_window_loads_every_weight_and_remaps_the_head(shards, root, tmp_path):  # noqa: F811
    class_map = tmp_path / "map.txt"
    rows = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]
    class_map.write_text("\n".join(map(str, rows)) + "\n")
    # lr 0: after its one step the fine-tune holds exactly the weights it started from
    out = launch(shards, root, "finetune", *LARGER, *LR_0, "stage.steps=1", f"stage.class_map={class_map}",
                 "stage.eval_batches=1")
    assert "model.pretrained_window_sizes [4, 4, 4, 2]: the windows the position bias of" in out
    run = root / "demo" / "finetune"
    assert OmegaConf.load(run / "config.yaml").model.pretrained_window_sizes == [4, 4, 4, 2]

    source = DeepSpeedEngine.read_weights(root / "demo" / "supervised" / "checkpoints", "step_00000002")
    tuned = DeepSpeedEngine.read_weights(run / "checkpoints", "step_00000001")
    assert tuned.keys() == source.keys() and any(".cpb_mlp." in k for k in source)
    for name, value in source.items():
        expected = value[rows] if name.startswith("head.") else value
        assert torch.equal(tuned[name], expected), name

    evals = [r for r in metric_rows(run).values() if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/images"] == 4 and 0 <= evals[0]["eval/top1"] <= 100


EMA_RUN = (*LARGER, "engine=fsdp", "stage.steps=3", "stage.optim.warmup_steps=1", "stage.ema_decay=0.5",
           "stage.eval_every=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3")


@pytest.fixture(scope="module")
def ema_run(shards, root, tmp_path_factory) -> tuple[Path, list]:  # noqa: F811
    """A 3-step FSDP2 fine-tune with an EMA (decay 0.5), evaluated on all 48 val images after every step."""
    runs = tmp_path_factory.mktemp("ema")
    args = (*EMA_RUN, f"stage.init_from={root / 'demo' / 'supervised'}")
    launch(shards, runs, "finetune", *args)
    return runs, args


def ema_of(run: Path, step: int) -> list[dict[str, torch.Tensor]]:
    return [c["ema"]["shards"] for c in read_client_states(run / "checkpoints" / f"step_{step:08d}")]


def test_the_ema_is_evaluated_beside_the_weights_and_resumes_exactly(shards, ema_run, tmp_path):  # noqa: F811
    runs, args = ema_run
    a = runs / "demo" / "finetune"
    rows = metric_rows(a)
    for step in (1, 2, 3):
        assert rows[step]["eval/images"] == rows[step]["eval_ema/images"] == 48
    assert rows[3]["eval_ema/loss"] != rows[3]["eval/loss"]  # the EMA lags the weights

    live = FSDPEngine.read_weights(a / "checkpoints", "step_00000003")
    ema = merge_shards(ema_of(a, 3), {k: v.shape for k, v in live.items()})
    assert any(not torch.equal(ema[k], live[k]) for k in live)

    # The same run stopped after its step-2 checkpoint and relaunched: the EMA carries on exactly.
    b = tmp_path / "demo" / "finetune"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000003")
    (b / "checkpoints" / "latest").write_text("step_00000002")
    (b / "metrics.jsonl").unlink()
    out = launch(shards, tmp_path, "finetune", *args)
    assert "at step 2" in out and "EMA of the weights restarts" not in out
    assert losses(b)[3] == losses(a)[3]
    for rank_a, rank_b in zip(ema_of(a, 3), ema_of(b, 3), strict=True):
        for name in rank_a:
            assert torch.equal(rank_a[name], rank_b[name]), name


def test_a_world_size_change_restarts_the_ema(shards, ema_run, tmp_path):  # noqa: F811
    runs, args = ema_run
    b = tmp_path / "demo" / "finetune"
    shutil.copytree(runs / "demo" / "finetune", b)
    shutil.rmtree(b / "checkpoints" / "step_00000003")
    (b / "checkpoints" / "latest").write_text("step_00000002")
    out = launch(shards, tmp_path, "finetune", *args, "stage.eval_every=0", torchrun=False)
    assert "EMA of the weights restarts from the current weights: the checkpoint has one of 2 ranks, not 1" in out
    assert len(ema_of(b, 3)) == 1


def test_eval_alone_reproduces_the_finetunes_last_evaluation_with_its_ema(shards, ema_run):  # noqa: F811
    runs, _ = ema_run
    tuned = runs / "demo" / "finetune"
    # another engine (ZeRO-3) and world size (1) than the FSDP2 fine-tune on 2 ranks
    out = launch(shards, runs, "eval", *LARGER, f"stage.init_from={tuned}", "stage.ema=true", torchrun=False)
    assert "model.pretrained_window_sizes [4, 4, 4, 2]" in out  # the fine-tune's own, from its config.yaml
    last = metric_rows(tuned)[3]
    rows = [json.loads(line) for line in (runs / "demo" / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 3
    for key in ("eval/top1", "eval/top5", "eval/images", "eval_ema/top1", "eval_ema/top5", "eval_ema/images"):
        assert rows[0][key] == last[key], key
    for key in ("eval/loss", "eval_ema/loss"):
        assert rows[0][key] == pytest.approx(last[key], rel=1e-5), key
    assert f"eval: top1 {last['eval/top1']:.2f} top5 {last['eval/top5']:.2f}" in out
    assert "eval_ema: top1" in out and "images 48" in out


def test_eval_counts_every_val_image_once_on_any_world_size(root, tmp_path):
    """27 val images (.jpeg + .json labels, no .cls, written with tarfile) in shards of uneven sizes: on 2 ranks
    x 2 workers with batch 4 the ranks' shares and last batches differ, yet each image counts once."""
    sizes, start = [7, 5, 11, 1, 3], 0
    for s, n in enumerate(sizes):
        foreign_shard(tmp_path / f"val-{s}.tar", [(start + i) % 10 for i in range(n)])
        start += n
    (tmp_path / "val.txt").write_text("".join(f"val-{s}.tar\n" for s in range(len(sizes))))
    args = (f"stage.init_from={root / 'demo' / 'supervised'}", f"data.val_urls={tmp_path / 'val.txt'}",
            "data.val_samples=27", "stage.micro_batch=4", "engine.precision=fp32")
    rows = {}
    for name, workers, torchrun in (("two_ranks", 2, True), ("one_rank", 0, False)):
        out = launch(tmp_path, tmp_path / name, "eval", *args, f"data.num_workers={workers}", torchrun=torchrun)
        assert "images 27" in out and "evaluated" not in out  # no warning that the count differs
        rows[name] = json.loads((tmp_path / name / "demo" / "eval" / "metrics.jsonl").read_text())
    assert rows["two_ranks"]["eval/images"] == rows["one_rank"]["eval/images"] == 27
    for key in ("eval/top1", "eval/top5"):
        assert rows["two_ranks"][key] == rows["one_rank"][key], key
    assert rows["two_ranks"]["eval/loss"] == pytest.approx(rows["one_rank"]["eval/loss"], rel=1e-5)
