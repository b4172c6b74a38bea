"""torchrun job for test_zero_init: the DeepSpeed engine's ZeRO-3 build (deepspeed.zero.Init, then module by
module initialisation) and its loading of starting weights, against plain builds from the same seed. Each
rank writes what it measured to OUT_DIR/rank<r>.json.

    torchrun --nproc_per_node=2 zero_init_job.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from models import SimMIM, SwinTransformerV2, encoder_state_dict, load_pretrained
from pretrain import process_group
from pretrain.engine.deepspeed import build_partitioned, load_partitioned

TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
            pretrained_window_sizes=(0, 0), drop_path_rate=0.0)


class ResidentParameters:
    """Largest number of parameter elements held on this rank at once while models are built: every
    parameter registered so far, at its size on this rank, counted each time another one is registered."""

    def __init__(self):
        self.params: list[nn.Parameter] = []
        self.peak = 0
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(self._registered)

    def _registered(self, module, name, param):
        if param is not None:
            self.params.append(param)
            # a ZeRO-3 parameter holds its shard in ds_tensor and, while gathered, the whole tensor as well
            self.peak = max(self.peak, sum(p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
                                           for p in self.params))


class Recipe:
    """The part of a stage an engine uses to build: a seeded model, and optionally its starting weights."""

    def __init__(self, build, seed: int, initial=None):
        self.build, self.seed, self.initial = build, seed, initial
        self.partition_seen: list[tuple[int, int, int]] = []

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = self.build()
        # inside the build, before the engine initialises anything: (numel here, full numel, local shard)
        self.partition_seen = [(p.numel(), getattr(p, "ds_numel", -1), p.ds_tensor.numel() if hasattr(p, "ds_tensor")
                                else -1) for p in model.parameters()]
        return model

    def initial_weights(self):
        return self.initial


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items()} | {
            k: b.cpu().clone() for k, b in model.named_buffers()}


def differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (dtype included), or present in only one of the two."""
    return sorted(k for k in got.keys() | want.keys()
                  if k not in got or k not in want or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k]))


def zero3_config(dtype: torch.dtype) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == torch.bfloat16}}


def build_case(name: str, build, dtype: torch.dtype) -> dict:
    """Partitioned build vs plain build, same seed: sizes during the build, weights, buffers, RNG after."""
    resident = ResidentParameters()
    recipe = Recipe(build, seed=0)
    model = build_partitioned(recipe, zero3_config(dtype))
    resident.handle.remove()
    rng_after = torch.get_rng_state()
    got = gathered_state(model)

    plain_resident = ResidentParameters()
    plain = Recipe(build, seed=0).build_model()
    plain_resident.handle.remove()
    want = {k: v.to(dtype) if v.is_floating_point() and k in dict(plain.named_parameters()) else v
            for k, v in gathered_state(plain).items()}
    full = sum(p.numel() for p in plain.parameters())
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in plain.modules())
    float_buffers = {k for k, b in plain.named_buffers() if b.is_floating_point()}
    return {
        "case": name,
        "full_numel": full,
        "largest_module_numel": largest_module,
        "num_params": len(list(plain.parameters())),
        "peak_resident": resident.peak,
        "plain_peak_resident": plain_resident.peak,
        "partition_seen": recipe.partition_seen,
        "param_differences": differences({k: v for k, v in got.items() if k not in float_buffers},
                                         {k: v for k, v in want.items() if k not in float_buffers}),
        # zero.Init creates floating buffers in the parameters' dtype; autocast rounds them so anyway
        "buffer_differences": sorted(k for k in float_buffers if not torch.equal(got[k].float(),
                                                                                 want[k].to(got[k].dtype).float())),
        "same_rng_after": torch.equal(rng_after, torch.get_rng_state()),
        "weights_trained_dtype": str(next(model.parameters()).dtype),
    }


def load_case() -> dict:
    """A supervised model started from a SimMIM encoder: the encoder's weights, its own initial head."""
    torch.manual_seed(1)
    simmim = SimMIM(encoder_stride=16, **TINY).state_dict()
    calls = []

    def load(model: nn.Module) -> None:
        calls.append(1)
        load_pretrained(model, encoder_state_dict(simmim))

    recipe = Recipe(lambda: SwinTransformerV2(num_classes=3, **TINY), seed=0, initial=load)
    model = build_partitioned(recipe, zero3_config(torch.float32))
    load_partitioned(model, recipe, load, dist.get_rank() == 0)
    got = gathered_state(model)
    want = encoder_state_dict(simmim) | {k: v for k, v in gathered_state(recipe.build_model()).items()
                                         if k.startswith("head.")}
    return {"case": "load", "loader_calls": len(calls), "param_differences": differences(
        {k: v for k, v in got.items() if k in want}, want), "loaded_keys": len(set(got) & set(want))}


def main(out_dir: Path) -> None:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank())
    results = [
        build_case("simmim_fp32", lambda: SimMIM(encoder_stride=16, **TINY), torch.float32),
        build_case("swinv2_fp32", lambda: SwinTransformerV2(num_classes=3, **TINY), torch.float32),
        build_case("swinv2_bf16", lambda: SwinTransformerV2(num_classes=3, **TINY), torch.bfloat16),
        load_case(),
    ]
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    process_group.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    process_group.exit_process(0)
