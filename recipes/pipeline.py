"""Entry point: the whole pipeline (data -> SFT -> RM -> PPO -> DPO -> evaluation).

python recipes/pipeline.py +experiment=demo
"""

import sys

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.pipeline import run_pipeline
    from rlhfstack.training import exit_on_divergence

    with exit_on_divergence():  # a diverged stage: one error paragraph, exit status 3
        run_pipeline(to_object(cfg), command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
