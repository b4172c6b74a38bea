"""torchrun job for test_exit.py: a short DeepSpeed job (nan_skip_job's: ZeRO-3 engine, one training step, a
checkpoint save, shutdown) REPEATS times, each in a process of its own that ends as launch/pretrain.py does
(process_group.exit_process). The processes are forked from this one, which imported everything once: the imports cost
more than the job. Rank r writes OUT/exits_rank<r>.json: each repeat's exit code (negative: the signal that
ended it, e.g. -6 for SIGABRT).

    torchrun --nproc_per_node=2 exit_job.py OUT REPEATS
"""
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as tdist

from nan_skip_job import main as short_job
from pretrain import process_group


def repeat(out: Path, i: int) -> None:
    """In the forked process: its own process group (a file store per repeat), the job, the launcher's exit."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tdist.init_process_group("gloo", init_method=f"file://{out}/store{i}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=300))
    short_job(out / f"job{i}", "deepspeed", ["0"], [])
    process_group.exit_process(0)


def main(out: Path, repeats: int) -> None:
    codes = []
    for i in range(repeats):
        pid = os.fork()
        if pid == 0:
            try:
                repeat(out, i)
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    (out / f"exits_rank{os.environ['RANK']}.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
