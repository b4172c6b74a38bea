"""Distributed context: torchrun, SLURM srun, or one plain process, all seen through torchrun's variables."""
from __future__ import annotations

import atexit
import faulthandler
import os
import re
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, NoReturn

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


def init(timeout_s: float = 1800) -> DistContext:
    """Start the process group (NCCL on GPUs, gloo on CPU). A collective that waits longer than `timeout_s`
    for a peer fails, so a dead or hung rank stops the job instead of hanging it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # A native abort (gloo, DeepSpeed's C++ ops) then prints every thread's Python stack. torchrun's @record
    # does this for launch/pretrain.py; this covers every other script that starts a process group.
    faulthandler.enable(all_threads=True)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, device)


class PeerFailure(RuntimeError):
    """A collective failed; the message says which ranks stopped answering and what the others reported."""


# How long a rank whose collective failed waits for its peers' reports (at most half the collective timeout).
# Peers of a hung rank time out within moments of each other, and peers of a dead one fail at once (each
# failed rank closes its connections), so a few seconds suffice; torchrun kills the survivors of a rank's
# death 30 s after it.
PEER_REPORT_WAIT_S = 10.0
_COLLECTIVE = "collective failed"
_GLOO_SIGNS = ("gloo", "Application timeout caused pair closure")


def _collective_failure(err: BaseException | None) -> BaseException | None:
    """The failed collective behind `err`, if any: it may be the context of a later error, e.g. the data
    loader's "worker killed" that torchrun's teardown of this rank raises while the first one propagates."""
    while err is not None:
        # NCCL and the stores raise torch's DistError, gloo plain RuntimeErrors that name its source file, except
        # the pair closure it signals to every later operation of a group once one of them timed out
        if isinstance(err, dist.DistError) or any(sign in str(err) for sign in _GLOO_SIGNS):
            return err
        err = err.__context__
    return None


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = re.sub(r"^\[\S+:\d+\] ", "", lines[0]) if lines else ""  # gloo's "[.../pair.cc:545] " prefix
    return f"{type(err).__name__}: {first}"[:300]


@contextmanager
def peer_failures_named(timeout_s: float) -> Iterator[None]:
    """Turn a failed collective into an error that names the ranks that stopped.

    Any exception on a rank is posted to the process group's store, which torchrun's agent serves (so it
    outlives the ranks). A rank whose collective failed (a peer died, or hung past the collective timeout)
    closes its process group, which makes its own peers fail at once instead of at their timeout, and waits a
    few seconds for every rank's post: a rank that raised is named with its error, one that posts nothing as
    killed, stopped or hung.
    """
    try:
        yield
    except Exception as err:
        if not dist.is_initialized():
            raise
        collective = _collective_failure(err)
        if collective is None:
            _post(_one_line(err))
            raise
        raise PeerFailure(f"rank {dist.get_rank()}: a collective failed ({_one_line(collective)}). "
                          f"{_peer_reports(min(timeout_s / 2, PEER_REPORT_WAIT_S))}") from err


def _store() -> dist.Store:
    store = dist.distributed_c10d._get_default_store()  # no public accessor
    store.set_timeout(timedelta(seconds=PEER_REPORT_WAIT_S))  # a hung store host must not hang us
    return store


def _post(report: str) -> None:
    try:
        _store().set(f"fault/{dist.get_rank()}", report)
    except RuntimeError:  # torch's DistStoreError, DistNetworkError
        pass  # the store's host is gone: the peers name this rank as silent


def _peer_reports(wait_s: float) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    # torchrun may be ending this rank (SIGTERM to its process group): the data loader's workers then die, and
    # its SIGCHLD handler would raise in the middle of the report
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        store = _store()
        _post(_COLLECTIVE)
        dist.destroy_process_group()
        keys = {r: f"fault/{r}" for r in range(world) if r != rank}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(list(keys.values())):
            time.sleep(0.1)
        reported = {r: store.get(key).decode() for r, key in keys.items() if store.check([key])}
    except RuntimeError as err:  # the store's host (rank 0 outside torchrun) may be the rank that stopped
        return f"Could not collect the peers' reports: {_one_line(err)}"
    silent = [r for r in keys if r not in reported]
    parts = [f"rank {r} failed: {what}" for r, what in reported.items() if what != _COLLECTIVE]
    if silent:
        parts.append(f"{_ranks(silent)} sent no report within {wait_s:g} s: killed, stopped or hung")
    return "; ".join(parts) or "Every peer saw the failure too."


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def barrier() -> None:
    dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_object(obj: object) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        # Tear down together: a rank that destroys its gloo group while a peer is still in its last
        # collective or save can abort at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def exit_process(status: object = 0) -> NoReturn:
    """End this process as `sys.exit(status)` would, but without the interpreter's finalization.

    DeepSpeed keeps its gloo process groups referenced after destroy_process_group() (module hooks and each
    parameter's ds_process_group hold them), so their worker threads outlive `shutdown()`. When such a thread
    drops the last reference to a finished work item during finalization, freeing its tensors needs the GIL,
    which a finalizing interpreter no longer grants: the thread is ended and C++ calls std::terminate
    ("terminate called without an active exception", SIGABRT), now and then, after all the work was done
    (pytorch/pytorch#179291). The exit handlers still run (wandb's service, data loader workers, logging),
    then the streams are flushed and the process ends with the status its work earned.
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:  # sys.exit's message form
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
