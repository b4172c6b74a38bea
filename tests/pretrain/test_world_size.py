"""Resuming on another number of ranks, both engines: 2 -> 1 -> 2, weights and AdamW state restored.

world_size_job.py trains on fixed global batches whatever the world size, so a resumed run must repeat the
losses of the run it continues (to float rounding); a lost or mis-mapped optimizer state shows at once.
"""
import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def shards(small_shards) -> Path:
    return small_shards(image_size=16)


def job(nproc: int, out: Path, engine: str, shards: Path, *args: str) -> tuple[dict, str]:
    output = torchrun(HERE / "world_size_job.py", str(out), engine, str(shards), *args, nproc=nproc)
    return json.loads((out / "losses.json").read_text()), output


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_save_on_2_resume_on_1_save_on_1_resume_on_2(engine, shards, tmp_path):
    two, _ = job(2, tmp_path / "two", engine, shards, "--save-at", "2", "--steps", "4")
    one, log = job(1, tmp_path / "one", engine, shards, "--resume-from", str(tmp_path / "two" / "checkpoints"),
                   "--resume-step", "2", "--save-at", "4", "--steps", "6")
    assert "on another world size: 2 -> 1 ranks" in log and "accumulation 2 x world 2" in log
    again, log = job(2, tmp_path / "again", engine, shards, "--resume-from", str(tmp_path / "one" / "checkpoints"),
                     "--resume-step", "4", "--save-at", "99", "--steps", "6")
    assert "on another world size: 1 -> 2 ranks" in log and "accumulation 4 x world 1" in log
    if engine == "deepspeed":  # converted once, inside the tag it came from
        assert (tmp_path / "two" / "checkpoints" / "step_00000002" / "universal" / "zero").is_dir()

    # the data position carried over: 16 samples seen at step 2 and 32 at step 4, in micro batches of 2 per rank
    assert one["loader_batches"] == 16 // (2 * 1) and again["loader_batches"] == 32 // (2 * 2)
    two, one, again = ({int(k): v for k, v in r["losses"].items()} for r in (two, one, again))
    assert sorted(one) == [3, 4, 5, 6] and sorted(again) == [5, 6]
    for step in (3, 4):
        assert one[step] == pytest.approx(two[step], abs=1e-6), (step, one, two)
    for step in (5, 6):
        assert again[step] == pytest.approx(one[step], abs=1e-6), (step, again, one)
    assert len({round(v, 6) for v in two.values()}) == 4  # the steps did change the weights
