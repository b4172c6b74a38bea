"""Training entry point.

    torchrun --standalone --nproc_per_node=2 launch/pretrain.py +stage=simmim [key=value ...]
    srun python launch/pretrain.py +stage=simmim        (SLURM tasks become ranks)
    python launch/pretrain.py +stage=simmim             (one process)
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from pretrain import config, dist  # noqa: E402

config.register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    dist.setup_env()
    try:
        cfg = config.finalize(raw, dist.world_size_from_env())
    except config.ConfigError as err:
        sys.exit(f"config error: {err}")
    from pretrain.trainer import train  # heavy imports only once the config is known to be good
    train(cfg)


if __name__ == "__main__":
    main()
