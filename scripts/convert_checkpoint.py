"""Turn a training checkpoint or an export into weights in the official, timm or transformers layout.

    python scripts/convert_checkpoint.py SOURCE OUT [--to official|timm|hf] [--tag TAG] [--encoder-only]
        [--img-size N --window-size N --pretrained-window-sizes N N N N] [--labels FILE]

SOURCE is a run dir (runs/<experiment>/<stage>), a checkpoint root holding a `latest` file (the newest
complete tag is taken unless --tag names one), one tag folder, or an export: a weights file (`.safetensors`,
or a torch file read with weights_only=True; official, SimMIM, timm or transformers names) or a transformers
folder (config.json + model.safetensors).

--to official (default): OUT.pt / OUT.pth holds `{"model": state_dict}` like the official
microsoft/Swin-Transformer checkpoints, OUT.safetensors the same state dict without pickle; names are the
model's own: a SimMIM run keeps `encoder.*` / `decoder.*`, and `--encoder-only` writes the bare encoder (no
decoder, no mask token), which `models.swinv2.load_pretrained` reads into a plain SwinTransformerV2.
--to timm: OUT.safetensors in timm's `swinv2_*` layout; the `timm.create_model` call that loads it is printed.
--to hf: OUT is a folder (config.json + model.safetensors) for transformers' Swinv2ForImageClassification,
or Swinv2Model (AutoModel) for a headless model.
timm and transformers hold a classifier or a bare backbone, so a SimMIM run is exported as its encoder. Their
config needs the image size and window a weights file does not carry: they come from the run's config.yaml
or the transformers config.json, and --img-size / --window-size / --pretrained-window-sizes set or override
them. What a layout cannot express (the H/G extra norm, the linear-spaced CPB) is refused in one line.

Formats are told apart by the files in the tag folder (`pretrain.rundir.checkpoint_engine` names the engine
whose `read_weights` merges it, the one place a new engine's format is added). DeepSpeed's reader unpickles its
own files with weights_only=False, so `read_weights` first checks every file of the tag folder
(pretrain.safe_load): a file crafted to run code is refused, named, and nothing is written.
"""

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models import layouts
from pretrain import rundir
from pretrain.engine import engine_class

StateDict = dict[str, torch.Tensor]


def resolve_tag_dir(path: Path, tag: str | None) -> Path:
    """The folder of one checkpoint: `path/<tag>`, `path/<contents of path/latest>`, or `path` itself,
    with `path` first moved to a run dir's checkpoint folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if rundir.checkpoint_dir(path).is_dir():
        path = rundir.checkpoint_dir(path)
    tag = tag or rundir.latest_tag(path)
    tag_dir = path / tag if tag else path
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint tag folder {tag_dir} does not exist")
    return tag_dir


def load_fp32_state_dict(path: Path, tag: str | None = None) -> StateDict:
    tag_dir = resolve_tag_dir(path, tag)
    engine = engine_class(rundir.checkpoint_engine(tag_dir))
    return engine.read_weights(tag_dir.parent, tag_dir.name)


def is_export(path: Path) -> bool:
    return path.is_file() or (path / layouts.HF_CONFIG).is_file()


def read_source(path: Path, tag: str | None) -> tuple[StateDict, dict]:
    """The source's state dict (official names) and the geometry its config records: `model.*` of the run's
    config.yaml, or a transformers config.json; empty for a bare weights file."""
    if is_export(path):
        state_dict = layouts.read_weights(path)
        if isinstance(state_dict.get("model"), dict):
            state_dict = state_dict["model"]
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in layouts.to_official(state_dict).items()}
        if path.is_dir():
            return state_dict, layouts.arch_from_hf_config(json.loads((path / layouts.HF_CONFIG).read_text()))
        return state_dict, {}
    state_dict = load_fp32_state_dict(path, tag)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / rundir.CONFIG_FILE).is_file():
            model = OmegaConf.to_container(OmegaConf.load(folder / rundir.CONFIG_FILE)).get("model") or {}
            return state_dict, {k: model[k] for k in GEOMETRY if k in model}
    return state_dict, {}


def to_official_layout(state_dict: StateDict, encoder_only: bool) -> StateDict:
    is_simmim = any(k.startswith("encoder.") for k in state_dict)
    stem = "encoder.patch_embed." if is_simmim else "patch_embed."
    if not any(k.startswith(stem) for k in state_dict):
        raise ValueError(f"not a SwinV2 or SimMIM state dict (no '{stem}*' key); first keys: "
                         f"{list(state_dict)[:5]}")
    if not encoder_only:
        return state_dict
    if not is_simmim:
        raise ValueError("--encoder-only needs a SimMIM checkpoint (keys 'encoder.*'); this one is "
                         "already a bare SwinV2")
    from models.simmim import encoder_state_dict

    return encoder_state_dict(state_dict)


# What a weights file does not tell and timm / transformers configs need (SwinTransformerV2 arguments).
GEOMETRY = ("img_size", "window_size", "pretrained_window_sizes", "cpb_coords")


def architecture(state_dict: StateDict, geometry: dict) -> dict:
    """SwinTransformerV2 arguments of a bare official state dict: the shapes from its weights, the geometry
    from `geometry` (img_size and window_size are required)."""
    missing = [k for k in ("img_size", "window_size") if k not in geometry]
    if missing:
        raise ValueError(f"the image size and window are not in this source's config: give "
                         f"{' and '.join('--' + k.replace('_', '-') for k in missing)}")
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.blocks.") for k in state_dict):
        i = len(depths)
        depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{i}.blocks.")}))
    proj, fc1 = state_dict["patch_embed.proj.weight"], state_dict["layers.0.blocks.0.mlp.fc1.weight"]
    return {"img_size": geometry["img_size"], "patch_size": proj.shape[-1], "in_chans": proj.shape[1],
            "embed_dim": proj.shape[0], "depths": depths,
            "num_heads": [state_dict[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0] for i in range(len(depths))],
            "window_size": geometry["window_size"],
            "pretrained_window_sizes": list(geometry.get("pretrained_window_sizes") or [0] * len(depths)),
            "mlp_ratio": fc1.shape[0] / fc1.shape[1]}


def read_labels(path: Path | None, num_classes: int) -> list[str] | None:
    """One class name per line of `path` (default LABEL_i, transformers' own default); None without a head."""
    if num_classes == 0:
        return None
    if path is None:
        return [f"LABEL_{i}" for i in range(num_classes)]
    labels = path.read_text().strip().splitlines()
    if len(labels) != num_classes:
        raise ValueError(f"--labels {path}: {len(labels)} lines, but the head has {num_classes} classes")
    return labels


def replace_atomically(out: Path, write) -> None:
    """write(tmp), then rename: never a half-written file under the final name."""
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    tmp.replace(out)


def convert(path: Path, out: Path, *, to: str = "official", tag: str | None = None, encoder_only: bool = False,
            geometry: dict | None = None, labels: Path | None = None) -> str:
    """Write `out`; returns what was written, in one line for the user."""
    state_dict, recorded = read_source(path, tag)
    geometry = {**recorded, **(geometry or {})}
    if to != "official" and any(k.startswith("encoder.") for k in state_dict):
        encoder_only = True  # the other libraries hold a classifier or a backbone, never our decoder
    state_dict = to_official_layout(state_dict, encoder_only)
    if to != "official":
        reason = layouts.inexpressible(state_dict, to, geometry.get("cpb_coords", "log"))
        if reason:
            raise ValueError(reason)
        arch = architecture(state_dict, geometry)
        num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if to == "hf":
        names = read_labels(labels, num_classes)
        out.mkdir(exist_ok=True)
        replace_atomically(out / layouts.HF_WEIGHTS, lambda tmp: layouts.save_safetensors(
            layouts.from_official(state_dict, "hf"), tmp, metadata={"format": "pt"}))
        replace_atomically(out / layouts.HF_CONFIG, lambda tmp: tmp.write_text(
            json.dumps(layouts.hf_config(arch, names), indent=2) + "\n"))
        model = "Swinv2ForImageClassification" if names else "AutoModel (Swinv2Model)"
        return f"{model}.from_pretrained({str(out)!r})"
    if to == "timm":
        if out.suffix != ".safetensors":
            raise ValueError(f"--to timm writes safetensors: name the output *.safetensors, not {out.name}")
        replace_atomically(out, lambda tmp: layouts.save_safetensors(layouts.from_official(state_dict, "timm"), tmp))
        name, kwargs = layouts.timm_model_args(arch, num_classes)
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}, "
                f"num_classes={num_classes}){args})")
    if out.suffix == ".safetensors":
        replace_atomically(out, lambda tmp: layouts.save_safetensors(state_dict, tmp))
    else:
        replace_atomically(out, lambda tmp: torch.save({"model": state_dict}, tmp))
    numel = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    return f"{len(state_dict)} tensors, {numel:,} floats"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="run dir, checkpoint root (with 'latest'), one tag folder, a weights file or a "
                             "transformers folder")
    parser.add_argument("out", type=Path, help="output file (.pt/.pth/.safetensors; timm: .safetensors) or, "
                                               "for --to hf, folder")
    parser.add_argument("--to", choices=layouts.LAYOUTS, default="official", help="layout to write")
    parser.add_argument("--tag", help="tag folder under the checkpoint root (default: the 'latest' one)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="write the bare SwinV2 encoder of a SimMIM checkpoint")
    parser.add_argument("--img-size", type=int, help="image size the weights were trained at (timm, hf)")
    parser.add_argument("--window-size", type=int, help="window size the weights were trained at (timm, hf)")
    parser.add_argument("--pretrained-window-sizes", type=int, nargs="+",
                        help="per stage, the window of the position bias' pretraining (timm, hf; default 0s)")
    parser.add_argument("--labels", type=Path, help="class names, one a line, for the transformers config")
    args = parser.parse_args(argv)
    geometry = {k: getattr(args, k) for k in GEOMETRY[:3] if getattr(args, k) is not None}
    try:
        what = convert(args.checkpoint, args.out, to=args.to, tag=args.tag, encoder_only=args.encoder_only,
                       geometry=geometry, labels=args.labels)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {args.out}: {what}")


if __name__ == "__main__":
    main()
