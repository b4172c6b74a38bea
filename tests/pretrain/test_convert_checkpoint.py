"""scripts/convert_checkpoint.py on real DeepSpeed checkpoints written by 2 gloo ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.swinv2 import SwinTransformerV2, load_pretrained

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from zero_checkpoint_job import TINY  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}


def train_and_save(out_dir: Path, zero_stage: int, model: str) -> Path:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
           str(HERE / "zero_checkpoint_job.py"), str(out_dir), "--zero-stage", str(zero_stage), "--model", model]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/convert_checkpoint.py"), *map(str, args)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    return train_and_save(tmp_path_factory.mktemp("zero3"), zero_stage=3, model="swinv2")


@pytest.mark.dist
def test_zero3_checkpoint_converts_to_a_plain_model_with_the_engine_outputs(zero3_run, tmp_path):
    out = tmp_path / "swinv2.pt"
    proc = convert(zero3_run / "checkpoints", out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    file = torch.load(out, weights_only=True)
    assert list(file) == ["model"]
    assert all(v.dtype == torch.float32 for v in file["model"].values())
    model = SwinTransformerV2(num_classes=5, **TINY).eval()
    load_pretrained(model, file)  # raises on any missing, unexpected or mis-shaped key
    assert set(file["model"]) == set(model.state_dict())

    ref = torch.load(zero3_run / "outputs.pt", weights_only=True)
    with torch.no_grad():
        outputs = model(ref["images"])
        untrained = SwinTransformerV2(num_classes=5, **TINY).eval()(ref["images"])
    torch.testing.assert_close(outputs, ref["outputs"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(untrained, ref["outputs"], atol=1e-4)  # the steps did move the weights


@pytest.mark.dist
def test_tag_folder_and_tag_option_give_the_same_file(zero3_run, tmp_path):
    assert convert(zero3_run / "checkpoints" / "step3", tmp_path / "a.pt").returncode == 0
    assert convert(zero3_run / "checkpoints", tmp_path / "b.pt", "--tag", "step3").returncode == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.dist
def test_encoder_only_refuses_a_bare_swinv2_checkpoint(zero3_run, tmp_path):
    proc = convert(zero3_run / "checkpoints", tmp_path / "x.pt", "--encoder-only")
    assert proc.returncode != 0 and "--encoder-only needs a SimMIM checkpoint" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_bad_folders_are_named(tmp_path):
    proc = convert(tmp_path / "nowhere", tmp_path / "x.pt")
    assert proc.returncode != 0 and "nowhere does not exist" in proc.stderr
    (tmp_path / "ckpt").mkdir()
    proc = convert(tmp_path / "ckpt", tmp_path / "x.pt")
    assert proc.returncode != 0 and "is not a checkpoint" in proc.stderr
    (tmp_path / "ckpt" / "latest").write_text("step9\n")
    proc = convert(tmp_path / "ckpt", tmp_path / "x.pt")
    assert proc.returncode != 0 and "step9 does not exist" in proc.stderr
    (tmp_path / "ckpt" / "step9").mkdir()
    (tmp_path / "ckpt" / "step9" / ".metadata").write_bytes(b"")
    proc = convert(tmp_path / "ckpt", tmp_path / "x.pt")
    assert proc.returncode != 0 and "no reader for checkpoint format 'dcp'" in proc.stderr
