"""Checkpoints in the run dir: engine state + per-rank client state, a `latest` marker, keep the last K.

A checkpoint counts only once `latest` names it; the marker is written by rank 0 after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint as the one to resume from.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.dist import DistContext
from pretrain.engine import Engine

log = logging.getLogger(__name__)

LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


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


class Checkpointer:
    def __init__(self, directory: Path, ctx: DistContext, keep_last: int):
        self.dir, self.ctx, self.keep_last = directory, ctx, keep_last

    def _client_file(self, tag: str, rank: int) -> Path:
        return self.dir / tag / f"client_rank{rank:05d}.pt"

    def latest_tag(self) -> str | None:
        marker = self.dir / LATEST
        return marker.read_text().strip() if marker.exists() else None

    def save(self, engine: Engine, step: int, client_state: dict[str, Any]) -> str:
        """Collective: every rank writes its shard and its own client state."""
        tag = step_tag(step)
        engine.save(self.dir, tag)
        torch.save({**client_state, "step": step, "rng": rng_state()}, self._client_file(tag, self.ctx.rank))
        dist.barrier()
        if self.ctx.is_main:
            tmp = self.dir / f"{LATEST}.tmp"
            tmp.write_text(tag)
            tmp.replace(self.dir / LATEST)
            self._prune()
            log.info("saved checkpoint %s", self.dir / tag)
        dist.barrier()
        return tag

    def saved_world_size(self, tag: str) -> int:
        return len(list((self.dir / tag).glob("client_rank*.pt")))

    def load(self, engine: Engine, tag: str) -> dict[str, Any]:
        """Collective: restore engine state, this rank's RNG, and return its client state.

        On another world size than the save's, the engine reshards its own state, the client state is rank
        0's with `loader` replaced by the list of every old rank's loader state (data.shards re-splits the
        stream from it), and a rank without an old counterpart keeps its freshly seeded RNG.
        """
        saved = self.saved_world_size(tag)
        if saved == 0:
            raise FileNotFoundError(f"checkpoint {self.dir / tag} has no client_rank*.pt files: incomplete?")
        engine.load(self.dir, tag)
        if saved == self.ctx.world_size:
            client = torch.load(self._client_file(tag, self.ctx.rank), weights_only=True)
            set_rng_state(client.pop("rng"))
            return client
        clients = [torch.load(self._client_file(tag, r), weights_only=True) for r in range(saved)]
        if self.ctx.rank < saved:
            set_rng_state(clients[self.ctx.rank]["rng"])
        old = OmegaConf.create(clients[0]["config"]).stage
        log.info("resuming %s on another world size: %d -> %d ranks; it was saved with global batch %d = micro "
                 "%d x accumulation %d x world %d", self.dir / tag, saved, self.ctx.world_size, old.global_batch,
                 old.micro_batch, old.global_batch // (old.micro_batch * saved), saved)
        client = {k: v for k, v in clients[0].items() if k != "rng"}
        client["loader"] = [c["loader"] for c in clients]
        return client

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.dir.glob("step_*") if p.is_dir())
        for old in tags[:-self.keep_last]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
