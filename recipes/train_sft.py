"""Entry point: Supervised fine-tuning.

python recipes/train_sft.py +experiment=demo [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("sft", cfg)  # rlhfstack/cli.py: sweep run_dirs, finished runs, the stage call


if __name__ == "__main__":
    precheck_or_exit("sft")  # a bad config stops here, before Hydra creates run_dir
    main()
