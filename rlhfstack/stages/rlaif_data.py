"""RLAIF's inputs: the label-free files of a finished demo run, copied into the RLAIF run.

Writes into ``run_dir`` (``runs/demo_rlaif/data``) and ``artifacts_dir/base_model``:
    prompts_train.jsonl / prompts_dev.jsonl / prompts_test.jsonl   the demo's prompt splits
    heldout_text.jsonl, gold.json                                  base text; the gold reward's calibration
    prefs_val_gold.jsonl                                           validation pairs ordered by gold (the
                                                                   RM's gold accuracy: a measurement)
    prefs_val_human.jsonl                                          the demo's validation pairs with their
                                                                   simulated human labels and gold margins:
                                                                   only to measure the AI labeler's
                                                                   agreement (nothing trains on it)

No simulated labeler runs here and no labeled pair reaches a training stage: the SFT data
(``sft_*.jsonl``, the chosen responses) and the training pairs (``prefs_train.jsonl``) are not
copied.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rlhfstack.configs import RLAIFDataConfig
from rlhfstack.runtime import write_stage_done
from rlhfstack.training import setup_run

log = logging.getLogger("rlhfstack.rlaif_data")

COPIED = {
    "prompts_train.jsonl": "prompts_train.jsonl",
    "prompts_dev.jsonl": "prompts_dev.jsonl",
    "prompts_test.jsonl": "prompts_test.jsonl",
    "heldout_text.jsonl": "heldout_text.jsonl",
    "gold.json": "gold.json",
    "prefs_val_gold.jsonl": "prefs_val_gold.jsonl",
    "prefs_val.jsonl": "prefs_val_human.jsonl",
}


def missing_inputs(source_dir: str | Path) -> list[str]:
    """The files of a finished demo run that RLAIF needs and ``source_dir`` lacks."""
    src = Path(source_dir)
    need = [src / "data" / f for f in COPIED] + [src / "base_model" / "config.json"]
    return [str(p) for p in need if not p.exists()]


def train(cfg: RLAIFDataConfig) -> Path:
    missing = missing_inputs(cfg.source_dir)
    if missing:
        raise FileNotFoundError(
            f"RLAIF reuses a finished demo run at source_dir={cfg.source_dir!r} (run `make demo` "
            "first, or point source_dir at one); missing:\n  " + "\n  ".join(missing)
        )
    run = setup_run(cfg)
    src = Path(cfg.source_dir)
    for name, dest in COPIED.items():
        shutil.copyfile(src / "data" / name, run.run_dir / dest)
    base = Path(cfg.artifacts_dir) / "base_model"
    if not (base / "config.json").exists():
        shutil.copytree(src / "base_model", base, dirs_exist_ok=True)
    log.info("rlaif_data: copied %d label-free files and the base model from %s", len(COPIED), src)
    run.logger.close()
    write_stage_done(
        run.run_dir,
        {"stage": "rlaif_data", "cost": run.cost.summary(), "source_dir": str(src.resolve())},
    )
    return run.run_dir
