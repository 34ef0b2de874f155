"""Win-rate of samples A over samples B, judged by the gold reward, a reward model or LLM judges.

    python eval/winrate.py a=A.jsonl b=B.jsonl judge=gold output_dir=runs/eval/a_vs_b

See conf/winrate.yaml; logic in rlhfstack/evaluation/{winrate,judges}.py.
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="winrate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.winrate import run_winrate

    run_winrate(to_object(cfg))


if __name__ == "__main__":
    main()
