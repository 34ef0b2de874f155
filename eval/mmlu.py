"""MMLU (5-shot, lm-evaluation-harness, local CSVs) and the alignment tax against a baseline.

    python eval/mmlu.py model_path=runs/demo/ppo/model output_dir=runs/eval/mmlu_ppo
    python eval/mmlu.py model_path=runs/demo/ppo/model baseline_path=runs/demo/sft/model \
        output_dir=runs/eval/mmlu_ppo subjects=[anatomy,astronomy] limit=20

See conf/mmlu.yaml; logic in rlhfstack/evaluation/jobs/mmlu.py.
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="mmlu", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.jobs.mmlu import run_mmlu
    from rlhfstack.runtime import exit_on_missing_package

    with exit_on_missing_package():  # no lm-eval: its install hint
        run_mmlu(to_object(cfg))


if __name__ == "__main__":
    main()
