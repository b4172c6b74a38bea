"""A finished job exits 0, every time: DeepSpeed's gloo threads outlive the process group, and a rank that let
the interpreter finalise around them aborted now and then after all its work (docs/RELIABILITY.md)."""
import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent
REPEATS = 50
pytestmark = pytest.mark.dist


def test_a_short_deepspeed_job_exits_0_fifty_times_in_a_row(tmp_path):
    torchrun(HERE / "exit_job.py", str(tmp_path), str(REPEATS), timeout=900)
    for rank in range(2):
        codes = json.loads((tmp_path / f"exits_rank{rank}.json").read_text())
        assert codes == [0] * REPEATS, codes
        # each repeat did the whole job: trained and saved its checkpoint
        assert all((tmp_path / f"job{i}" / f"updated_rank{rank}.json").read_text() == "[true]" for i in range(REPEATS))
