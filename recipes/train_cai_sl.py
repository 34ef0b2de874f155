"""Entry point: SL-CAI, the supervised stage of Constitutional AI (Bai et al. 2022).

Critiques and revisions of the policy's responses (``rlhfstack/stages/cai_sl.py``), then the
SFT stage fine-tunes the policy on the revisions; the model is saved beside them
(``<run_dir>/policy/model``).

python recipes/train_cai_sl.py artifacts_dir=runs/demo_rlaif [key=value ...]
(the whole zero-human-label run: python recipes/pipeline.py +experiment=demo_rlaif)
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.configs import CONF_DIR, load_config, to_object


@hydra.main(config_path=str(CONF_DIR), config_name="cai_sl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.stages.cai_sl import fine_tune_overrides, train
    from rlhfstack.stages.sft import train as train_sft
    from rlhfstack.training import exit_on_divergence

    scfg = to_object(cfg)
    with exit_on_divergence():  # a diverged run: one error paragraph, exit status 3
        train(scfg)
        train_sft(to_object(load_config("sft", fine_tune_overrides(scfg))))


if __name__ == "__main__":
    main()
