"""Checkpoints in the run dir: engine state + per-rank client state, a `latest` marker, keep the last K.

The client state is the state of every part of the run that registered itself with `track(name, part)` (the
data loader, the step guard, the EMA, ...): each part's `state_dict()` is saved under its name and handed back
to its `load_state_dict` on resume or rollback, with the step and this rank's RNG.

A save writes into `<tag>.partial/`, which rank 0 renames to `<tag>/` and then names in `latest` once every
rank has written its part. A process killed mid-save leaves only a `.partial` folder, which nothing loads and
the next save removes; a save that fails (disk full, unwritable directory) fails on every rank together and
leaves `latest` and the older checkpoints as they were.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

from pretrain import process_group, rundir
from pretrain.process_group import DistContext
from pretrain.engine import Engine
from pretrain.engine.base import SaveFailed, write_error

log = logging.getLogger(__name__)

PARTIAL = ".partial"  # suffix of a checkpoint being written


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; `latest` and the older checkpoints are as they were."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class BatchLayout:
    """The batch arithmetic of a run, kept in its checkpoints so that a resume on another world size says how
    the batch it continues was made."""

    def __init__(self, global_batch: int, micro_batch: int, world_size: int):
        self.layout = {"global_batch": global_batch, "micro_batch": micro_batch, "world_size": world_size}

    def state_dict(self) -> dict[str, int]:
        return dict(self.layout)

    def load_state_dict(self, saved: dict[str, int] | None) -> None:
        if saved and saved["world_size"] != self.layout["world_size"]:
            g, m, w = saved["global_batch"], saved["micro_batch"], saved["world_size"]
            log.info("it was saved with global batch %d = micro %d x accumulation %d x world %d", g, m, g // (m * w), w)


def client_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"client_rank{rank:05d}.pt"


def read_client_states(tag_dir: Path) -> list[dict[str, Any]]:
    """Every rank's client state of one checkpoint, in rank order, on the CPU (no process group needed)."""
    saved = len(list(tag_dir.glob("client_rank*.pt")))
    return [torch.load(client_file(tag_dir, r), map_location="cpu", weights_only=True) for r in range(saved)]


class Checkpointer:
    def __init__(self, directory: Path, ctx: DistContext, keep_last: int):
        self.dir, self.ctx, self.keep_last = directory, ctx, keep_last
        self.parts: dict[str, Stateful] = {}
        self.per_rank: set[str] = set()

    def track(self, name: str, part: Stateful, *, reshards: bool = False) -> None:
        """Save `part` in every checkpoint and restore it on load. `reshards`: on a resume with another world
        size the part takes the list of every saved rank's state (the data loader re-splits its stream from
        them); any other part then takes rank 0's."""
        self.parts[name] = part
        if reshards:
            self.per_rank.add(name)

    def _client_file(self, tag: str, rank: int) -> Path:
        return client_file(self.dir / tag, rank)

    def latest_tag(self) -> str | None:
        return rundir.latest_tag(self.dir)

    def save(self, engine: Engine, step: int) -> str:
        """Collective: every rank writes its shard and its own client state into `<tag>.partial/`, then rank 0
        renames it to `<tag>/`, points `latest` at it and prunes. After each of the three phases the ranks agree
        on the outcome: if any rank's part failed, every rank raises CheckpointError."""
        tag = step_tag(step)
        partial = self.dir / f"{tag}{PARTIAL}"
        self._agree(tag, _failure(self._prepare, partial) if self.ctx.is_main else "")
        client = {**{name: part.state_dict() for name, part in self.parts.items()}, "step": step, "rng": rng_state()}
        self._agree(tag, self._write(engine, partial, client))
        self._agree(tag, _failure(self._commit, partial, tag) if self.ctx.is_main else "")
        log.info("saved checkpoint %s", self.dir / tag)
        return tag

    def _prepare(self, partial: Path) -> None:
        for stale in self.dir.glob(f"*{PARTIAL}"):  # what a save killed mid-way left
            shutil.rmtree(stale)
        partial.mkdir(parents=True)

    def _write(self, engine: Engine, partial: Path, client: dict[str, Any]) -> str:
        """This rank's part: "" or why it failed. Any other exception than a write error propagates at once."""
        try:
            engine.save(self.dir, partial.name)
        except SaveFailed as err:  # raised after the engine's collectives: the ranks can still agree
            return str(err)
        return _failure(self._write_client, client_file(partial, self.ctx.rank), client)

    @staticmethod
    def _write_client(path: Path, client: dict[str, Any]) -> None:
        with open(path, "wb") as f:  # a file object: see write_error
            torch.save(client, f)

    def _commit(self, partial: Path, tag: str) -> None:
        final = self.dir / tag
        if final.exists():  # an earlier save of this step that never became `latest`
            shutil.rmtree(final)
        partial.rename(final)
        tmp = self.dir / f"{rundir.LATEST}.tmp"
        tmp.write_text(tag)
        tmp.replace(self.dir / rundir.LATEST)
        self._prune()

    def _agree(self, tag: str, error: str) -> None:
        """Collective: raise CheckpointError on every rank if any rank brings an error."""
        failed = process_group.all_reduce_sum(torch.tensor(float(bool(error)), device=self.ctx.device))
        if not failed.item():
            return
        free_gb = _free_gb(self.dir)  # before rank 0 removes what the attempt wrote (after the gather)
        reasons = "; ".join(f"rank {r}: {e}" for r, e in enumerate(process_group.all_gather_object(error)) if e)
        if self.ctx.is_main:  # what the failed attempt wrote only takes space
            shutil.rmtree(self.dir / f"{tag}{PARTIAL}", ignore_errors=True)
        raise CheckpointError(f"checkpoint save to {self.dir / tag} failed ({reasons}); latest is still "
                              f"{self.latest_tag() or 'none'}; {free_gb:.3g} GB free there")

    def saved_world_size(self, tag: str) -> int:
        return len(list((self.dir / tag).glob("client_rank*.pt")))

    def load(self, engine: Engine, tag: str, parts: Iterable[str] | None = None) -> int:
        """Collective: restore the engine state, this rank's RNG and the tracked `parts` (default: all); the
        step saved.

        On another world size than the save's, the engine reshards its own state, a part that `reshards` takes
        every old rank's state and any other part rank 0's, and a rank without an old counterpart keeps its
        freshly seeded RNG.
        """
        saved = self.saved_world_size(tag)
        if saved == 0:
            raise FileNotFoundError(f"checkpoint {self.dir / tag} has no client_rank*.pt files: incomplete?")
        engine.load(self.dir, tag)
        if saved == self.ctx.world_size:
            client = torch.load(self._client_file(tag, self.ctx.rank), weights_only=True)
            states = {name: client.get(name) for name in self.parts}
        else:
            clients = read_client_states(self.dir / tag)
            client = clients[self.ctx.rank] if self.ctx.rank < saved else {}
            states = {name: [c[name] for c in clients] if name in self.per_rank else clients[0].get(name)
                      for name in self.parts}
            log.info("resuming %s on another world size: %d -> %d ranks", self.dir / tag, saved, self.ctx.world_size)
        if "rng" in client:
            set_rng_state(client["rng"])
        for name in self.parts if parts is None else parts:
            self.parts[name].load_state_dict(states[name])
        return tag_step(tag)

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL))
        for old in tags[:-self.keep_last]:
            shutil.rmtree(self.dir / old, ignore_errors=True)


def _failure(phase, *args) -> str:
    """Run one phase of a save on this rank: "" if it worked, else why not (for the ranks to agree on)."""
    try:
        phase(*args)
        return ""
    except (OSError, RuntimeError) as err:  # torch.save: see write_error
        return write_error(err)


def _free_gb(path: Path) -> float:
    while not path.exists():  # a first save may fail before the directory exists
        path = path.parent
    return shutil.disk_usage(path).free / 1e9
