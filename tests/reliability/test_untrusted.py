"""Files crafted to run code when unpickled never run it: checkpoint files (resume, conversion), an init_from
weights file, torch.distributed.checkpoint metadata and entries, pickled members of a shard.

Every payload is real: the `control` checks show that the library we hand the file to (DeepSpeed, DCP,
pickle) would run it. Our code must refuse the file first, naming it, or skip it; the marker never appears."""
import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from data.decode import encode_jpeg
from data.demo import make_image
from data.shards import build_loader
from data.transforms import EvalTransform
from pretrain.engine.fsdp import FSDPEngine
from pretrain.safe_load import UnsafeFileError
from scripts import convert_checkpoint
from tests.pretrain.test_training import command, launch, shards  # noqa: F401 (the fixture)
from tests.reliability.payload import Payload
from tests.torchrun import run

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.save(no_dist)

ONE_PROCESS = ("stage.global_batch=2", "stage.steps=1", "stage.optim.warmup_steps=0")
SIMMIM = (*ONE_PROCESS, "stage.mask_patch_size=16")
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def ds_run(shards, tmp_path_factory):  # noqa: F811
    """A finished one-step SimMIM run: DeepSpeed ZeRO-3 bf16, one process."""
    root = tmp_path_factory.mktemp("ds")
    launch(shards, root, "simmim", *SIMMIM, torchrun=False)
    return root / "demo" / "simmim"


def crafted_copy(run, tmp_path, member: str, marker):
    """A copy of `run` under run_root `tmp_path` whose step-1 file `member` (under the tag folder) carries a payload."""
    copy = tmp_path / "demo" / "simmim"
    shutil.copytree(run, copy)
    path = copy / "checkpoints" / "step_00000001" / member
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}, "optimizer_state_dict": Payload(marker)}, path)
    return copy, path


def test_the_payload_runs_code_when_unpickled(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "pickle")))
    torch.save({"x": Payload(tmp_path / "torch")}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert (tmp_path / "pickle").exists() and (tmp_path / "torch").exists()


@pytest.mark.parametrize("member", [MODEL_STATES, OPTIM_STATES, "client_rank00000.pt",
                                    "universal/zero/optimizer_state.pt"])
def test_converting_a_crafted_deepspeed_checkpoint_names_the_file_and_runs_nothing(ds_run, tmp_path, member,
                                                                                  capsys):
    marker = tmp_path / "pwned"
    copy, path = crafted_copy(ds_run, tmp_path, member, marker)
    with pytest.raises(SystemExit):
        convert_checkpoint.main([str(copy), str(tmp_path / "out.pt")])
    assert f"{path}: refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    if member in (MODEL_STATES, OPTIM_STATES):  # control: DeepSpeed's own reader unpickles it
        with pytest.raises(Exception):
            get_fp32_state_dict_from_zero_checkpoint(str(copy / "checkpoints"), tag="step_00000001")
        assert marker.exists()


def test_resuming_from_a_crafted_checkpoint_refuses_before_deepspeed_loads_it(ds_run, shards, tmp_path):  # noqa: F811
    marker = tmp_path / "pwned"
    copy, path = crafted_copy(ds_run, tmp_path, OPTIM_STATES, marker)
    cmd, env = command(shards, tmp_path, "simmim", *SIMMIM, "stage.steps=2", torchrun=False)
    returncode, output = run(cmd, env)
    assert returncode != 0 and f"{path}: refused to load" in output, output[-3000:]
    assert not marker.exists()
    assert (copy / "checkpoints" / "latest").read_text() == "step_00000001"  # nothing was saved over it


def test_an_init_from_weights_file_that_pickles_code_is_refused(shards, tmp_path):  # noqa: F811
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "args": Payload(marker)}, weights)
    cmd, env = command(shards, tmp_path, "supervised", *ONE_PROCESS, f"stage.init_from={weights}",
                       torchrun=False)
    returncode, output = run(cmd, env)
    assert returncode != 0 and f"stage.init_from={weights}" in output, output[-3000:]
    assert not marker.exists()


def save_dcp(folder, **optim):
    dcp.save({"model": {"w": torch.ones(3)}, "optim": {"lr": 0.1, "betas": (0.9, 0.999), **optim}},
             checkpoint_id=folder, no_dist=True)


def test_dcp_metadata_that_pickles_code_is_refused(tmp_path):
    save_dcp(tmp_path / "ok")
    assert torch.equal(FSDPEngine.read_weights(tmp_path, "ok")["w"], torch.ones(3))  # plain DCP passes
    marker = tmp_path / "pwned"
    save_dcp(tmp_path / "bad")
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFileError, match=f"{tmp_path / 'bad' / '.metadata'}: refused to load"):
        FSDPEngine.read_weights(tmp_path, "bad")
    assert not marker.exists()
    with pytest.raises(Exception):  # control: torch's own reader unpickles it
        dcp.FileSystemReader(tmp_path / "bad").read_metadata()
    assert marker.exists()


def test_a_dcp_entry_that_pickles_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    save_dcp(tmp_path / "bad", hook=Payload(marker))  # a non-tensor entry: DCP stores it with torch.save
    with pytest.raises(UnsafeFileError, match=r"entry optim\.hook\): refused to load"):
        FSDPEngine.read_weights(tmp_path, "bad")
    assert not marker.exists()
    # control: DCP loads every entry of a full load with torch.load(weights_only=False)
    _load_state_dict({}, storage_reader=dcp.FileSystemReader(tmp_path / "bad"), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    assert marker.exists()


def test_pickled_members_of_a_shard_are_never_read(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    jpeg = encode_jpeg(make_image(3, np.random.default_rng(0), 48, 48))
    members = {"a.jpg": jpeg, "a.cls": b"3", "a.pyd": evil, "a.pickle": evil, "a.pth": evil,
               "b.pyd": evil, "b.cls": b"4"}  # b: nothing but a pickle to offer as its image
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = build_loader(str(tmp_path / "evil.tar"), sample_fn=EvalTransform(img_size=32), batch_size=2, rank=0,
                          world_size=1, num_workers=0, shuffle_buffer=0, resampled=False, samples_per_epoch=2, seed=0)
    batch = next(loader)
    assert set(batch) == {"image", "label"} and batch["label"].tolist() == [3, 3]
    assert loader.stats()["bad_image"] >= 1 and not marker.exists()
