"""Webdataset shard streaming: split over ranks and workers, equal batches per rank, exact resume.

How a rank's batches are made
- The shards are split over G = world_size * max(num_workers, 1) streams; stream g = rank * W + worker.
  Normal mode: pass p over the data is a permutation of all shards (seeded by (seed, p)); stream g reads
  shards perm[g::G] of each pass, then goes on to the next pass. Resampled mode: stream g draws its k-th
  shard uniformly at random (seeded by (seed, g, k)), with replacement. Either way every stream is
  infinite, so no rank ever runs dry before another (a ZeRO-3 collective would hang).
- Shuffling is by blocks: `shuffle_buffer` raw (still encoded) samples are read and permuted with a
  generator seeded by (seed, g, block). Unlike a reservoir, a block can be rebuilt from where it started,
  which is what makes resume exact and cheap (at most one block of bytes is re-read, nothing is decoded).
- Each worker decodes, transforms and collates whole batches; the DataLoader takes them round-robin.
  Torch's and Python's RNGs are seeded per batch from (seed, g, batch index), so augmentations replay.
- Epochs are an accounting unit: every rank yields batches_per_epoch = samples_per_epoch // (world_size *
  batch_size) batches per epoch (the remainder, fewer than world_size * batch_size samples, is not dropped:
  the stream simply continues into the next epoch).
- Resuming on another world size (or number of workers): `load_state_dict` takes the list of every old
  rank's state. Old stream g is handed to new stream g mod G_new, which first replays it exactly from its
  saved position to the end of pass P - 1, where P is one past the furthest pass an old stream had begun;
  then every new stream reads pass P on with the new layout. So nothing is skipped, and the only repeats
  are samples of pass P that an old stream had already consumed from a shuffle block straddling the pass
  boundary (at most one shuffle block per old stream, none when blocks align with passes). The epoch and
  the global number of samples delivered carry over. Resampled streams have no passes: the new streams
  simply continue after the furthest old shard draw.

Labels: a stage that needs them (`labels=True`) takes a sample's label from its `.cls` member, else from the key
`label_key` of its `.json` member (parsed as JSON, never unpickled); a stage without labels (SimMIM) reads only
the image, so shards of bare images (jpg/jpeg/png/webp) serve it.

One pass (`one_pass()`, for evaluation): every stream reads its share of the shards once, in order, and ends
with a last batch that may be short; together the streams of all ranks read every sample exactly once.

Bad data never stops the run: an undecodable image (garbage bytes, zero bytes, no image member) is counted in
`bad_image`, a missing, non-integer or out-of-range label (where labels are needed) in `bad_label`, and a shard read that failed (missing
or deleted file, a pipe or URL that exits non-zero such as curl's 404, a tar that is truncated or garbage from
byte 0) in `shard_errors`, once per read, with a warning naming the shard; the samples read before the error are
used. `ShardLoader.stats()` sums the counts over workers in the main process. Only when a stream has opened at
least an epoch's worth of shards in a row (as many as the dataset has, and 64) without a single sample does it
fail, naming them.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Only these members are ever read from a tar: nothing in a shard is unpickled or executed.
READ_EXTS = frozenset(IMAGE_EXTS + ("cls", "json"))
COUNTERS = ("samples", "bad_image", "bad_label", "shard_errors")
MAX_BAD_RUN = 10_000  # unusable samples in a row after which the data itself, not a few files, is broken
# A stream fails after max(shards in the dataset, this) shard reads in a row without a sample: with even half of
# the shards alive, 64 dead reads in a row happen by chance with probability 2^-64.
MIN_EMPTY_RUN = 64

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- shard lists

def _is_local(url: str) -> bool:
    return not re.match(r"^[a-z0-9+]+:", url) or url.startswith("file:")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace pattern(s) (`a-{000..099}.tar`, several joined by `::`), a shard-list file (`*.txt`, one URL per
    line, relative paths relative to the file), or a list of those -> shard URLs. Local shards must exist."""
    if isinstance(urls, str):
        if urls.endswith(".txt") and _is_local(urls):
            if not os.path.isfile(urls):
                raise FileNotFoundError(f"shard-list file {urls!r} does not exist")
            base = os.path.dirname(urls)
            with open(urls) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            shards = [ln if not _is_local(ln) or os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        else:
            shards = [s for s in wds.shardlists.expand_urls(urls) if s.strip()]
    else:
        shards = [s for u in urls for s in expand_urls(u)]
    if not shards:
        raise ValueError(f"shard pattern {urls!r} matches no shards")
    missing = [s for s in shards if _is_local(s) and not os.path.exists(s.removeprefix("file:"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards of {urls!r} do not exist, "
                                f"first: {missing[0]!r}")
    return shards


# ------------------------------------------------------------------------------------- one stream's samples

@dataclass
class StreamState:
    """Where one stream (a rank's worker) stands after its last delivered batch."""
    stream: int  # logical worker index on this rank
    shard: int = 0  # index into the stream's shard sequence where the current block starts
    offset: int = 0  # raw samples of that shard before the block starts
    block: int = 0  # blocks started so far
    taken: int = 0  # samples of the current block already consumed
    batches: int = 0  # batches this stream has delivered
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    # Old-layout streams to finish first after a world-size change, each a dict of its own position
    # (g, num_streams, shard, offset, block, taken) and `end`, the shard index where its drain stops.
    drain: list = field(default_factory=list)


def _seed(*ints: int) -> int:
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


class _Stream:
    """The infinite, deterministic sample stream of global stream g (rank * W + worker)."""

    def __init__(self, shards: list[str], g: int, num_streams: int, seed: int, resampled: bool,
                 shuffle_buffer: int, counts: dict):
        self.shards, self.g, self.num_streams, self.seed = shards, g, num_streams, seed
        self.resampled, self.block_size, self.counts = resampled, max(shuffle_buffer, 1), counts
        self.per_pass = len(range(g, len(shards), num_streams))

    def shard_url(self, k: int) -> str:
        if self.resampled:
            return self.shards[np.random.default_rng([self.seed, self.g, k]).integers(len(self.shards))]
        perm = np.random.default_rng([self.seed, k // self.per_pass]).permutation(len(self.shards))
        return self.shards[perm[self.g + (k % self.per_pass) * self.num_streams]]

    def raw_samples(self, shard: int, offset: int) -> Iterator[tuple[int, int, dict]]:
        """(shard index, offset after this sample, sample) from shard `shard`, sample `offset` on."""
        empty: list[str] = []  # shards in a row that gave no sample: a stream that can never fill a batch must fail
        for k in range(shard, 2 ** 62):
            url, n, errors = self.shard_url(k), 0, []
            for n, sample in enumerate(_shard_samples(url, errors), 1):
                if k > shard or n > offset:
                    yield k, n, sample
            if errors:
                self.counts["shard_errors"] += 1
                log.warning("shard %s: read failed after %d samples (skipped, counted in data/shard_errors): %s",
                            url, n, _describe(errors[-1]))
            empty = [] if n else empty + [url]
            if len(empty) >= max(len(self.shards), MIN_EMPTY_RUN):
                names = sorted(set(empty))
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                last = _describe(errors[-1]) if errors else "none (the shards are empty)"
                raise RuntimeError(f"stream {self.g}: the last {len(empty)} shards it opened held no readable "
                                   f"sample: {shown}; last error: {last}")

    def blocks(self, state: StreamState, stop: int | None = None) -> Iterator[tuple[dict, StreamState]]:
        """Shuffled raw samples from `state` on, each with the position right after it; with `stop`, only
        samples of shards before index `stop`, ending once a block starts there."""
        src = self.raw_samples(state.shard, state.offset)
        start, block, taken = (state.shard, state.offset), state.block, state.taken
        while stop is None or start[0] < stop:
            items, end = [], start
            for k, off, sample in src:
                items.append((k, sample))
                end = (k, off)
                if len(items) == self.block_size:
                    break
            order = np.random.default_rng([self.seed, self.g, block]).permutation(len(items))
            for j in range(taken, len(items)):
                k, sample = items[order[j]]
                if stop is None or k < stop:
                    yield sample, (start, block, j + 1)
            # the next block starts where this one ended; `src` is already there
            start, block, taken = end, block + 1, 0


def _per_pass(g: int, num_streams: int, num_shards: int) -> int:
    return len(range(g, num_shards, num_streams))


def _shard_samples(url: str, errors: list[Exception]) -> Iterator[dict]:
    """The samples of one shard (only READ_EXTS members). What cannot be read is skipped, its error appended to
    `errors`: a missing file, an unreadable or truncated tar, a pipe that exits non-zero."""
    def skip(exn: Exception) -> bool:
        errors.append(exn)
        return True

    try:
        stream = wds.gopen(url)
    except Exception as exn:
        errors.append(exn)
        return
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], handler=skip, select_files=_readable)
        yield from group_by_keys(files, handler=skip)
    finally:
        try:
            stream.close()  # a pipe's exit status (curl's 404, a failed `aws s3 cp`) is only known here
        except Exception as exn:
            errors.append(exn)


def _describe(exn: Exception) -> str:
    return f"{type(exn).__name__}: {str(exn)[:300]}"


def _readable(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in READ_EXTS


def _parse_label(sample: dict, label_key: str, num_classes: int | None) -> int:
    if "cls" in sample:
        label = int(sample["cls"].decode().strip())
    elif label_key and "json" in sample:
        label = json.loads(sample["json"])[label_key]
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"json {label_key!r} is {label!r}, not an integer")
    else:
        raise KeyError("no label member")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} out of range")
    return label


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError("no image member")


# ------------------------------------------------------------------------------------------------- dataset

class _BatchStreams(IterableDataset):
    """Yields collated batches of one rank; each batch carries its stream's position under `_state`."""

    def __init__(self, shards, *, sample_fn, collate_fn, batch_size, rank, world_size, num_workers,
                 shuffle_buffer, resampled, seed, labels, label_key, num_classes):
        self.shards, self.sample_fn, self.collate_fn, self.batch_size = shards, sample_fn, collate_fn, batch_size
        self.rank, self.num_streams, self.shuffle_buffer = rank, max(num_workers, 1), shuffle_buffer
        self.world_size, self.resampled, self.seed = world_size, resampled, seed
        self.labels, self.label_key, self.num_classes = labels, label_key, num_classes
        self.states = [StreamState(stream=w) for w in range(self.num_streams)]
        self.rotation = 0  # physical worker i runs logical stream (i + rotation) % W
        self.one_pass = False  # True: each stream reads its shards of the first pass once, then ends

    def __iter__(self):
        info = get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.num_streams
        state = StreamState(**{**asdict(self.states[w]), "counts": dict(self.states[w].counts)})
        g = self.rank * self.num_streams + w
        samples = self._samples(state, g)
        while True:
            # torch, Python and numpy draw the augmentations (torchvision uses torch's generator, timm Python's
            # and numpy's): all three are seeded per batch and given back afterwards
            with torch.random.fork_rng(devices=[]):
                py_state, np_state = random.getstate(), np.random.get_state()
                torch.manual_seed(_seed(self.seed, g, state.batches))
                random.seed(_seed(self.seed, g, state.batches, 1))
                np.random.seed(_seed(self.seed, g, state.batches, 2))
                try:
                    batch = self._batch(samples, state.counts, g)
                finally:
                    random.setstate(py_state)
                    np.random.set_state(np_state)
            if batch is None:
                return
            state.batches += 1
            batch["_state"] = asdict(state)
            yield batch

    def _batch(self, samples: Iterator[dict], counts: dict, g: int) -> dict | None:
        """The next collated batch; short only at the end of a one-pass stream, None once that is used up."""
        batch, bad_run = [], 0
        while len(batch) < self.batch_size:
            sample = next(samples, None)
            if sample is None:
                break
            item = self._decode(sample, counts)
            if item is not None:
                batch.append(item)
                bad_run = 0
            elif (bad_run := bad_run + 1) >= MAX_BAD_RUN:
                raise RuntimeError(f"stream {g}: {bad_run} samples in a row were unusable (last "
                                   f"{sample.get('__key__')!r} in {sample.get('__url__')!r}); "
                                   f"loader.stats() counts why")
        return self.collate_fn(batch) if batch else None

    def _samples(self, state: StreamState, g: int) -> Iterator[dict]:
        """Stream g's samples (old-layout drains first), keeping `state` at the position after each."""
        while state.drain:
            d = state.drain[0]
            old = _Stream(self.shards, d["g"], d["num_streams"], self.seed, self.resampled, self.shuffle_buffer,
                          state.counts)
            at = StreamState(stream=-1, shard=d["shard"], offset=d["offset"], block=d["block"], taken=d["taken"])
            for sample, (start, block, taken) in old.blocks(at, stop=d["end"]):
                d.update(shard=start[0], offset=start[1], block=block, taken=taken)
                yield sample
            state.drain.pop(0)
        stream = _Stream(self.shards, g, self.world_size * self.num_streams, self.seed, self.resampled,
                         self.shuffle_buffer, state.counts)
        for sample, (start, block, taken) in stream.blocks(state, stop=stream.per_pass if self.one_pass else None):
            state.shard, state.offset, state.block, state.taken = *start, block, taken
            yield sample

    def _decode(self, sample: dict, counts: dict) -> dict | None:
        try:
            label = _parse_label(sample, self.label_key, self.num_classes) if self.labels else None
        except Exception:
            counts["bad_label"] += 1
            return None
        try:
            item = self.sample_fn(_image_bytes(sample))
        except Exception:
            counts["bad_image"] += 1
            return None
        counts["samples"] += 1
        if label is not None:
            item["label"] = torch.tensor(label, dtype=torch.int64)
        return item


# -------------------------------------------------------------------------------------------------- loader

class ShardLoader:
    """Never-ending iterator over one rank's batches; see the module docstring for the rules."""

    def __init__(self, dataset: _BatchStreams, *, num_workers: int, batches_per_epoch: int):
        self.dataset, self.num_workers, self.batches_per_epoch = dataset, num_workers, batches_per_epoch
        self.batches = 0  # delivered since the start of training
        self._it = None

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self.dataset.rotation = self.batches % self.dataset.num_streams
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                pin_memory=torch.cuda.is_available())
            self._it = iter(loader)
        batch = next(self._it)
        state = batch.pop("_state")
        self.dataset.states[state["stream"]] = StreamState(**state)
        self.batches += 1
        return batch

    def one_pass(self) -> Iterator[dict]:
        """This rank's batches of one unshuffled pass from the start (see the module docstring), each read
        exactly once over all ranks; the last batch of each stream may be short. The position of this loader's
        never-ending iteration is left as it was."""
        if self.dataset.shuffle_buffer > 1 or self.dataset.resampled:
            raise ValueError("one_pass needs an unshuffled, not resampled loader (shuffle_buffer <= 1)")
        kept = self.dataset.states
        self.dataset.states = [StreamState(stream=w) for w in range(self.dataset.num_streams)]
        self.dataset.one_pass, self.dataset.rotation = True, 0
        try:
            for batch in DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                    pin_memory=torch.cuda.is_available()):
                del batch["_state"]
                yield batch
        finally:
            self.dataset.states, self.dataset.one_pass = kept, False

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, batches=self.batches, seed=self.dataset.seed,
                    world_size=self.dataset.world_size, num_workers=self.num_workers,
                    batch_size=self.dataset.batch_size, streams=[asdict(s) for s in self.dataset.states])

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restore this rank's own saved state (same world size and workers: exact), or take the list of
        every rank's state from a run with another world size or worker count (see the module docstring)."""
        if isinstance(state, list):
            self._reshard(state)
            return
        mine = (self.dataset.seed, self.dataset.world_size, self.num_workers)
        theirs = (state["seed"], state["world_size"], state["num_workers"])
        if mine != theirs:
            raise ValueError(f"loader state is for (seed, world_size, num_workers) = {theirs}, this loader "
                             f"has {mine}: exact resume needs the same ones")
        self._it = None  # workers restart from the restored positions
        self.batches = state["batches"]
        self.dataset.states = [StreamState(**s) for s in state["streams"]]

    def _reshard(self, states: list[dict]) -> None:
        ds = self.dataset
        if len(states) != states[0]["world_size"] or any(s["seed"] != ds.seed for s in states):
            raise ValueError(f"loader states: expected one per old rank, all with seed {ds.seed}; got "
                             f"{len(states)} for world size {states[0]['world_size']}, seeds "
                             f"{sorted({s['seed'] for s in states})}")
        old = [s for rank_state in states for s in rank_state["streams"]]  # global old stream g = index
        old_g, new_g, n = len(old), ds.world_size * ds.num_streams, len(ds.shards)
        delivered = sum(s["batches"] * s["batch_size"] for s in states)
        self.batches = delivered // (ds.world_size * ds.batch_size)
        self._it = None
        if ds.resampled:
            first = 1 + max(s["shard"] for s in old)
            starts = {g: first for g in range(new_g)}
        else:  # one past the furthest pass any old stream has begun; drains stop where it starts
            next_pass = 1 + max(s["shard"] // _per_pass(g, old_g, n) for g, s in enumerate(old))
            starts = {g: next_pass * _per_pass(g, new_g, n) for g in range(new_g)}
        counts = {c: sum(s["counts"][c] for s in old) for c in COUNTERS}
        batches = max(s["batches"] for s in old)  # augmentation seeds go on past every old stream's
        ds.states = []
        for w in range(ds.num_streams):
            g = ds.rank * ds.num_streams + w
            drain = []
            for old_stream, s in enumerate(old):
                if old_stream % new_g == g and not ds.resampled:
                    drain += s["drain"] + [dict(g=old_stream, num_streams=old_g, shard=s["shard"], offset=s["offset"],
                                                block=s["block"], taken=s["taken"],
                                                end=next_pass * _per_pass(old_stream, old_g, n))]
            mine = counts if g == 0 else dict.fromkeys(COUNTERS, 0)  # cumulative stats stay summed over ranks
            ds.states.append(StreamState(stream=w, shard=starts[g], batches=batches, counts=dict(mine), drain=drain))

    def stats(self) -> dict:
        totals = {c: sum(s.counts[c] for s in self.dataset.states) for c in COUNTERS}
        totals["skipped_samples"] = totals["bad_image"] + totals["bad_label"]
        return dict(totals, batches=self.batches, epoch=self.epoch)


def shard_list(urls, *, world_size: int, num_workers: int, resampled: bool) -> list[str]:
    """expand_urls, and enough shards for every rank x worker stream to read its own (unless resampled)."""
    shards = expand_urls(urls)
    num_streams = world_size * max(num_workers, 1)
    if not resampled and len(shards) < num_streams:
        raise ValueError(f"{len(shards)} shards in {urls!r} are too few for {world_size} ranks x "
                         f"{max(num_workers, 1)} workers: at least {num_streams} are needed (write smaller "
                         f"shards, lower num_workers, or set resampled: true)")
    return shards


def build_loader(urls, *, sample_fn: Callable[[bytes], dict], batch_size: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, resampled: bool, samples_per_epoch: int, seed: int,
                 collate_fn=None, labels: bool = True, label_key: str = "label",
                 num_classes: int | None = None) -> ShardLoader:
    """One rank's loader. `sample_fn(image_bytes) -> dict of tensors` (a transform from data.transforms);
    with `labels`, `label` is added from `.cls` or from the `label_key` of `.json` (a sample with neither is
    counted as bad), and labels outside [0, num_classes) are counted as bad when num_classes is set."""
    shards = shard_list(urls, world_size=world_size, num_workers=num_workers, resampled=resampled)
    batches_per_epoch = samples_per_epoch // (world_size * batch_size)
    if batches_per_epoch < 1:
        raise ValueError(f"samples_per_epoch={samples_per_epoch} is less than one batch on every rank "
                         f"({world_size} ranks x batch {batch_size})")
    dataset = _BatchStreams(shards, sample_fn=sample_fn, collate_fn=collate_fn or default_collate,
                            batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                            shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed, labels=labels,
                            label_key=label_key, num_classes=num_classes)
    return ShardLoader(dataset, num_workers=num_workers, batches_per_epoch=batches_per_epoch)
