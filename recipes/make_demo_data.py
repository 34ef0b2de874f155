"""Entry point: The embedded task's data (prompts, base samples, simulated labels).

python recipes/make_demo_data.py +experiment=demo [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="demo_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("data", cfg)  # rlhfstack/cli.py: sweep run_dirs, finished runs, the stage call


if __name__ == "__main__":
    precheck_or_exit("data")  # a bad config stops here, before Hydra creates run_dir
    main()
