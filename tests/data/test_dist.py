"""2 ranks x 2 dataloader workers under torchrun (gloo, CPU): splitting and exact resume across processes."""
import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

JOB = Path(__file__).with_name("dist_loader_job.py")


@pytest.mark.dist
def test_two_ranks_two_workers_split_and_resume_exactly(demo_dir, tmp_path):
    torchrun(JOB, "first", str(tmp_path), str(demo_dir))
    torchrun(JOB, "resume", str(tmp_path), str(demo_dir))  # a new job restores the saved position
    first = [json.loads((tmp_path / f"first-{r}.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / f"resume-{r}.json").read_text()) for r in range(2)]

    # equal batches per rank: 192 samples // (2 ranks x batch 4)
    assert [f["batches_per_epoch"] for f in first] == [24, 24]
    # the ranks read different shards: no image appears on both
    sums = [{round(s, 3) for b in f["reference"] for s in b["image"]} for f in first]
    assert len(sums[0]) == len(sums[1]) == 40 and not sums[0] & sums[1]
    # after the restart each rank continues exactly where the uninterrupted run went on
    for r in range(2):
        assert resumed[r]["resumed"] == first[r]["reference"][4:]
        assert resumed[r]["stats"]["batches"] == 10 and resumed[r]["stats"]["samples"] == 40
