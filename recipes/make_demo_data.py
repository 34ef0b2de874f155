"""Entry point: The embedded task's data (prompts, base samples, simulated labels).

python recipes/make_demo_data.py +experiment=demo [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="demo_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.stages.demo_data import train

    train(to_object(cfg))


if __name__ == "__main__":
    main()
