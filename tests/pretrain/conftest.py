from pathlib import Path

import pytest

from data.demo import write_demo_shards


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """Demo shards of 4 classes (64 train / 8 val samples, 8 per shard) at a given image size."""
    def make(image_size: int) -> Path:
        out = tmp_path_factory.mktemp("shards")
        write_demo_shards(str(out), num_classes=4, train_samples=64, val_samples=8, samples_per_shard=8,
                          image_size=image_size, seed=0)
        return out
    return make
