"""Turn a sharded training checkpoint into one fp32 file in the official SwinV2 layout.

    python scripts/convert_checkpoint.py CHECKPOINT OUT.pt [--tag TAG] [--encoder-only]

CHECKPOINT is a run dir (runs/<experiment>/<stage>), a checkpoint root holding a `latest` file (the
newest complete tag is taken unless --tag names one), or one tag folder. OUT.pt holds
`{"model": state_dict}` like the official microsoft/Swin-Transformer checkpoints, with the model's own
names: a SimMIM run keeps `encoder.*` / `decoder.*`, and `--encoder-only` writes the bare encoder (no
decoder, no mask token) instead, which `models.swinv2.load_pretrained` reads into a plain
SwinTransformerV2.

Formats are told apart by the files in the tag folder; `ENGINE_OF_FORMAT` names the engine whose
`read_weights` merges it, the one place a new engine's format is added. DeepSpeed's reader unpickles its
own files with weights_only=False, so `read_weights` first checks every file of the tag folder
(pretrain.safe_load): a file crafted to run code is refused, named, and nothing is written.
"""

import argparse
from pathlib import Path

import torch

from pretrain import rundir
from pretrain.engine import engine_class

StateDict = dict[str, torch.Tensor]


# Checkpoint format (told apart by its files) -> the engine that writes it; each engine's static
# `read_weights(directory, tag)` merges its shards into one fp32 state dict without a process group.
ENGINE_OF_FORMAT = {
    "deepspeed": "deepspeed",  # any ZeRO stage, via deepspeed.utils.zero_to_fp32
    "dcp": "fsdp",  # torch.distributed.checkpoint
}


def detect_format(tag_dir: Path) -> str:
    if (tag_dir / ".metadata").is_file():
        return "dcp"
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*model_states.pt")):
        return "deepspeed"
    raise ValueError(f"{tag_dir} is not a checkpoint: expected DeepSpeed '*model_states.pt' + "
                     "'*optim_states.pt' files or a torch.distributed.checkpoint '.metadata' file")


def resolve_tag_dir(path: Path, tag: str | None) -> Path:
    """The folder of one checkpoint: `path/<tag>`, `path/<contents of path/latest>`, or `path` itself,
    with `path` first moved to a run dir's checkpoint folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if rundir.checkpoint_dir(path).is_dir():
        path = rundir.checkpoint_dir(path)
    if tag is None and (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
    tag_dir = path / tag if tag else path
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint tag folder {tag_dir} does not exist")
    return tag_dir


def load_fp32_state_dict(path: Path, tag: str | None = None) -> StateDict:
    tag_dir = resolve_tag_dir(path, tag)
    engine = engine_class(ENGINE_OF_FORMAT[detect_format(tag_dir)])
    return engine.read_weights(tag_dir.parent, tag_dir.name)


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


def convert(path: Path, out: Path, *, tag: str | None = None, encoder_only: bool = False) -> StateDict:
    state_dict = to_official_layout(load_fp32_state_dict(path, tag), encoder_only)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": state_dict}, tmp)
    tmp.replace(out)  # never leave a half-written file under the final name
    return state_dict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="run dir, checkpoint root (with 'latest') or one tag folder")
    parser.add_argument("out", type=Path, help="output .pt file")
    parser.add_argument("--tag", help="tag folder under the checkpoint root (default: the 'latest' one)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="write the bare SwinV2 encoder of a SimMIM checkpoint")
    args = parser.parse_args(argv)
    try:
        state_dict = convert(args.checkpoint, args.out, tag=args.tag, encoder_only=args.encoder_only)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    numel = sum(v.numel() for v in state_dict.values() if v.is_floating_point())
    print(f"wrote {args.out}: {len(state_dict)} tensors, {numel:,} floats")


if __name__ == "__main__":
    main()
