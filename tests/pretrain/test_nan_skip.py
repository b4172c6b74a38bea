"""NaN/Inf skip through a real engine on 2 gloo ranks, with gradient accumulation: a step where one rank's
micro batch has a non-finite loss changes nothing (weights, AdamW moments and step count), so training on
batches 0, 1 (corrupt), 2 ends with exactly the weights of training on 0, 2."""
import json
from pathlib import Path

import pytest
import torch

from pretrain.engine import engine_class
from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.dist


def run_job(out: Path, engine: str, plan: str, *overrides: str) -> list[bool]:
    torchrun(HERE / "nan_skip_job.py", str(out), engine, plan, *overrides)
    per_rank = [json.loads((out / f"updated_rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1], per_rank  # every rank took the same steps
    return per_rank[0]


@pytest.mark.parametrize("engine,overrides", [
    ("deepspeed", ()),  # ZeRO-3 fp32
    ("deepspeed", ("engine.zero_stage=2", "engine.precision=bf16")),  # skipped by bf16's check_grad_overflow
    ("fsdp", ()),
])
def test_a_corrupt_micro_batch_on_one_rank_drops_the_whole_step_everywhere(tmp_path, engine, overrides):
    assert run_job(tmp_path / "skip", engine, "0,1x,2", *overrides) == [True, False, True]
    assert run_job(tmp_path / "clean", engine, "0,2", *overrides) == [True, True]
    assert run_job(tmp_path / "other", engine, "0,1,2", *overrides) == [True, True, True]
    read = engine_class(engine).read_weights
    skip, clean, other = (read(tmp_path / name / "checkpoints", "final") for name in ("skip", "clean", "other"))
    assert skip.keys() == clean.keys()
    for name, value in clean.items():
        assert torch.equal(skip[name], value), name
    assert any(not torch.equal(other[k], v) for k, v in clean.items())  # batch 1 would have changed them
