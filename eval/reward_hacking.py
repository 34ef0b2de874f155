"""Reward-hacking detectors: length, repetition, formatting tics, refusal explosion, sycophancy;
plus the proxy/gold reward gap of a PPO run.

    python eval/reward_hacking.py samples=runs/demo/samples/ppo.jsonl \
        reference=runs/demo/samples/sft.jsonl output_dir=runs/eval/reward_hacking \
        [model_path=runs/demo/ppo/model] [ppo_run_dir=runs/demo/ppo]

See conf/reward_hacking.yaml; logic in rlhfstack/evaluation/detectors.py.
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="reward_hacking", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.detectors import run_reward_hacking
    from rlhfstack.runtime import save_resolved_config

    obj = to_object(cfg)
    result = run_reward_hacking(obj)
    save_resolved_config(obj, obj.output_dir)
    flagged = ", ".join(result["flagged"]) or "none"
    print(f"reward hacking flags: {flagged}; proxy_gold_gap: {result['proxy_gold_gap']}")


if __name__ == "__main__":
    main()
