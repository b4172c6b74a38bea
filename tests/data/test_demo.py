import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from data.demo import write_demo_shards

ARGS = dict(num_classes=10, train_samples=60, val_samples=20, samples_per_shard=20, image_size=(40, 30), seed=3)


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_demo_shards_are_deterministic_and_complete(tmp_path):
    a = write_demo_shards(str(tmp_path / "a"), **ARGS)
    b = write_demo_shards(str(tmp_path / "b"), **ARGS)
    assert a == b and a["train"]["samples"] == 60 and len(a["val"]["shards"]) == 1
    for name in ("train-000000.tar", "train-000002.tar", "val-000000.tar"):
        assert members(tmp_path / "a" / name) == members(tmp_path / "b" / name)
    labels = [int(v) for s in range(3) for k, v in members(tmp_path / "a" / f"train-{s:06d}.tar").items()
              if k.endswith(".cls")]
    assert len(labels) == 60 and set(labels) == set(range(10))
    assert (tmp_path / "a" / "train.txt").read_text().split() == [f"train-{i:06d}.tar" for i in range(3)]
    other = write_demo_shards(str(tmp_path / "c"), **{**ARGS, "seed": 4})
    assert members(tmp_path / "c" / "val-000000.tar") != members(tmp_path / "a" / "val-000000.tar")
    assert other["args"]["seed"] == 4


def test_existing_demo_shards_are_kept(tmp_path):
    write_demo_shards(str(tmp_path), **ARGS)
    before = os.stat(tmp_path / "train-000000.tar").st_mtime_ns
    write_demo_shards(str(tmp_path), **ARGS)
    assert os.stat(tmp_path / "train-000000.tar").st_mtime_ns == before
    write_demo_shards(str(tmp_path), **{**ARGS, "train_samples": 40})  # other arguments: rewritten
    assert json.loads((tmp_path / "manifest.json").read_text())["train"]["samples"] == 40


def test_cli_writes_the_configured_set_with_overrides(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "data.demo", f"demo.out_dir={tmp_path}", "demo.train_samples=40",
                           "demo.val_samples=10", "demo.samples_per_shard=10", "demo.image_size=[32,24]"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["args"]["image_size"] == [32, 24] and len(manifest["train"]["shards"]) == 4
