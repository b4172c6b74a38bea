"""Training and evaluation entry point.

    torchrun --standalone --nproc_per_node=2 launch/pretrain.py +stage=simmim [key=value ...]
    srun python launch/pretrain.py +stage=simmim        (SLURM tasks become ranks)
    python launch/pretrain.py +stage=simmim             (one process)
    python launch/pretrain.py +stage=eval stage.init_from=RUN_DIR_OR_FILE   (no training)
"""
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from pretrain import config, process_group  # noqa: E402
from pretrain.preflight import preflight  # noqa: E402

config.register_configs()

# Known deprecations inside dependencies, which this project cannot act on, printed by every rank at every
# step; each is named (category, module that warns, message) so that everything else still shows.
THIRD_PARTY_DEPRECATIONS = (
    # DeepSpeed ZeRO-3 (deepspeed/comm/torch.py) still calls the old name; torch warns through c10d_logger
    (FutureWarning, r"torch\.distributed\.c10d_logger", r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
)
for category, module, message in THIRD_PARTY_DEPRECATIONS:
    warnings.filterwarnings("ignore", message=message, category=category, module=module)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@record  # torchrun's failure summary then shows each rank's error, not only its exit code
def main(raw: DictConfig) -> None:
    process_group.setup_env()
    world_size = process_group.world_size_from_env()
    try:
        start = preflight(config.finalize(raw, world_size), world_size)
    except config.ConfigError as err:
        sys.exit(f"config error: {err}")
    if isinstance(start.cfg.stage, config.EvalStageConfig):
        from pretrain.evaluate import evaluate  # no training: one evaluation of a checkpoint
        evaluate(start)
        return
    from pretrain.trainer import TrainingHalted, train  # heavy imports only once the config is known to be good
    try:
        with process_group.peer_failures_named(start.cfg.resilience.collective_timeout_s):
            train(start)
    except TrainingHalted as halt:
        sys.exit(f"training stopped: {halt}")  # on every rank, after the process group shut down together


def composition_error(err: HydraException) -> str:
    """Hydra's multi-line error (unknown key, wrong type, unknown group option) as one line naming the key."""
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return f"{cause.full_key}: {cause.msg.splitlines()[0]}"
    message = str(err).split("\n\n")[0].replace("\n", " ")
    if isinstance(err, OverrideParseException):  # e.g. an unquoted brace pattern
        return f"{err.override}: {message} (quote values with braces or brackets: key='a-{{0..9}}.tar')"
    options = getattr(err, "options", None)  # a config group option that does not exist
    return f"{message}; one of {', '.join(options)}" if options else message


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing, so we can say it in one line
    try:
        main()
        status = 0
    except HydraException as err:
        status = f"config error: {composition_error(err)}"
    except SystemExit as stop:  # a config error or a halted run: its one-line message, status 1
        status = stop.code
    process_group.exit_process(status)
