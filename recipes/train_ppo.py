"""Entry point: PPO against the frozen reward model with a KL penalty to the frozen SFT model.

python recipes/train_ppo.py +experiment=demo [run_dir=DIR trainer.max_steps=N ...]
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="ppo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.stages.ppo import train
    from rlhfstack.tasks.demo import gold_scorer_for
    from rlhfstack.training import exit_on_divergence

    c = to_object(cfg)
    gold = (
        gold_scorer_for(c.gold_task, c.artifacts_dir, c.cluster.device)
        if c.gold_eval_every
        else None
    )
    with exit_on_divergence():  # a diverged run: one error paragraph, exit status 3
        train(c, gold_scorer=gold)


if __name__ == "__main__":
    import sys

    from rlhfstack.runtime import exit_on_missing_package, require_launcher

    with exit_on_missing_package():  # hydra/launcher=slurm without its plugin: the install hint
        require_launcher(sys.argv[1:])
    main()
