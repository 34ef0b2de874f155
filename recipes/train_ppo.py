"""Entry point: PPO against the frozen reward model with a KL penalty to the frozen SFT model.

python recipes/train_ppo.py +experiment=demo [run_dir=DIR trainer.max_steps=N ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="ppo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("ppo", cfg)  # rlhfstack/cli.py: sweep run_dirs, finished runs, the stage call


if __name__ == "__main__":
    precheck_or_exit("ppo")  # a bad config stops here, before Hydra creates run_dir
    main()
