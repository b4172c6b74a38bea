"""Corrupt data in a real 2-rank training run: garbage and zero-byte JPEGs, a sample without a label (which
SimMIM, needing none, uses), a truncated tar, a tar that is garbage from byte 0, a shard URL that 404s, and a shard deleted while the run
goes are skipped and counted in metrics.jsonl, and the run finishes. When every shard is gone mid-run the
ranks stop with an error that names the shards instead of hanging."""
import threading
import time
from pathlib import Path

import pytest

from data.demo import write_demo_shards
from pretrain.loggers import read_metrics
from tests.data.test_shards import http_root, read_tar, write_tar  # noqa: F401 (http_root: the fixture)
from tests.pretrain.test_training import command
from tests.torchrun import run

pytestmark = pytest.mark.dist
SIMMIM = ("stage.mask_patch_size=16", "checkpoint.every_steps=100", "data.samples_per_epoch=64")


@pytest.fixture
def shards(tmp_path) -> Path:
    """10 train shards of 8 samples (a fresh set: the tests damage it)."""
    out = tmp_path / "shards"
    write_demo_shards(str(out), num_classes=10, train_samples=80, val_samples=16, samples_per_shard=8,
                      image_size=(72, 56), seed=0)
    return out


def corrupt(shards: Path, gone_url: str) -> None:
    """Damage shards 0-2 and add a URL that 404s to the shard list; shard 3 is the one to delete later."""
    members = read_tar(shards / "train-000000.tar")
    members["train00000000.jpg"] = members["train00000000.jpg"][:2] + b"\x00garbage" * 64  # JPEG magic, then junk
    members["train00000001.jpg"] = b""
    del members["train00000002.cls"]
    write_tar(shards / "train-000000.tar", members)
    data = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (shards / "train-000002.tar").write_bytes(b"\x13\x37 not a tar" * 500)
    with open(shards / "train.txt", "a") as f:
        f.write(gone_url + "\n")


def delete_once_training_runs(run_dir: Path, paths: list[Path], deadline_s: float = 300) -> threading.Thread:
    """Delete `paths` from a background thread as soon as the run's first metrics row is written."""
    def wait_then_delete():
        metrics, end = run_dir / "metrics.jsonl", time.monotonic() + deadline_s
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < end:
            time.sleep(0.05)
        for path in paths:
            path.unlink(missing_ok=True)

    thread = threading.Thread(target=wait_then_delete, daemon=True)
    thread.start()
    return thread


def test_corrupt_samples_and_shards_are_skipped_counted_and_training_finishes(shards, tmp_path, http_root):  # noqa: F811
    corrupt(shards, f"{http_root[1]}/gone.tar")
    run_dir = tmp_path / "runs" / "demo" / "simmim"
    deleter = delete_once_training_runs(run_dir, [shards / "train-000003.tar"])
    cmd, env = command(shards, tmp_path / "runs", "simmim", *SIMMIM, "stage.steps=20")
    returncode, output = run(cmd, env)
    assert returncode == 0, output[-5000:]
    assert not deleter.is_alive() and not (shards / "train-000003.tar").exists()  # deleted while training

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = rows[0], rows[-1]
    # One pass over the data (11 shards, about 8 steps) meets 2 bad images and 3 failed shard reads (truncated,
    # garbage, 404), then 4 with the deleted shard: 20 steps are more than two passes. The sample without a
    # label is no bad sample for SimMIM.
    assert last["data/bad_image"] >= 4 and last["data/bad_label"] == 0 and last["data/shard_errors"] >= 7, last
    assert last["data/skipped_samples"] == last["data/bad_image"] + last["data/bad_label"]
    assert all(last[k] >= first[k] for k in ("data/bad_image", "data/bad_label", "data/shard_errors"))
    for shard, error in (("train-000003.tar", "FileNotFoundError"), ("gone.tar", "exit 22"),
                         ("train-000002.tar", "ReadError")):
        assert any(f"{shard}: read failed" in line and error in line for line in output.splitlines()), shard


def test_every_shard_gone_mid_run_stops_the_ranks_naming_the_shards(shards, tmp_path):
    run_dir = tmp_path / "runs" / "demo" / "simmim"
    train = sorted(shards.glob("train-*.tar"))
    deleter = delete_once_training_runs(run_dir, train)
    cmd, env = command(shards, tmp_path / "runs", "simmim", *SIMMIM, "stage.steps=500")
    returncode, output = run(cmd, env, timeout=300)
    assert returncode != 0 and not deleter.is_alive()
    assert "shards it opened held no readable sample" in output, output[-5000:]
    assert f"no readable sample: {shards}/train-0000" in output  # the names, sorted
    assert "FileNotFoundError" in output
