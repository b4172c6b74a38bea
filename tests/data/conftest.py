import pytest

from data.demo import write_demo_shards

SMALL = dict(num_classes=10, train_samples=192, val_samples=32, samples_per_shard=24, image_size=(64, 48), seed=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """8 train shards x 24 samples, 64x48 JPEGs (shared by the tests: written once)."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_shards(str(out), **SMALL)
    return out


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
