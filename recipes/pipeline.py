"""Entry point: the whole pipeline (data -> SFT -> RM -> PPO -> DPO -> evaluation).

python recipes/pipeline.py +experiment=demo
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("pipeline", cfg)  # rlhfstack/cli.py: sweep run_dirs, finished runs, the stage call


if __name__ == "__main__":
    precheck_or_exit("pipeline")  # a bad config stops here, before Hydra creates run_dir
    main()
