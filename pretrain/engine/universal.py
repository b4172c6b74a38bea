"""DeepSpeed checkpoints across world sizes.

A ZeRO checkpoint holds one optimizer partition per data-parallel rank and only loads on the world size
that wrote it. When the world size differs, rank 0 converts the tag once into a universal checkpoint
(DeepSpeed's own `ds_to_universal`, with `--inject_missing_state` because our engine does not record
universal-checkpoint info at save time) in `<tag>/universal/`, which DeepSpeed loads on any world size with
`checkpoint.load_universal`. The conversion lives inside the tag folder, so pruning old tags removes it too.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

UNIVERSAL = "universal"


def saved_world_size(tag_dir: Path) -> int:
    """Data-parallel ranks that wrote this ZeRO tag (one optimizer partition file each)."""
    return len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")))


def convert_to_universal(tag_dir: Path) -> Path:
    """Write `tag_dir/universal` (once; atomically, so a crash mid-way is redone) and return it."""
    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = tag_dir / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # ds_to_universal prints every step and file, and progress bars
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except Exception:
        log.error("ds_to_universal failed on %s; its output:\n%s", tag_dir, chatter.getvalue()[-4000:])
        raise
    tmp.rename(out)
    return out


def universal_checkpoint(tag_dir: Path) -> tuple[Path, str]:
    """Collective: rank 0 converts `tag_dir`; every rank gets (load_dir, tag) of the universal checkpoint."""
    if dist.get_rank() == 0:
        log.info("converting %s (saved on %d ranks) to a universal checkpoint for %d ranks", tag_dir,
                 saved_world_size(tag_dir), dist.get_world_size())
        convert_to_universal(tag_dir)
    dist.barrier()
    return tag_dir, UNIVERSAL


def repair_after_load(zero_optimizer, group_settings: list[dict]) -> None:
    """Undo two things DeepSpeed 0.19's universal load gets wrong for an optimizer with several groups:
    it copies group 0's settings (weight decay, our lr_scale and family) onto every group, and it gives
    every group's AdamW state one shared `step` tensor, which each group's update then increments (so
    group k's bias correction runs k steps ahead)."""
    for group, settings in zip(zero_optimizer.param_groups, group_settings):
        group.update(settings)
    for state in zero_optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
