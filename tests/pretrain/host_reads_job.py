"""torchrun job for test_host_reads.py: launch/pretrain.py, with every read of a tensor's value on the host
counted per optimizer step of the training loop. A read is aten._local_scalar_dense, what `.item()`, `bool()`,
`float()` and `int()` of a tensor run (on a GPU each one waits for the device); a step runs from the loop's
first call (set_lr) to the next step's. The data pipeline's reads are left out: its tensors are on the host
(on a GPU they wait for nothing).

    torchrun --nproc_per_node=2 host_reads_job.py OUT [launch/pretrain.py overrides ...]

Rank r rewrites OUT/host_reads_rank<r>.json at every step: the reads of each finished step, in order.
"""
import json
import runpy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from pretrain import trainer

REPO = Path(__file__).resolve().parents[2]


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def count_steps(out: Path) -> None:
    reads, starts = HostReads(), []
    set_lr, next_batch = trainer.set_lr, trainer.next_batch

    def counted_set_lr(groups, lr):
        if not starts:
            reads.__enter__()  # from the first step on: building the engine reads values too, once
        starts.append(reads.count)
        per_step = [b - a for a, b in zip(starts, starts[1:])]
        (out / f"host_reads_rank{torch.distributed.get_rank()}.json").write_text(json.dumps(per_step))
        set_lr(groups, lr)

    def uncounted_next_batch(loader):
        with _disable_current_modes():
            return next_batch(loader)

    trainer.set_lr, trainer.next_batch = counted_set_lr, uncounted_next_batch


if __name__ == "__main__":
    count_steps(Path(sys.argv[1]))
    sys.argv = [str(REPO / "launch" / "pretrain.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
