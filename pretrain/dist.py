"""Distributed context: torchrun, SLURM srun, or one plain process, all seen through torchrun's variables."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* when torchrun did not.

    Under `srun python launch/pretrain.py` SLURM gives one task per rank; rank 0 runs on the node that
    launched the step. Without either we are a single process.
    """
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        env = {
            "RANK": os.environ["SLURM_PROCID"],
            "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"),
            # every task derives the same port from the job id
            "MASTER_PORT": str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000),
        }
    else:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key, value in env.items():
        os.environ.setdefault(key, value)


def world_size_from_env() -> int:
    return int(os.environ["WORLD_SIZE"])


def init(timeout_min: int = 30) -> DistContext:
    """Start the process group (NCCL on GPUs, gloo on CPU)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_min))
    return DistContext(rank, world, local_rank, device)


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        # Tear down together: a rank that destroys its gloo group while a peer is still in its last
        # collective or save can abort at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
