"""Refuse checkpoint and weights files that would run code when unpickled, before any library unpickles them.

`torch.load(weights_only=True)` rebuilds only tensors, plain containers and allow-listed classes: a file crafted
with a `__reduce__` payload fails it instead of running. The libraries we hand checkpoints to are less careful:
DeepSpeed 0.19.8 `torch.load`s its own files with weights_only=False (engine load, zero_to_fp32, ds_to_universal,
the universal loader), and torch.distributed.checkpoint 2.14 `pickle.load`s `.metadata` and `torch.load`s
non-tensor entries with weights_only=False. So every file of a checkpoint folder is checked here first, and a
file that fails is named in an UnsafeFileError before anything is loaded.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

DCP_METADATA = ".metadata"
# What torch 2.14's DCP pickles into .metadata besides its metadata dataclasses and torch dtypes.
_DCP_GLOBALS = {("pathlib", "PosixPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                (_StorageInfo.__module__, _StorageInfo.__name__)}


class UnsafeFileError(ValueError):
    """A file does not load as plain weights: it would run code, or cannot be checked."""


def _refusal(path: Path, err: Exception) -> UnsafeFileError:
    lines = str(err).splitlines()
    reason = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else repr(err))
    return UnsafeFileError(f"{path}: refused to load, not plain weights (torch.load weights_only=True): {reason}")


def check_torch_file(path: Path, allowed: Sequence[type] = ()) -> None:
    """Raise UnsafeFileError unless `path` loads with weights_only=True (plus the `allowed` plain-data classes).
    Tensors are memory-mapped, not read: the check costs one unpickling of the file's small index."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a file that cannot be checked is refused too
        raise _refusal(path, err) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (builtins.exec, os.system, ...) is refused before it is imported."""

    def find_class(self, module: str, name: str):
        allowed = ((module, name) in _DCP_GLOBALS
                   or (module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type))
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def check_dcp(folder: Path) -> None:
    """A torch.distributed.checkpoint folder: `.metadata` holds only DCP's own types, and every non-tensor
    entry (pickled by torch.save) loads with weights_only=True."""
    path = folder / DCP_METADATA
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except Exception as err:
        raise UnsafeFileError(f"{path}: refused to load, not plain checkpoint metadata: {err}") from None
    for fqn, entry in meta.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.BytesStorageMetadata):
            continue
        info = meta.storage_data[dcp_metadata.MetadataIndex(fqn)]
        where = f"{folder / info.relative_path} (entry {fqn})"
        if info.transform_descriptors:  # our engine never writes transformed (e.g. compressed) entries
            raise UnsafeFileError(f"{where}: refused to load, transformed entry {info.transform_descriptors}")
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = io.BytesIO(f.read(info.length))
        try:
            torch.load(data, map_location="cpu", weights_only=True)
        except Exception as err:
            raise _refusal(Path(where), err) from None


def check_checkpoint(folder: Path, allowed: Sequence[type] = ()) -> None:
    """Every torch file under a checkpoint tag folder (engine shards, client states, a universal conversion)
    and its DCP metadata, if any. Raises UnsafeFileError naming the first file that fails."""
    for path in sorted(folder.rglob("*.pt")):
        check_torch_file(path, allowed)
    if (folder / DCP_METADATA).is_file():
        check_dcp(folder)
