"""engine=deepspeed with ZeRO-3 builds the model under deepspeed.zero.Init on 2 gloo ranks: no rank ever holds
the whole model, yet the initial weights are bit for bit a plain build's from the same seed, and starting
weights (a SimMIM encoder) reach the partitioned model. One torchrun launch of zero_init_job.py for all."""
import json
import math
from pathlib import Path

import pytest

from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent
WORLD = 2
BUILDS = ["simmim_fp32", "swinv2_fp32", "swinv2_bf16"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("zero_init")
    torchrun(HERE / "zero_init_job.py", str(out_dir), nproc=WORLD, timeout=240)
    return [{c["case"]: c for c in json.loads((out_dir / f"rank{r}.json").read_text())} for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.parametrize("case", BUILDS)
def test_parameters_are_partitioned_from_construction(ranks, case):
    for rank in ranks:
        c = rank[case]
        # as the recipe returns the model: no values held whole, each rank a 1/world shard
        assert len(c["partition_seen"]) == c["num_params"]
        for here, full, shard in c["partition_seen"]:
            assert here == 0 and full > 0 and shard == math.ceil(full / WORLD), (here, full, shard)
        # and at no point of the build more than a shard of everything plus the module being built
        assert c["plain_peak_resident"] == c["full_numel"]
        bound = c["full_numel"] / WORLD + c["largest_module_numel"] + c["num_params"]  # + shard padding
        assert c["peak_resident"] <= bound < c["full_numel"], c


@pytest.mark.dist
@pytest.mark.parametrize("case", BUILDS)
def test_initial_weights_are_a_plain_build_from_the_same_seed(ranks, case):
    for rank in ranks:
        c = rank[case]
        assert c["param_differences"] == [] and c["buffer_differences"] == []
        assert c["same_rng_after"]  # the same draws, so what the run draws next is the same too
        assert c["weights_trained_dtype"] == ("torch.bfloat16" if case.endswith("bf16") else "torch.float32")


@pytest.mark.dist
def test_starting_weights_reach_the_partitioned_model_read_on_rank_0_only(ranks):
    assert [rank["load"]["loader_calls"] for rank in ranks] == [1, 0]
    for rank in ranks:
        assert rank["load"]["param_differences"] == [] and rank["load"]["loaded_keys"] > 50
