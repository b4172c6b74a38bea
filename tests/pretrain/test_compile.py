"""model.compile through the real launcher on 2 gloo ranks: compiled blocks give the eager losses to fp32
rounding under both engines, every checkpointing family and both attention paths, and so does the whole
compiled forward under FSDP2; each compiles in its first step only.

One eager ZeRO-3 run is the reference for every compiled run (test_fsdp shows the two engines' fp32 curves
agree to rounding). Drop path is off: inductor draws random numbers its own way, so a compiled block drops
other samples than an eager one.
"""
import json
from pathlib import Path

import pytest

from tests.torchrun import REPO, TORCHRUN, job_env, run

pytestmark = [pytest.mark.dist, pytest.mark.timeout(1200)]  # cold compiles: minutes on a loaded CPU
# Two feature-map stages, fewer graphs to compile: cold compiles dominate this file's time.
TINY = ("model.img_size=32", "model.window_size=4", "stage.mask_patch_size=8", "stage.norm_target_patch=7",
        "model.depths=[2,2]", "model.num_heads=[1,2]", "model.pretrained_window_sizes=[0,0]",
        "model.sequential_attn=[false,false]", "model.drop_path_rate=0", "engine.precision=fp32")
STEPS = 3
RUNS = {
    "eager": ("model.compile=off",),
    # ZeRO-3 turns torch checkpointing into torch_reentrant (pretrain.engine.deepspeed); the fused attention
    "zero3": ("model.compile=blocks", "model.grad_checkpointing=torch", "model.attn_impl=sdpa"),
    # fairscale's wrapper around the compiled forward, and chunked (sequential) attention inside it
    "fsdp": ("model.compile=blocks", "engine=fsdp", "model.grad_checkpointing=fairscale",
             "model.sequential_attn=[true,false]", "model.attn_chunk_size=2"),
    "full": ("model.compile=full", "engine=fsdp"),
}
COMPILED = ["zero3", "fsdp", "full"]


@pytest.fixture(scope="module")
def runs(small_shards, tmp_path_factory) -> dict[str, tuple[dict[int, dict], str]]:
    """Each run's metrics.jsonl rows by step, and its output."""
    shards, root = small_shards(image_size=40), tmp_path_factory.mktemp("compile")
    out = {}
    for name, overrides in RUNS.items():
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "launch" / "pretrain.py"), "+stage=simmim",
               f"run_root={root / name}", "logger=none", "logger.every=1", f"data.train_urls={shards}/train.txt",
               "data.samples_per_epoch=64", "data.num_workers=1", "data.shuffle_buffer=16", "stage.global_batch=8",
               "stage.micro_batch=2", "stage.optim.warmup_steps=1", f"stage.steps={STEPS}",
               f"checkpoint.every_steps={STEPS}", *TINY, *overrides]
        returncode, output = run(cmd, job_env(), timeout=600)
        assert returncode == 0, output[-8000:]
        rows = map(json.loads, (root / name / "demo" / "simmim" / "metrics.jsonl").read_text().splitlines())
        out[name] = {r["step"]: r for r in rows if "train/loss" in r}, output
    return out


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_runs_give_the_eager_losses(runs, name):
    eager, compiled = runs["eager"][0], runs[name][0]
    assert sorted(compiled) == sorted(eager) == list(range(1, STEPS + 1))
    for step in eager:
        assert compiled[step]["train/loss"] == pytest.approx(eager[step]["train/loss"], abs=1e-5), step
        assert compiled[step]["train/grad_norm"] == pytest.approx(eager[step]["train/grad_norm"], rel=1e-4), step
    assert len({round(r["train/loss"], 5) for r in eager.values()}) == STEPS  # the weights do change


# blocks: img 32 / patch 4 / window 4 gives feature maps 8 and 4, and only stage 1's map has a shift: 3
# distinct blocks, twice for the checkpointing that runs a forward without grad first (both families here).
# full: the forward breaks at every FSDP2 unit's hooks (one unit per block), which dynamo does not trace.
FRAMES = {"zero3": 6, "fsdp": 6, "full": 10}


@pytest.mark.parametrize("name", COMPILED)
def test_the_first_step_compiles_everything_and_nothing_recompiles(runs, name):
    rows, output, frames = *runs[name], FRAMES[name]
    assert rows[1]["compile/frames"] == frames
    assert rows[1]["perf/compile_s"] > 0
    assert [rows[s]["compile/recompiles"] for s in sorted(rows)] == [0] * STEPS
    assert [rows[s]["compile/frames"] for s in sorted(rows)] == [frames] * STEPS
    assert output.count(f"torch.compile: {frames} frames compiled in") == 1  # rank 0's log line, once
    assert runs["eager"][0][1]["compile/frames"] == 0
