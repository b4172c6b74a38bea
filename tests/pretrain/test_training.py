"""Real 2-rank gloo runs of launch/pretrain.py under DeepSpeed ZeRO-3: resume and the two-stage chain."""
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.demo import write_demo_shards
from models import encoder_state_dict
from pretrain.engine import engine_class
from pretrain.engine.deepspeed import DeepSpeedEngine
from tests.torchrun import REPO, TORCHRUN, job_env, run, start
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(out), num_classes=10, train_samples=96, val_samples=48, samples_per_shard=24,
                      image_size=(80, 64), seed=0)
    return out


def command(shards: Path, run_root: Path, stage: str, *overrides: str, torchrun: bool = True,
            script: Path = REPO / "launch" / "pretrain.py") -> tuple[list, dict]:
    """A tiny model on 2 ranks under torchrun, or as one plain process: (command line, environment).
    `script`: launch/pretrain.py or a job that runs it with something added (e.g. injected faults)."""
    runner = [TORCHRUN, "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    cmd = [*runner, str(script), f"+stage={stage}", f"run_root={run_root}", "logger=none",
           "logger.every=1", f"data.train_urls={shards}/train.txt", f"data.val_urls={shards}/val.txt",
           "data.samples_per_epoch=96", "data.val_samples=48", "data.num_workers=1", "data.shuffle_buffer=16",
           "model.img_size=64", "model.window_size=4", "stage.global_batch=8", "stage.micro_batch=2",
           "stage.optim.warmup_steps=1", *overrides]
    return cmd, job_env()


def launch(shards: Path, run_root: Path, stage: str, *overrides: str, torchrun: bool = True) -> str:
    """Run `command(...)` to the end; returns the output."""
    cmd, env = command(shards, run_root, stage, *overrides, torchrun=torchrun)
    returncode, output = run(cmd, env)
    assert returncode == 0, output[-8000:]
    return output


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_continues_exactly_as_an_uninterrupted_run(shards, tmp_path):
    # One uninterrupted run: 6 steps (accumulation 2), checkpoints at 2, 4, 6, the last two kept.
    args = ("stage.steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "stage.mask_patch_size=16",
            "model.grad_checkpointing=torch")
    out = launch(shards, tmp_path / "a", "simmim", *args)
    assert "ZeRO-3 bf16, micro batch 2 x accumulation 2 x world 2 = global batch 8" in out
    assert "grad checkpointing torch_reentrant" in out  # ZeRO-3 needs the reentrant variant
    a = tmp_path / "a" / "demo" / "simmim"
    ckpts = a / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert (a / "config.yaml").exists()

    # The same run stopped right after its step-4 checkpoint, then relaunched with the same command.
    b = tmp_path / "b" / "demo" / "simmim"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_00000006")
    (b / "checkpoints" / "latest").write_text("step_00000004")
    (b / "metrics.jsonl").unlink()
    out = launch(shards, tmp_path / "b", "simmim", *args)
    assert "resumed from" in out and "step_00000004 at step 4" in out

    full, resumed = losses(a), losses(b)
    assert sorted(full) == list(range(1, 7)) and sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, resumed[step], full[step])
    assert full[6] != full[5]  # the comparison is not between constants


def test_supervised_starts_from_the_simmim_encoder(shards, tmp_path):
    common = ("engine.precision=fp32", "stage.mask_patch_size=16")
    out = launch(shards, tmp_path, "simmim", "stage.steps=2", *common, torchrun=False)  # one plain process
    assert "micro batch 2 x accumulation 4 x world 1" in out
    # lr 0: the supervised weights after its one step are exactly the ones it started from
    out = launch(shards, tmp_path, "supervised", "stage.steps=1", "stage.optim.warmup_steps=0", common[0],
                 "stage.optim.lr=0", "stage.optim.min_lr=0", "stage.optim.warmup_lr=0", "stage.eval_batches=1")
    simmim_ckpts = tmp_path / "demo" / "simmim" / "checkpoints"
    assert f"init_from {simmim_ckpts / 'step_00000002'}" in out
    assert "dropped ['decoder', 'encoder.mask_token']" in out and "['head.weight', 'head.bias']" in out

    encoder = encoder_state_dict(DeepSpeedEngine.read_weights(simmim_ckpts, "step_00000002"))
    supervised = DeepSpeedEngine.read_weights(tmp_path / "demo" / "supervised" / "checkpoints", "step_00000001")
    assert set(supervised) - set(encoder) == {"head.weight", "head.bias"}
    for name, value in encoder.items():
        assert torch.equal(supervised[name], value), name

    rows = [json.loads(line) for line in (tmp_path / "demo" / "supervised" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/images"] == 4 and 0 <= evals[0]["eval/top1"] <= 100


def metric_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_a_non_finite_loss_skips_the_update_and_training_goes_on(shards, tmp_path, engine):
    # A user's lr of 1e30: step 1 warms up (lr ~0), step 2's update throws the weights to ~1e30, and from
    # step 3 the forward overflows. Those steps must leave the weights as they were, on both ranks.
    out = launch(shards, tmp_path, "simmim", f"engine={engine}", "stage.steps=4", "stage.optim.lr=1e30",
                 "checkpoint.every_steps=1", "checkpoint.keep_last=4", "stage.mask_patch_size=16")
    assert "step 3: non-finite loss on some rank; the update was skipped on every rank" in out
    run = tmp_path / "demo" / "simmim"
    rows = metric_rows(run)
    assert [rows[s]["train/nan_skips"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert all(math.isfinite(rows[s]["train/loss"]) for s in (1, 2))
    assert [rows[s]["train/loss"] for s in (3, 4)] == ["nan", "nan"]  # the JSONL spells non-finite values out

    weights = {s: engine_class(engine).read_weights(run / "checkpoints", f"step_{s:08d}") for s in (2, 3, 4)}
    assert max(w.abs().max().item() for w in weights[2].values()) > 1e20  # step 2 did update, and blew up
    for s in (3, 4):
        assert weights[s].keys() == weights[2].keys()
        for name, value in weights[2].items():
            assert torch.equal(weights[s][name], value), (s, name)


def test_every_evaluation_reads_the_same_val_samples(shards, tmp_path):
    # lr 0 keeps the weights fixed, so two evaluations of one val batch each must agree exactly.
    launch(shards, tmp_path, "supervised", "stage.init_from=none", "stage.steps=2", "stage.eval_every=1",
           "stage.eval_batches=1", "stage.optim.lr=0", "stage.optim.min_lr=0", "stage.optim.warmup_lr=0")
    rows = metric_rows(tmp_path / "demo" / "supervised")
    first, second = ({k: v for k, v in rows[s].items() if k.startswith("eval/")} for s in (1, 2))
    assert first["eval/images"] == 4 and first == second


def test_a_preemption_signal_during_start_up_is_not_lost(shards, tmp_path):
    # SIGUSR1 (SLURM's warning) while the engine is still being set up: the default action would kill the
    # process; the trainer must instead run one step, save it and exit 0.
    cmd, env = command(shards, tmp_path, "simmim", "stage.steps=5", "checkpoint.every_steps=100",
                       "stage.mask_patch_size=16", torchrun=False)
    proc = start(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "deepspeed: ZeRO-" in line:  # engine built; loaders, logger and resume still to come
            proc.send_signal(signal.SIGUSR1)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(lines)[-5000:]
    assert any("stopping at step 1 on SIGUSR1" in line for line in lines), "".join(lines)[-5000:]
    assert (tmp_path / "demo" / "simmim" / "checkpoints" / "latest").read_text() == "step_00000001"


def test_simmim_trains_on_image_only_shards_and_prints_no_silenced_warning(tmp_path):
    """Shards as another tool writes them (tarfile; .jpeg and .png, no .cls or .json) serve SimMIM, and the
    dependency deprecations that launch/pretrain.py silences (DeepSpeed's reduce_scatter_tensor, once per
    rank and step before) are not printed."""
    from launch.pretrain import THIRD_PARTY_DEPRECATIONS
    from tests.data.test_shards import foreign_shard

    for s, fmt in enumerate(("jpeg", "png")):
        foreign_shard(tmp_path / f"bare-{s}.tar", [0] * 12, fmt=fmt, members=())
    (tmp_path / "train.txt").write_text("bare-0.tar\nbare-1.tar\n")
    out = launch(tmp_path, tmp_path / "runs", "simmim", "stage.steps=2", "stage.mask_patch_size=16",
                 "data.samples_per_epoch=24")
    assert "simmim step 2/2" in out
    for _, _, message in THIRD_PARTY_DEPRECATIONS:
        assert not re.search(message, out), message
