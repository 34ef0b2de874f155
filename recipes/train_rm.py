"""Entry point: Reward model (Bradley-Terry).

python recipes/train_rm.py +experiment=demo [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="rm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.stages.reward_model import train
    from rlhfstack.training import exit_on_divergence

    with exit_on_divergence():  # a diverged run: one error paragraph, exit status 3
        train(to_object(cfg))


if __name__ == "__main__":
    import sys

    from rlhfstack.runtime import exit_on_missing_package, require_launcher

    with exit_on_missing_package():  # hydra/launcher=slurm without its plugin: the install hint
        require_launcher(sys.argv[1:])
    main()
