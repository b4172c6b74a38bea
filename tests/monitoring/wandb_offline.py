"""Read a wandb offline run (`run-<id>.wandb`) back: wandb 0.31 ships no Python reader for it.

The file is a LevelDB-log-style stream: a 7-byte header, then 32 KiB blocks of records, each framed by
crc32 (4 bytes), length (2, little-endian) and type (1 full, 2 first, 3 middle, 4 last); a block tail
shorter than a frame header is padding. Each assembled record is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7
BLOCK = 32 * 1024
FRAME = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pos, parts = [], FILE_HEADER, []
    while pos + FRAME <= len(data):
        if BLOCK - pos % BLOCK < FRAME:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + FRAME])
        if kind == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        parts.append(data[pos + FRAME : pos + FRAME + length])
        pos += FRAME + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


@dataclass
class OfflineRun:
    run_id: str
    group: str
    job_type: str
    config: dict
    history: list[dict] = field(default_factory=list)


def read_run(path: str | Path) -> OfflineRun:
    """The run's identity, config and history rows (keys joined with '/', values JSON-decoded)."""
    run = None
    history = []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            config = {item.key: json.loads(item.value_json) for item in r.config.update}
            run = OfflineRun(r.run_id, r.run_group, r.job_type, config)
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    assert run is not None, f"{path} holds no run record"
    run.history = history
    return run


def offline_runs(run_dir: str | Path) -> list[Path]:
    """Every offline run file under RUN_DIR/wandb, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
