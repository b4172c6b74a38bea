"""A bad configuration stops the real launcher before anything starts: one line `config error: <key>: ...`,
a non-zero exit, and no run directory (no process group, model, loader or log was made)."""
import re

import pytest

from tests.pretrain.test_training import command, shards  # noqa: F401 (the fixture)
from tests.torchrun import run


def refused(shards, run_root, stage: str, *overrides: str, torchrun: bool = False) -> list[str]:  # noqa: F811
    """The launcher's `config error:` lines; asserts the exit was non-zero and nothing was written."""
    cmd, env = command(shards, run_root, stage, *overrides, torchrun=torchrun)
    returncode, output = run(cmd, env, timeout=180)
    errors = [line for line in output.splitlines() if line.startswith("config error: ")]
    assert returncode != 0 and errors, output[-3000:]
    assert not (run_root / "demo").exists()
    return errors


@pytest.mark.parametrize("override, message", [
    ("stage.mask_ratoi=0.5", "stage.mask_ratoi: Key 'mask_ratoi' not in 'SimMIMStageConfig'"),
    ("stage.steps=ten", "stage.steps: Value 'ten' of type 'str' could not be converted to Integer"),
    ("stage.micro_batch=3", "stage.global_batch: 8 is not a multiple of micro_batch x world = 3 x 1"),
    ("data.samples_per_epoch=1", "data.samples_per_epoch: 1 is less than one micro batch on every rank (2 x 1)"),
    # 64px / patch 4 = 16x16 tokens in stage 1; the 2x2 map of stage 4 would use one window (clamped), but 16 % 6
    ("model.window_size=6", "model.window_size: 6 does not divide the 16x16 map of feature-map stage 1"),
    ("data.train_urls=/no/such/train.txt", "data.train_urls: shard-list file '/no/such/train.txt' does not exist"),
    ("data.train_urls='/no/such/train-{0..3}.tar'", "data.train_urls: 4 of 4 shards of '/no/such/train-{0..3}.tar' "
                                                    "do not exist, first: '/no/such/train-0.tar'"),
    ("data.train_urls=/no/such/train-{0..3}.tar", "data.train_urls=/no/such/train-{0..3}.tar: mismatched input '{'"),
])
def test_each_mistake_is_one_line_naming_the_key(shards, tmp_path, override, message):  # noqa: F811
    errors = refused(shards, tmp_path, "simmim", "stage.mask_patch_size=16", override)
    assert len(errors) == 1 and errors[0].startswith(f"config error: {message}"), errors


def test_an_init_from_that_holds_no_finished_run_is_named(shards, tmp_path):  # noqa: F811
    half = tmp_path / "half" / "demo" / "simmim"  # a run dir without a checkpoint: not something to start from
    (half / "checkpoints").mkdir(parents=True)
    errors = refused(shards, tmp_path / "new", "supervised", f"stage.init_from={half}")
    assert errors[0].startswith(f"config error: stage.init_from={half}: neither a weights file nor a run dir"), errors
    errors = refused(shards, tmp_path / "new", "supervised")  # auto: this experiment's SimMIM run, never made
    assert f"stage.init_from={tmp_path / 'new' / 'demo' / 'simmim'}" in errors[0]


@pytest.mark.dist
def test_under_torchrun_every_rank_stops_before_the_process_group(shards, tmp_path):  # noqa: F811
    cmd, env = command(shards, tmp_path, "simmim", "stage.mask_patch_size=16", "model.window_size=6")
    returncode, output = run(cmd, env, timeout=180)
    # Once one rank exits torchrun ends the other, so on a busy machine only the first may have printed; none
    # waited for a peer (a rank inside the process group would report a collective or rendezvous failure).
    errors = [line for line in output.splitlines() if line.startswith("config error: ")]
    assert returncode != 0 and 1 <= len(errors) <= 2, output[-3000:]
    assert all(e.startswith("config error: model.window_size: 6 does not divide") for e in errors), errors
    root_cause = output.split("Root Cause (first observed failure)")[-1]
    assert re.search(r"exitcode\s*: 1 ", root_cause), root_cause
    assert not any(e in output for e in ("PeerFailure", "DistNetworkError", "DistStoreError")), output[-3000:]
    assert not (tmp_path / "demo").exists()
