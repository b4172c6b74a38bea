"""torchrun job, 2 ranks: rank 1 hangs; rank 0's first collective times out and the error is dropped (as an
unread prefetch's would be), so the job ends on its next collective, which gloo fails with the pair closure.

    torchrun --nproc_per_node=2 gloo_timeout_job.py TIMEOUT_S
"""
import sys
import time

import torch
import torch.distributed as dist

from pretrain import process_group

timeout_s = float(sys.argv[1])
process_group.init(timeout_s)
if dist.get_rank() == 1:
    time.sleep(10 * timeout_s)  # hung: no collective, no report
with process_group.peer_failures_named(timeout_s):
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as err:
        print(f"dropped: {err}", flush=True)
    dist.all_reduce(torch.ones(1))
