"""scripts/convert_checkpoint.py on real DeepSpeed checkpoints written by 2 gloo ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp
import yaml
from transformers import AutoModel, Swinv2ForImageClassification

from models import layouts
from models.simmim import SimMIM
from models.swinv2 import SwinTransformerV2, load_pretrained

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]
from scripts.convert_checkpoint import main as convert_main  # noqa: E402
from tests.torchrun import torchrun  # noqa: E402
from zero_checkpoint_job import TINY  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """ZeRO-3 SwinV2 (fp32 and bf16) and ZeRO-2 SimMIM runs, trained and saved by 2 gloo ranks."""
    out_dir = tmp_path_factory.mktemp("zero")
    torchrun(HERE / "zero_checkpoint_job.py", str(out_dir), "swinv2:3", "simmim:2", "swinv2:3:bf16",
             timeout=420)
    return out_dir


@pytest.fixture
def zero3_run(runs):
    return runs / "swinv2_zero3"


@pytest.fixture
def simmim_zero2_run(runs):
    return runs / "simmim_zero2"


def convert_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/convert_checkpoint.py"), *map(str, args)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


def convert(*args) -> None:
    """In-process, to skip an interpreter start per call."""
    convert_main([str(a) for a in args])


def convert_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.dist
def test_zero3_checkpoint_converts_to_a_plain_model_with_the_engine_outputs(zero3_run, tmp_path):
    out = tmp_path / "swinv2.pt"
    proc = convert_cli(zero3_run / "checkpoints", out)
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
    for name, weight in ref["weights"].items():
        assert torch.equal(file["model"][name], weight), name


@pytest.mark.dist
def test_bf16_zero3_checkpoint_gives_the_fp32_master_weights(runs, tmp_path):
    run = runs / "swinv2_zero3_bf16"
    convert(run, tmp_path / "bf16.pt")
    state_dict = torch.load(tmp_path / "bf16.pt", weights_only=True)["model"]
    ref = torch.load(run / "outputs.pt", weights_only=True)
    assert ref["weights"].keys() <= state_dict.keys()
    for name, weight in ref["weights"].items():
        assert weight.dtype == torch.bfloat16 and state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name].to(torch.bfloat16), weight), name
    # Masters, not upcast bf16 copies: some carry bits bf16 cannot hold.
    assert any(not torch.equal(state_dict[n], w.float()) for n, w in ref["weights"].items())

    model = SwinTransformerV2(num_classes=5, **TINY).eval()
    load_pretrained(model, {"model": state_dict})
    for param in model.parameters():  # as DeepSpeed holds them: bf16 parameters, fp32 buffers
        param.data = param.data.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(ref["images"])
    torch.testing.assert_close(outputs, ref["outputs"])


@pytest.mark.dist
def test_simmim_zero2_checkpoint_keeps_encoder_and_decoder_names(simmim_zero2_run, tmp_path):
    convert(simmim_zero2_run / "checkpoints", tmp_path / "simmim.pt")
    state_dict = torch.load(tmp_path / "simmim.pt", weights_only=True)["model"]
    assert {k.split(".")[0] for k in state_dict} == {"encoder", "decoder"}
    model = SimMIM(encoder_stride=8, **TINY).eval()
    model.load_state_dict(state_dict, strict=True)
    ref = torch.load(simmim_zero2_run / "outputs.pt", weights_only=True)
    with torch.no_grad():
        reconstruction = model(ref["images"], ref["mask"])
    torch.testing.assert_close(reconstruction, ref["outputs"], rtol=1e-5, atol=1e-6)


@pytest.mark.dist
def test_encoder_only_gives_the_bare_swinv2_of_a_simmim_run(simmim_zero2_run, tmp_path):
    convert(simmim_zero2_run / "checkpoints", tmp_path / "full.pt")
    convert(simmim_zero2_run / "checkpoints", tmp_path / "encoder.pt", "--encoder-only")
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    encoder = torch.load(tmp_path / "encoder.pt", weights_only=True)["model"]
    assert not any(k.startswith(("encoder.", "decoder.")) or k == "mask_token" for k in encoder)

    bare = SwinTransformerV2(num_classes=0, **TINY).eval()
    load_pretrained(bare, {"model": encoder})
    simmim = SimMIM(encoder_stride=8, **TINY).eval()
    simmim.load_state_dict(full, strict=True)
    images = torch.load(simmim_zero2_run / "outputs.pt", weights_only=True)["images"]
    with torch.no_grad():  # with nothing masked the SimMIM encoder is the bare SwinV2
        features = bare.forward_features(images)  # (B, L, C)
        expected = simmim.encoder(images, torch.zeros(2, 8, 8)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features, expected)


@pytest.mark.dist
def test_run_dir_tag_folder_and_tag_option_give_the_same_file(zero3_run, tmp_path):
    convert(zero3_run, tmp_path / "run.pt")  # the run dir holds checkpoints/latest
    convert(zero3_run / "checkpoints" / "step3", tmp_path / "a.pt")
    convert(zero3_run / "checkpoints", tmp_path / "b.pt", "--tag", "step3")
    files = [torch.load(tmp_path / f, weights_only=True)["model"] for f in ("run.pt", "a.pt", "b.pt")]
    for other in files[1:]:
        assert other.keys() == files[0].keys() and all(torch.equal(other[k], files[0][k]) for k in other)


@pytest.mark.dist
def test_encoder_only_refuses_a_bare_swinv2_checkpoint(zero3_run, tmp_path, capsys):
    err = convert_error(capsys, zero3_run / "checkpoints", tmp_path / "x.pt", "--encoder-only")
    assert "--encoder-only needs a SimMIM checkpoint" in err
    assert not (tmp_path / "x.pt").exists()


def test_bad_folders_are_named(tmp_path, capsys):
    assert "nowhere does not exist" in convert_error(capsys, tmp_path / "nowhere", tmp_path / "x.pt")
    (tmp_path / "ckpt").mkdir()
    assert "is not a checkpoint" in convert_error(capsys, tmp_path / "ckpt", tmp_path / "x.pt")
    (tmp_path / "ckpt" / "latest").write_text("step9\n")
    assert "step9 does not exist" in convert_error(capsys, tmp_path / "ckpt", tmp_path / "x.pt")
    (tmp_path / "ckpt" / "step9").mkdir()
    (tmp_path / "ckpt" / "step9" / "notes.txt").write_text("")
    assert "step9 is not a checkpoint" in convert_error(capsys, tmp_path / "ckpt", tmp_path / "x.pt")


class Opaque:  # any class outside torch's weights_only allow-list
    pass


def test_an_export_that_pickles_objects_is_refused(tmp_path, capsys):
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "args": Opaque()}, tmp_path / "w.pth")
    err = convert_error(capsys, tmp_path / "w.pth", tmp_path / "x.safetensors")
    assert "w.pth: not a plain tensor file" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_torch_distributed_checkpoint_converts_too(tmp_path):
    """The FSDP2 engine's format: a DCP folder whose state holds `model` (and `optim`)."""
    model = SwinTransformerV2(num_classes=5, **TINY).eval()
    state = {"model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=tmp_path / "checkpoints" / "step_00000007", no_dist=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000007")
    convert(tmp_path, tmp_path / "out.pt")
    state_dict = torch.load(tmp_path / "out.pt", weights_only=True)["model"]
    assert state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert state_dict[k].dtype == torch.float32
        torch.testing.assert_close(state_dict[k], v.to(torch.bfloat16).float())


def pooled_features(to: str, out: Path, images: torch.Tensor) -> torch.Tensor:
    """The headless export `out` loaded by the library it was written for, and its pooled features."""
    with torch.no_grad():
        if to == "official":
            model = SwinTransformerV2(num_classes=0, **TINY).eval()
            load_pretrained(model, out)
            return model.forward_features(images).mean(1)
        if to == "timm":
            name, kwargs = layouts.timm_model_args({**TINY, "in_chans": 3, "mlp_ratio": 4.0}, 0)
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=0),
                                     **kwargs).eval()(images)
        return AutoModel.from_pretrained(out).eval()(pixel_values=images).pooler_output


@pytest.mark.dist
@pytest.mark.parametrize("to", layouts.LAYOUTS)
def test_simmim_run_encoder_exports_to_each_layout(simmim_zero2_run, to, tmp_path):
    out = tmp_path / {"official": "encoder.safetensors", "timm": "timm.safetensors", "hf": "hf"}[to]
    # the DeepSpeed run dir records no config.yaml: the geometry comes from the options
    convert(simmim_zero2_run, out, "--to", to, "--img-size", 32, "--window-size", 4,
            *(["--encoder-only"] if to == "official" else []))
    convert(simmim_zero2_run, tmp_path / "full.pt")
    simmim = SimMIM(encoder_stride=8, **TINY).eval()
    simmim.load_state_dict(torch.load(tmp_path / "full.pt", weights_only=True)["model"], strict=True)
    images = torch.load(simmim_zero2_run / "outputs.pt", weights_only=True)["images"]
    with torch.no_grad():  # with nothing masked the SimMIM encoder is the bare SwinV2
        expected = simmim.encoder(images, torch.zeros(2, 8, 8)).flatten(2).mean(2)
    torch.testing.assert_close(pooled_features(to, out, images), expected, rtol=0, atol=1e-4)


def _fsdp_run(tmp_path: Path, cpb_coords: str = "log") -> SwinTransformerV2:
    """A DCP checkpoint as the FSDP2 engine saves it, in a run dir whose config.yaml records the geometry."""
    torch.manual_seed(0)
    model = SwinTransformerV2(num_classes=5, **TINY).eval()
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "checkpoints" / "step_00000007", no_dist=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000007")
    config = {"model": {**TINY, "depths": list(TINY["depths"]), "num_heads": list(TINY["num_heads"]),
                        "pretrained_window_sizes": [0, 0], "cpb_coords": cpb_coords}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return model


def test_fsdp_run_dir_exports_to_transformers_with_the_geometry_of_its_config(tmp_path, capsys):
    model = _fsdp_run(tmp_path)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    err = convert_error(capsys, tmp_path, tmp_path / "hf", "--to", "hf", "--labels", tmp_path / "three.txt")
    assert "3 lines, but the head has 5 classes" in err
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    convert(tmp_path, tmp_path / "hf", "--to", "hf", "--labels", tmp_path / "labels.txt")
    classifier = Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert (classifier.config.image_size, classifier.config.window_size) == (32, 4)
    assert classifier.config.id2label[2] == "triangle" and classifier.config.label2id["cross"] == 4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixel_values=images).logits, model(images), rtol=0, atol=1e-4)


def test_linear_position_bias_is_refused_for_timm(tmp_path, capsys):
    _fsdp_run(tmp_path, cpb_coords="linear")
    err = convert_error(capsys, tmp_path, tmp_path / "timm.safetensors", "--to", "timm")
    assert "only the log-spaced position bias" in err and "cpb_coords=linear" in err
    assert not (tmp_path / "timm.safetensors").exists()
