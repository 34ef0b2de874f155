"""One completion per prompt from an exported HF model directory or an OpenAI-compatible endpoint.

    python eval/generate_samples.py model=DIR_or_URL prompts=FILE output=FILE
    python eval/generate_samples.py generation.base_url=http://127.0.0.1:8000/v1 generation.model=NAME ...

``model=`` is an alias of the config field ``model_path`` (Hydra treats a bare ``model=`` as a
choice in the ``conf/model`` group). See conf/generate_samples.yaml; logic in
rlhfstack/evaluation/jobs/winrate.py.
"""

import sys

import hydra
from omegaconf import DictConfig

from rlhfstack.cli import precheck_or_exit
from rlhfstack.configs import CONF_DIR, to_object


def alias_model_arg(argv: list[str]) -> list[str]:
    """``model=X`` -> ``model_path=X`` (other arguments unchanged)."""
    return [("model_path=" + a[len("model=") :]) if a.startswith("model=") else a for a in argv]


@hydra.main(config_path=str(CONF_DIR), config_name="generate_samples", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhfstack.evaluation.jobs.winrate import run_generate_samples

    run_generate_samples(to_object(cfg))


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *alias_model_arg(sys.argv[1:])]
    precheck_or_exit("generate")  # a bad config or an old spelling stops here, with the new one
    main()
