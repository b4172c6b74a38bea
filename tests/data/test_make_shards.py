"""scripts/make_shards.py: ImageFolder and per-class tars -> shards -> data.shards, restart and verify."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import encode_jpeg
from data.demo import make_image
from data.shards import build_loader

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_shards.py"
CLASSES = ["n01", "n02", "n03"]


def images(c):
    """4 JPEGs and one PNG per class; each image's pixel mean identifies its class."""
    out = {}
    for i in range(5):
        rgb = make_image(c, np.random.default_rng([c, i]), 48, 40)
        if i == 4:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            out[f"{CLASSES[c]}_{i}.png"] = buf.getvalue()
        else:
            out[f"{CLASSES[c]}_{i}.JPEG"] = encode_jpeg(rgb)
    return out


def run(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    return proc


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    for c, name in enumerate(CLASSES):
        (src / name).mkdir(parents=True)
        for fname, data in images(c).items():
            (src / name / fname).write_bytes(data)
    (src / "n02" / "notes.txt").write_text("not an image")
    return src


@pytest.fixture
def class_tars(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    for c, name in enumerate(CLASSES):
        with tarfile.open(src / f"{name}.tar", "w") as tar:
            for fname, data in images(c).items():
                info = tarfile.TarInfo(fname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return src


@pytest.mark.parametrize("source", ["image_folder", "class_tars"])
def test_round_trip_through_the_loader(source, request, tmp_path):
    src, out = request.getfixturevalue(source), tmp_path / "out"
    proc = run(src, out, "--samples-per-shard", 4)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["samples"] == 15
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 3]
    assert (out / "classes.txt").read_text().split() == CLASSES

    # every source image comes back once, byte for byte, with its class index
    expected = sorted((c, data) for c in range(3) for data in images(c).values())
    found = []
    for name in (out / "train.txt").read_text().split():
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in {n.split(".")[0] for n in members}:
            image = next(v for k, v in members.items() if k.startswith(key) and k.split(".")[1] in ("jpg", "png"))
            found.append((int(members[f"{key}.cls"]), image))
            assert json.loads(members[f"{key}.json"])["class_name"] == CLASSES[found[-1][0]]
    assert sorted(found) == expected

    loader = build_loader(str(out / "train.txt"), sample_fn=lambda b: dict(n=torch.tensor(len(b))), batch_size=5,
                          rank=0, world_size=1, num_workers=0, shuffle_buffer=0, resampled=False,
                          samples_per_epoch=15, seed=0, num_classes=3)
    labels = torch.cat([next(loader)["label"] for _ in range(3)])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5 and loader.stats()["skipped_samples"] == 0


def test_restart_writes_only_missing_shards_and_verify_catches_damage(image_folder, tmp_path):
    out = tmp_path / "out"
    assert run(image_folder, out, "--samples-per-shard", 4).returncode == 0
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    original = (out / "train-000002.tar").read_bytes()
    (out / "train-000002.tar").unlink()  # as if the job died before this shard was renamed
    (out / "train-000003.tar.tmp").write_bytes(b"partial")
    assert run(image_folder, out, "--samples-per-shard", 4).returncode == 0
    assert (out / "train-000002.tar").read_bytes() == original
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept

    ok = run("--verify", out, "--decode")
    assert ok.returncode == 0 and "all shards match" in ok.stdout
    (out / "train-000001.tar").write_bytes(original[:3000])
    bad = run("--verify", out)
    assert bad.returncode == 1 and "train-000001.tar" in bad.stdout

    other = run(image_folder, out, "--samples-per-shard", 5)
    assert other.returncode != 0 and "other arguments" in other.stderr


def test_source_must_be_folders_or_tars(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run(tmp_path / "empty", tmp_path / "out")
    assert proc.returncode != 0 and "expected either class folders" in proc.stderr
