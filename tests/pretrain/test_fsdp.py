"""engine=fsdp through the real launcher on 2 gloo ranks: parity with DeepSpeed ZeRO-3, its checkpoint
read back and exported, and the bf16 + activation-checkpointing path.

Both engines step with torch.optim.AdamW on fp32 master weights (DeepSpeed gets our optimizer instance,
not its own CPU Adam), average gradients over ranks, scale by 1/accumulation and clip with the same rule,
so in fp32 their loss curves agree to float rounding.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from models import SimMIM
from pretrain.config import CONF_DIR, ConfigError, finalize, register_configs
from pretrain.engine import engine_class
from pretrain.engine.deepspeed import DeepSpeedEngine
from pretrain.engine.fsdp import FSDPEngine
from tests.torchrun import REPO, TORCHRUN, job_env, run
sys.path.insert(0, str(REPO / "scripts"))
import convert_checkpoint  # noqa: E402

register_configs()
TINY = ("model.img_size=32", "model.window_size=4", "stage.mask_patch_size=8", "stage.norm_target_patch=7")


@pytest.fixture(scope="module")
def shards(small_shards) -> Path:
    return small_shards(image_size=40)


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["+stage=simmim", *overrides])


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_one_override_selects_the_engine_and_its_keys_are_checked(engine):
    cfg = finalize(compose_cfg(f"engine={engine}", "engine.precision=fp32"), world_size=2)
    assert engine_class(cfg.engine.name).__name__ == {"fsdp": "FSDPEngine", "deepspeed": "DeepSpeedEngine"}[engine]
    with pytest.raises(ConfigError, match="engine.precision: got 'fp16'"):
        finalize(compose_cfg(f"engine={engine}", "engine.precision=fp16"), world_size=2)


def test_fsdp_refuses_deepspeed_keys():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("engine=fsdp", "engine.zero_stage=3")


def launch(shards: Path, run_root: Path, *overrides: str) -> tuple[Path, str]:
    """launch/pretrain.py +stage=simmim on 2 ranks (accumulation 2); returns the run dir and the output."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "pretrain.py"), "+stage=simmim", f"run_root={run_root}", "logger=none",
           "logger.every=1", f"data.train_urls={shards}/train.txt", f"data.val_urls={shards}/val.txt",
           "data.samples_per_epoch=64", "data.num_workers=1", "data.shuffle_buffer=16", "stage.global_batch=8",
           "stage.micro_batch=2", "stage.optim.warmup_steps=1", "stage.steps=4", "checkpoint.every_steps=4",
           *TINY, *overrides]
    returncode, output = run(cmd, job_env())
    assert returncode == 0, output[-8000:]
    return run_root / "demo" / "simmim", output


def metric(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def fp32_runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {engine: launch(shards, root / engine, f"engine={engine}", "engine.precision=fp32")[0]
            for engine in ("deepspeed", "fsdp")}


@pytest.mark.dist
def test_fsdp_and_zero3_give_the_same_fp32_loss_curve(fp32_runs):
    ds, fsdp = fp32_runs["deepspeed"], fp32_runs["fsdp"]
    losses = metric(ds, "train/loss"), metric(fsdp, "train/loss")
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert losses[1][step] == pytest.approx(losses[0][step], abs=1e-5), (step, losses)
        assert metric(fsdp, "train/grad_norm")[step] == pytest.approx(metric(ds, "train/grad_norm")[step], rel=1e-4)
    assert len({round(v, 5) for v in losses[0].values()}) == 4

    # and the weights they end with agree too, read from their checkpoints without a process group
    tag = "step_00000004"
    ds_weights = DeepSpeedEngine.read_weights(ds / "checkpoints", tag)
    fsdp_weights = FSDPEngine.read_weights(fsdp / "checkpoints", tag)
    assert fsdp_weights.keys() == ds_weights.keys()
    for k, v in ds_weights.items():
        torch.testing.assert_close(fsdp_weights[k], v, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.dist
def test_fsdp_checkpoint_is_sharded_dcp_and_exports_to_the_official_layout(fp32_runs, tmp_path):
    ckpts = fp32_runs["fsdp"] / "checkpoints"
    tag_dir = ckpts / "step_00000004"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (tag_dir / ".metadata").is_file() and len(list(tag_dir.glob("*.distcp"))) == 2
    assert sorted(p.name for p in tag_dir.glob("client_rank*.pt")) == ["client_rank00000.pt", "client_rank00001.pt"]

    out = tmp_path / "simmim.pt"
    convert_checkpoint.main([str(fp32_runs["fsdp"]), str(out)])  # a run dir: its latest tag
    state_dict = torch.load(out, weights_only=True)["model"]
    torch.manual_seed(0)  # the run's seed: these are the weights it started from
    model = SimMIM(encoder_stride=32, img_size=32, window_size=4, embed_dim=24,
                   depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state_dict, strict=True)  # official names, e.g. encoder.layers.0.blocks.0.attn.qkv.weight
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    assert not torch.equal(state_dict["encoder.patch_embed.proj.weight"], initial["encoder.patch_embed.proj.weight"])

    encoder = tmp_path / "encoder.pt"
    convert_checkpoint.main([str(ckpts), str(encoder), "--encoder-only"])
    assert not any(k.startswith(("encoder.", "decoder.")) for k in torch.load(encoder, weights_only=True)["model"])


@pytest.mark.dist
def test_fsdp_bf16_with_activation_checkpointing_trains_and_resumes(shards, tmp_path):
    args = ("engine=fsdp", "model.grad_checkpointing=torch", "checkpoint.every_steps=2")
    run, out = launch(shards, tmp_path, *args, "stage.steps=2")
    assert "FSDP2 bf16 over 2 ranks" in out and "grad checkpointing torch" in out
    run, out = launch(shards, tmp_path, *args, "stage.steps=3")
    assert "step_00000002 at step 2" in out
    losses = metric(run, "train/loss")
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 10 for v in losses.values())
