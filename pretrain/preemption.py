"""Stop cleanly when SLURM warns that the job is about to end.

The batch script turns SLURM's warning signal into a SIGTERM for every rank (see scripts/slurm/); a rank
may also get SIGUSR1 directly. A signal handler can only set a flag, and ranks get the signal at slightly
different times, so the ranks agree once per step with an all-reduce: all of them finish the same step,
save the same checkpoint and return together.
"""

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    def __init__(self, signals=STOP_SIGNALS):
        self.signal_name = None  # the first signal received, for the log
        self._stop_agreed = False
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank once any rank got a stop signal. A collective: call it on all ranks each step."""
        if self._stop_agreed:
            return True
        local = self.signal_name is not None
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(local)], dtype=torch.int32, device=_collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = bool(flag.item())
        self._stop_agreed = local
        return local


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
