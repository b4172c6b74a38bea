"""The training loop reads values from the device only where it must, one per optimizer step and none per
micro batch: whether the update happened (the NaN guard acts on it at once) and whether to stop (every rank
stops at the same step), agreed over ranks in one int32. Losses, gradient norms and metrics stay on the
device until a log step. Counted in real 2-rank runs of launch/pretrain.py, accumulation 2
(host_reads_job.py)."""
import json
from pathlib import Path

import pytest

from tests.torchrun import torchrun

pytestmark = pytest.mark.dist
HERE = Path(__file__).parent
TINY = ("model.img_size=32", "model.window_size=4", "stage.mask_patch_size=8", "stage.norm_target_patch=7")


@pytest.fixture(scope="module")
def shards(small_shards) -> Path:
    return small_shards(image_size=40)


def host_reads(shards: Path, out: Path, *overrides: str) -> list[int]:
    """Reads per step of steps 1-3 of 4 (step 2 is a log step), as rank 0 counted them."""
    torchrun(HERE / "host_reads_job.py", str(out), "+stage=simmim", f"run_root={out}", "logger=none",
             "logger.every=2", f"data.train_urls={shards}/train.txt", "data.samples_per_epoch=64",
             "data.num_workers=1", "data.shuffle_buffer=16", "stage.global_batch=8", "stage.micro_batch=2",
             "stage.steps=4", "stage.optim.warmup_steps=1", *TINY, *overrides)
    return json.loads((out / "host_reads_rank0.json").read_text())


def test_fsdp_steps_read_one_value(shards, tmp_path):
    # the engine keeps its skip decision on the device (the fused AdamW reads the flag itself): it rides in
    # the stop flag's all-reduce
    assert host_reads(shards, tmp_path, "engine=fsdp") == [1, 1, 1]


def test_zero3_steps_after_the_first_read_two_values(shards, tmp_path):
    # DeepSpeed's first step sets itself up (hundreds of reads, once); from then on it reads its own overflow
    # flag in its step (the update flag, already on the host), and the loop reads the stop flag
    assert host_reads(shards, tmp_path, "engine=deepspeed")[1:] == [2, 2]
