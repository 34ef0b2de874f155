"""Entry point: score a trained reward model on any preference file.

    python eval/rm_eval.py rm_path=runs/rm_hh/model \
        data_path=preference/hh-rlhf_harmless-base_1812.jsonl.gz output_dir=runs/rm_hh/eval

Writes ``output_dir/rm_eval.json`` (accuracy, n, ece, mean_margin, baselines.length,
baselines.chance, skipped rows), ``reliability.png`` and per-pair scores; writes the model card
into ``rm_path`` if it has none. HH / UltraFeedback / plain / ShareGPT formats are auto-detected.
"""

import json

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="rm_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.rm_eval import run_rm_eval

    res = run_rm_eval(to_object(cfg))
    keys = ("accuracy", "n", "ece", "mean_margin", "baselines", "skipped")
    print(json.dumps({k: res[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
