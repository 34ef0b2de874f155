"""Entry point: SL-CAI, the supervised stage of Constitutional AI (Bai et al. 2022).

Critiques and revisions of the policy's responses (``rlhfstack/stages/cai_sl.py``), then the
SFT stage fine-tunes the policy on the revisions; the model is saved beside them
(``<run_dir>/policy/model``).

python recipes/train_cai_sl.py artifacts_dir=runs/demo_rlaif [key=value ...]
(the whole zero-human-label run: python recipes/pipeline.py +experiment=demo_rlaif)
"""

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit, run_command
from rlhfstack.configs import CONF_DIR


@hydra.main(config_path=str(CONF_DIR), config_name="cai_sl", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("cai-sl", cfg)  # rlhfstack/cli.py: sweep run_dirs, the stage and its fine-tune


if __name__ == "__main__":
    precheck_or_exit("cai-sl")  # a bad config stops here, before Hydra creates run_dir
    main()
