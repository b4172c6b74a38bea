"""The shard loader resumed on another world size: the data stream goes on without skips or repeats.

In-process loaders with explicit (rank, world_size) stand in for the ranks: the loader's position logic
is per rank and needs no process group (the 2-rank runs in test_world_size.py cover the wiring).
"""
import zlib
from collections import Counter

import pytest
import torch

from data.demo import write_demo_shards
from data.shards import build_loader

SAMPLES, PER_SHARD, BATCH = 64, 8, 4


def key(image_bytes: bytes) -> dict:
    return {"key": torch.tensor(zlib.crc32(image_bytes), dtype=torch.int64)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(str(out), num_classes=4, train_samples=SAMPLES, val_samples=8, samples_per_shard=PER_SHARD,
                      image_size=24, seed=0)
    return str(out / "train.txt")


def loader(shards, rank, world, workers=0, batch=BATCH):
    return build_loader(shards, sample_fn=key, batch_size=batch, rank=rank, world_size=world, num_workers=workers,
                        shuffle_buffer=16, resampled=False, samples_per_epoch=SAMPLES, seed=3)


def take(it, n):
    return [k for _ in range(n) for k in next(it)["key"].tolist()]


@pytest.fixture(scope="module")
def every_key(shards):
    first_pass = take(loader(shards, 0, 1), SAMPLES // BATCH)
    assert len(set(first_pass)) == SAMPLES  # keys tell the samples apart
    return Counter(first_pass)


def test_two_ranks_resume_on_one_without_skips_or_repeats(shards, every_key):
    old = [loader(shards, r, 2) for r in range(2)]
    before = take(old[0], 3) + take(old[1], 3)  # 24 of the 64 samples of pass 0
    new = loader(shards, 0, 1)
    new.load_state_dict([o.state_dict() for o in old])
    assert new.batches == 6 and new.epoch == 0  # 24 samples delivered = 6 batches of 4 on one rank
    rest = take(new, (SAMPLES - len(before)) // BATCH)
    assert Counter(before + rest) == every_key  # pass 0 completed exactly
    assert Counter(take(new, SAMPLES // BATCH)) == every_key  # then pass 1 with the new layout


def test_one_rank_resumes_on_two_without_skips_or_repeats(shards, every_key):
    old = loader(shards, 0, 1, batch=2)
    before = take(old, 10)  # 20 samples, and another micro batch size than the new run
    new = [loader(shards, r, 2) for r in range(2)]
    for n in new:
        n.load_state_dict([old.state_dict()])
        assert n.batches == 2  # 20 // (2 x 4)
    drained = take(new[0], (SAMPLES - len(before)) // BATCH)  # rank 0 finishes the old stream's pass
    assert Counter(before + drained) == every_key
    per_rank = SAMPLES // 2 // BATCH  # then pass 1, split over the two ranks
    assert Counter(take(new[0], per_rank) + take(new[1], per_rank)) == every_key


def test_workers_and_resharding_twice_keep_the_pass(shards, every_key):
    old = [loader(shards, r, 2, workers=2) for r in range(2)]
    before = take(old[0], 2) + take(old[1], 2)
    mid = loader(shards, 0, 1)
    mid.load_state_dict([o.state_dict() for o in old])
    before += take(mid, 1)  # still draining the old layout when it is saved again
    new = [loader(shards, r, 2) for r in range(2)]
    for n in new:
        n.load_state_dict([mid.state_dict()])
    seen = before + take(new[0], (SAMPLES - len(before)) // BATCH)
    assert Counter(seen) == every_key


def test_the_same_world_size_still_needs_its_own_state(shards):
    old = [loader(shards, r, 2) for r in range(2)]
    with pytest.raises(ValueError, match="exact resume needs the same ones"):
        loader(shards, 0, 1).load_state_dict(old[0].state_dict())
    with pytest.raises(ValueError, match="one per old rank"):
        loader(shards, 0, 1).load_state_dict([old[0].state_dict()])
