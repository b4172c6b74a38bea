"""Weights out to timm and transformers and back in, checked by loading them in the real libraries: SwinV2-T at
192/w12 (its last stage clamped to one 6x6 window) and 256/w8, randomised, with and without a head."""
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoModel, Swinv2Config, Swinv2ForImageClassification, Swinv2Model

from models import layouts
from models.swinv2 import SwinTransformerV2, load_pretrained
from swinv2_cases import MICRO, model_cfg, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.convert_checkpoint import main as convert  # noqa: E402

GEOMETRIES = [(192, 12), (256, 8)]
HEADS = [5, 0]


def tiny(img_size: int, window_size: int) -> dict:
    return {**model_cfg("tiny"), "img_size": img_size, "window_size": window_size, "drop_path_rate": 0.0}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.fixture(params=GEOMETRIES, ids=lambda g: f"{g[0]}w{g[1]}")
def geometry(request):
    return request.param


@pytest.fixture(params=HEADS, ids=["head", "nohead"])
def num_classes(request):
    return request.param


@pytest.fixture
def ours(geometry, num_classes):
    torch.manual_seed(0)
    return randomize_(SwinTransformerV2(num_classes=num_classes, **tiny(*geometry))).eval()


@pytest.fixture
def export(ours, tmp_path) -> Path:
    """What the converter reads besides a run dir: a weights file, here without pickle."""
    save_file(ours.state_dict(), tmp_path / "ours.safetensors")
    return tmp_path / "ours.safetensors"


def outputs(model: SwinTransformerV2, x: torch.Tensor) -> torch.Tensor:
    """Logits, or the pooled features of a headless model (what Swinv2Model calls pooler_output)."""
    return model(x) if model.num_classes else model.forward_features(x).mean(1)


def test_ours_to_timm(ours, export, geometry, num_classes, tmp_path, capsys):
    out = tmp_path / "timm.safetensors"
    convert([str(export), str(out), "--to", "timm", "--img-size", str(geometry[0]), "--window-size", str(geometry[1])])
    name, kwargs = layouts.timm_model_args(tiny(*geometry), num_classes)
    assert name.startswith("swinv2_tiny_window")
    assert f"timm.create_model({name!r}" in capsys.readouterr().out
    overlay = dict(file=str(out), num_classes=num_classes)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    x = torch.randn(1, 3, geometry[0], geometry[0])
    with torch.no_grad():
        same(model(x), outputs(ours, x))


def test_ours_to_transformers(ours, export, geometry, num_classes, tmp_path):
    out = tmp_path / "hf"
    convert([str(export), str(out), "--to", "hf", "--img-size", str(geometry[0]), "--window-size", str(geometry[1])])
    x = torch.randn(1, 3, geometry[0], geometry[0])
    with torch.no_grad():
        expected = outputs(ours, x)
        features = AutoModel.from_pretrained(out).eval()(pixel_values=x).pooler_output
        if num_classes:
            classifier = Swinv2ForImageClassification.from_pretrained(out).eval()
            assert classifier.config.num_labels == num_classes
            same(classifier(pixel_values=x).logits, expected)
            same(features, ours.forward_features(x).mean(1))
        else:
            same(features, expected)


def test_transformers_to_ours(geometry, num_classes, tmp_path):
    img_size, window_size = geometry
    cfg = tiny(*geometry)
    config = Swinv2Config(image_size=img_size, window_size=window_size, embed_dim=cfg["embed_dim"],
                          depths=cfg["depths"], num_heads=cfg["num_heads"], num_labels=max(num_classes, 1),
                          drop_path_rate=0.0)
    torch.manual_seed(0)
    hf = randomize_(Swinv2ForImageClassification(config) if num_classes else Swinv2Model(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = SwinTransformerV2(num_classes=num_classes, **cfg).eval()
    result = load_pretrained(ours, tmp_path / "hf")  # the folder, as from_pretrained takes it
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        out = hf(pixel_values=x)
        same(outputs(ours, x), out.logits if num_classes else out.pooler_output)
        if num_classes:  # a state dict in memory loads the same
            again = SwinTransformerV2(num_classes=num_classes, **cfg).eval()
            load_pretrained(again, hf.state_dict())
            same(again(x), out.logits)
    if num_classes:  # and the converter takes the folder, with the geometry of its config.json
        convert([str(tmp_path / "hf"), str(tmp_path / "timm.safetensors"), "--to", "timm"])
        name, kwargs = layouts.timm_model_args(cfg, num_classes)
        overlay = dict(file=str(tmp_path / "timm.safetensors"), num_classes=num_classes)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        with torch.no_grad():
            same(model(x), out.logits)


def test_round_trip_through_each_layout_is_exact():
    torch.manual_seed(0)
    state_dict = randomize_(SwinTransformerV2(num_classes=10, **MICRO)).state_dict()
    for layout in layouts.LAYOUTS:
        back = layouts.to_official(layouts.from_official(state_dict, layout))
        assert back.keys() == state_dict.keys(), layout
        assert all(torch.equal(back[k], v) for k, v in state_dict.items()), layout


@pytest.mark.parametrize("to", ["timm", "hf"])
def test_what_a_layout_cannot_hold_is_refused_in_one_line(to, tmp_path, capsys):
    with_norm3 = SwinTransformerV2(num_classes=0, **{**MICRO, "extra_norm_period": 2})
    save_file(with_norm3.state_dict(), tmp_path / "h.safetensors")
    out = tmp_path / ("x.safetensors" if to == "timm" else "x")
    with pytest.raises(SystemExit):
        convert([str(tmp_path / "h.safetensors"), str(out), "--to", to, "--img-size", "64", "--window-size", "4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no extra main-branch LayerNorm" in err and "norm3" in err
    assert not out.exists()


def test_timm_and_transformers_need_the_geometry_a_file_does_not_carry(tmp_path, capsys):
    save_file(SwinTransformerV2(num_classes=0, **MICRO).state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(SystemExit):
        convert([str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), "--to", "hf", "--img-size", "64"])
    assert "give --window-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert([str(tmp_path / "m.safetensors"), str(tmp_path / "t.pth"), "--to", "timm", "--img-size", "64",
                 "--window-size", "4"])
    assert "name the output *.safetensors" in capsys.readouterr().err
