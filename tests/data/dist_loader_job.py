"""torchrun job for test_dist.py: 2 ranks x 2 workers over the demo shards.

  first  OUT SHARDS: 10 uninterrupted batches (reference), and a loader stopped after 4 whose state is saved
  resume OUT SHARDS: a fresh process restores that state and takes the next 6
Each rank writes OUT/<mode>-<rank>.json with per-batch (labels, image checksums).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from data.shards import build_loader
from data.transforms import SimMIMTransform


def batches(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        out.append(dict(label=b["label"].tolist(), image=b["image"].double().sum((1, 2, 3)).tolist(),
                        mask=b["mask"].sum().item()))
    return out


def main(mode, out, shards):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    make = lambda: build_loader(f"{shards}/train-{{000000..000007}}.tar",  # noqa: E731
                                sample_fn=SimMIMTransform(img_size=32, mask_patch_size=8, model_patch_size=4),
                                batch_size=4, rank=rank, world_size=world, num_workers=2, shuffle_buffer=16,
                                resampled=False, samples_per_epoch=192, seed=7, num_classes=10)
    result = {}
    if mode == "first":
        ref = make()
        result["reference"] = batches(ref, 10)
        result["batches_per_epoch"] = ref.batches_per_epoch
        stopped = make()
        batches(stopped, 4)
        with open(f"{out}/state-{rank}.json", "w") as f:
            json.dump(stopped.state_dict(), f)
    else:
        with open(f"{out}/state-{rank}.json") as f:
            state = json.load(f)
        loader = make()
        loader.load_state_dict(state)
        result["resumed"] = batches(loader, 6)
        result["stats"] = loader.stats()
    with open(f"{out}/{mode}-{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
