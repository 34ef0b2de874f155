"""Over-optimization of a PPO run: gold and proxy reward vs d = sqrt(KL), fitted with
Gao et al. (2022)'s R(d) = d (alpha - beta log d); the KL at the gold peak.

    python eval/overoptimization.py run_dir=runs/demo/ppo output_dir=runs/eval/overopt

See conf/overoptimization.yaml; logic in rlhfstack/evaluation/overopt.py.
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="overoptimization", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.overopt import overoptimization_report
    from rlhfstack.runtime import save_resolved_config

    obj = to_object(cfg)
    result = overoptimization_report(
        obj.run_dir,
        obj.output_dir,
        offset=obj.offset,
        kl_key=obj.kl_key,
        gold_key=obj.gold_key,
        proxy_key=obj.proxy_key,
    )
    save_resolved_config(obj, obj.output_dir)
    print(f"KL at the fitted gold peak: {result['kl_star']}; plot: {result['plot']}")


if __name__ == "__main__":
    main()
