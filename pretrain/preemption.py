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
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def agree(self, skipped: bool | torch.Tensor = False) -> tuple[bool, bool]:
        """A collective, once per step on every rank: (skipped, stop), from one value read on the host.
        `skipped` is the engine's decision on the step's update, the same on every rank (maybe still on the
        device); `stop` is True on every rank once any rank got a stop signal, and stays True (the signal
        stays recorded). The two ride in one int32, 2 * stop + skipped: skipped is the same on every rank,
        so the all-reduce's MAX keeps it and takes the max of the stop bits."""
        flag = torch.full((), 2 * int(self.signal_name is not None), dtype=torch.int32, device=_collective_device())
        flag += skipped  # added on the device: the engine's flag is not read here
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = flag.item()
        return bool(value & 1), bool(value & 2)


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
