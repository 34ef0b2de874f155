"""Entry point: evaluate pi_sft, pi_dpo, pi_ppo of the embedded demo (results.json + EVAL_REPORT.md).

python eval/evaluate_demo.py +experiment=demo
"""

import sys

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object
from rlhfstack.evaluation.jobs.demo import run_demo_eval


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_demo_eval(to_object(cfg), command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
