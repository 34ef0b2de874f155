"""Held-out evaluation of a trained reward model on any preference file.

``accuracy`` = fraction of pairs where r(chosen) > r(rejected) (ties count 1/2);
``mean_margin`` = mean of r(chosen) - r(rejected) (normalized rewards);
``ece`` = expected calibration error of P(chosen) = sigmoid(r_c - r_r) (Bradley-Terry), measured
with each pair shown in a random order (otherwise every outcome would be 1);
``baselines.length`` = accuracy of "the longer response (in characters) wins";
``baselines.chance`` = 0.5. Malformed rows are skipped and counted (``skipped``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.evaluation.calibration import plot_reliability, reliability_bins

log = logging.getLogger("rlhfstack.rm_eval")


def pair_accuracy(chosen_N: np.ndarray, rejected_N: np.ndarray) -> float:
    """Fraction of pairs with ``chosen > rejected``; ties count one half."""
    c, r = np.asarray(chosen_N, float), np.asarray(rejected_N, float)
    if len(c) == 0:
        return float("nan")
    return float((c > r).mean() + 0.5 * (c == r).mean())


def preference_metrics(chosen_N: np.ndarray, rejected_N: np.ndarray, seed: int = 0) -> dict:
    """Accuracy, mean margin and calibration of P(chosen) = sigmoid(r_c - r_r) for ``[N]`` scores.

    For calibration each pair is shown in a random order (seeded), so outcomes are 0 or 1.
    Returns ``{"accuracy", "n", "mean_margin", "ece", "reliability"}``.
    """
    c, r = np.asarray(chosen_N, float), np.asarray(rejected_N, float)
    diff = c - r
    rng = np.random.default_rng(seed)
    flip = rng.random(len(diff)) < 0.5
    d = np.where(flip, -diff, diff)
    probs = 1.0 / (1.0 + np.exp(-np.clip(d, -50, 50)))
    outcomes = (~flip).astype(float)
    rel = reliability_bins(probs, outcomes)
    return {
        "accuracy": pair_accuracy(c, r),
        "n": int(len(diff)),
        "mean_margin": float(diff.mean()) if len(diff) else float("nan"),
        "ece": rel["ece"],
        "reliability": rel,
    }


def length_baseline(pairs: Sequence[Any]) -> float:
    """Accuracy of "the longer response wins" (characters; ties count one half)."""
    c = np.array([len(p.chosen) for p in pairs], float)
    r = np.array([len(p.rejected) for p in pairs], float)
    return pair_accuracy(c, r)


def score_pairs_text(
    rm: Any,
    tok: Any,
    pairs: Sequence[Any],
    *,
    max_len: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized rewards ``([N], [N])`` of chosen and rejected responses of preference examples."""
    from rlhfstack.models.encoders import score_texts

    prompts = [p.prompt for p in pairs]
    both = score_texts(
        rm,
        tok,
        prompts + prompts,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        max_len=max_len,
        batch_size=batch_size,
        device=device,
    )["mean"]
    return both[: len(pairs)], both[len(pairs) :]


def resolve_eval_path(path: str, data_root: str | os.PathLike | None) -> str:
    """``path`` if it exists from the working directory (or is absolute / a hub source), else as given
    (the loader joins it to ``data_root``)."""
    if path.startswith("hf://") or Path(path).expanduser().is_absolute():
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    return path


def evaluate_rm_on_pairs(
    rm: Any,
    tok: Any,
    pairs: Sequence[Any],
    *,
    max_len: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics (see module doc) and the chosen/rejected scores ``[N]``."""
    c, r = score_pairs_text(rm, tok, pairs, max_len=max_len, batch_size=batch_size, device=device)
    m = preference_metrics(c, r, seed)
    m["baselines"] = {"length": length_baseline(pairs), "chance": 0.5}
    return m, c, r


def run_rm_eval(cfg: Any) -> dict:
    """Score ``cfg.rm_path`` on ``cfg.data_path``; write ``rm_eval.json``, ``reliability.png`` and
    ``rm_eval_scores.jsonl`` into ``cfg.output_dir`` (and ``MODEL_CARD.md`` into the RM directory
    when it has none and ``cfg.model_card``). ``cfg`` is an :class:`rlhfstack.configs.RMEvalConfig`."""
    import torch

    from rlhfstack.data.loading import load_preferences
    from rlhfstack.models.core import load_reward_model
    from rlhfstack.models.encoders import load_reward_tokenizer, reward_max_len
    from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, seed_everything

    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rm_dir = Path(cfg.rm_path)
    rm = load_reward_model(rm_dir, device=cfg.device)
    tok_dir = rm_dir if (rm_dir / "tokenizer_config.json").exists() else _first_member(rm_dir)
    tok = load_reward_tokenizer(str(tok_dir))
    template = cfg.template or getattr(rm, "template", None) or "hh"
    data_path = resolve_eval_path(cfg.data_path, cfg.data_root)
    pairs, rep = load_preferences(
        data_path,
        adapter=cfg.adapter,
        template=template,
        on_error="skip",
        max_records=cfg.max_pairs,
        data_root=cfg.data_root,
    )
    log.info("%s", rep.summary())
    max_len = reward_max_len(rm, cfg.max_length)
    with torch.no_grad():
        m, c, r = evaluate_rm_on_pairs(
            rm,
            tok,
            pairs,
            max_len=max_len,
            batch_size=cfg.batch_size,
            device=cfg.device,
            seed=cfg.seed,
        )
    result = {
        "accuracy": m["accuracy"],
        "n": m["n"],
        "ece": m["ece"],
        "mean_margin": m["mean_margin"],
        "baselines": m["baselines"],
        "rm_path": str(rm_dir),
        "data_path": str(rep.source),
        "adapter": rep.adapter,
        "template": template,
        "max_length": max_len,
        "read": rep.read,
        "skipped": rep.skipped,
        "skipped_by_reason": dict(rep.skipped_by_reason),
        "reliability": m["reliability"],
    }
    name = Path(rep.source).name
    title = name if len(name) <= 36 else name[:33] + "..."
    plot_reliability(m["reliability"], out_dir / "reliability.png", title)
    atomic_write_jsonl(
        out_dir / "rm_eval_scores.jsonl",
        [{"i": i, "chosen": float(a), "rejected": float(b)} for i, (a, b) in enumerate(zip(c, r))],
    )
    atomic_write_json(out_dir / "rm_eval.json", result)
    log.info(
        "RM eval: accuracy %.3f (n=%d, skipped %d), ECE %.3f, length baseline %.3f",
        result["accuracy"],
        result["n"],
        result["skipped"],
        result["ece"],
        m["baselines"]["length"],
    )
    card_dir = rm_dir if (rm_dir / "reward_config.json").exists() else None
    if cfg.model_card and card_dir is not None and not (card_dir / "MODEL_CARD.md").exists():
        from rlhfstack.evaluation.rm_probes import run_probes, write_model_card

        probes = run_probes(
            rm,
            tok,
            pairs,
            template=template,
            xstest_path=cfg.xstest_path,
            data_root=cfg.data_root,
            max_items=cfg.probe_max_items,
            device=cfg.device,
            scores=(c, r),
        )
        info = {
            "model_dir": str(rm_dir),
            "kind": rm.kind,
            "evaluation": {
                Path(rep.source).name: {
                    k: result[k] for k in ("accuracy", "n", "ece", "mean_margin", "baselines")
                }
            },
            "written_by": "eval/rm_eval.py (the card was missing)",
        }
        write_model_card(card_dir, info, probes)
        result["model_card"] = str(card_dir / "MODEL_CARD.md")
    return result


def _first_member(ens_dir: Path) -> Path:
    import json

    spec = ens_dir / "ensemble.json"
    if spec.exists():
        return ens_dir / json.loads(spec.read_text())["members"][0]
    return ens_dir
