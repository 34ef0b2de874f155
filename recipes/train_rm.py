"""Entry point: Reward model (Bradley-Terry).

python recipes/train_rm.py +experiment=demo [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="rm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("rm", cfg)  # rlhfstack/cli.py: sweep run_dirs, finished runs, the stage call


if __name__ == "__main__":
    precheck_or_exit("rm")  # a bad config stops here, before Hydra creates run_dir
    main()
