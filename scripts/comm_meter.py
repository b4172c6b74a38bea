"""Count the bytes a process passes to torch.distributed collectives, by phase, collective and dtype.

A TorchDispatchMode sees every c10d op the engines issue (DeepSpeed's all-gathers and reduce-scatters,
FSDP2's, plain dist.all_reduce) and the functional collectives DTensor issues (FSDP2's gradient-norm
reduction); the ops still run as they would, so the traffic is the real one, on any backend. torch's own
CommDebugMode counts calls the same way; this one counts bytes.

The size of a collective is that of the whole tensor it assembles or reduces: the output of an all-gather
(world x the input), the input of a reduce-scatter, the tensor of an all-reduce or broadcast. A ring moves
(world - 1) / world of it in and out of each rank (scripts/plan_step.py).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# op name -> (kind, index of the argument holding the whole tensor(s))
COLLECTIVES = {
    "c10d::_allgather_base_": ("all_gather", 0),
    "c10d::allgather_": ("all_gather", 0),
    "c10d::allgather_coalesced_": ("all_gather", 0),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor": ("all_gather", None),  # input, times group_size (argument 1)
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", 0),
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "_c10d_functional::all_reduce": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced": ("all_reduce", 0),
    "c10d::broadcast_": ("broadcast", 0),
    "_c10d_functional::broadcast": ("broadcast", 0),
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


class CollectiveMeter(TorchDispatchMode):
    """`bytes[(phase, kind, dtype)]` of the collectives run while the meter is entered.
    Unknown collectives (barriers, point-to-point) are counted under their op name, so none go unseen."""

    def __init__(self):
        super().__init__()
        self.phase = ""
        self.bytes: dict[tuple[str, str, str], int] = defaultdict(int)

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        outer, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor dispatches again with plain tensors, which this mode then sees
        # wait_tensor and _wrap_tensor_autograd are the functional collectives' bookkeeping, not traffic
        if func.namespace in ("c10d", "_c10d_functional") and not func.name().endswith(("wait_tensor", "_autograd")):
            self._count(func.name(), args)
        return func(*args, **(kwargs or {}))

    def _count(self, name: str, args: tuple) -> None:
        kind, index = COLLECTIVES.get(name, (name, 0))
        tensors = [t for t in tree_leaves(args[0 if index is None else index]) if isinstance(t, torch.Tensor)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if index is None:
            size *= args[1]
        self.bytes[self.phase, kind, dtype_name(tensors[0].dtype) if tensors else ""] += size

    def reset(self) -> None:
        self.bytes.clear()
