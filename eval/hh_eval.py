"""Policy vs baseline on Anthropic HH prompts: RM-scored and judge-scored win-rates.

    python eval/hh_eval.py policy=DIR baseline=DIR rm_path=RM_DIR [judges=[rm,llm]]

See conf/hh_eval.yaml; logic in rlhfstack/evaluation/winrate.py.
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="hh_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.winrate import run_hh_eval

    run_hh_eval(to_object(cfg))


if __name__ == "__main__":
    main()
