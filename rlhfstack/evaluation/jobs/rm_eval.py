"""The reward-model evaluation job: score a trained RM on a preference file, probe its biases,
write ``rm_eval.json`` and the model card.

* :func:`score_pairs_text` / :func:`evaluate_rm_on_pairs` -- RM scores of chosen and rejected
  responses and the metrics of :mod:`rlhfstack.evaluation.rm_eval` on them.
* :func:`run_probes` -- the bias probes of :mod:`rlhfstack.evaluation.rm_probes` (length on the
  scored pairs; flattery, refusal and sanity by scoring the probe texts);
  :func:`write_model_card` writes the card and ``probes.json`` into the RM directory.
* :func:`run_rm_eval` (``eval/rm_eval.py``) -- all of it, as configured by an
  :class:`rlhfstack.configs.RMEvalConfig`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack.data.loading import load_preferences, resolve_data_path
from rlhfstack.data.templates import get_template
from rlhfstack.evaluation.jobs.plots import plot_reliability
from rlhfstack.evaluation.rm_eval import length_baseline, preference_metrics
from rlhfstack.evaluation.rm_probes import (
    CANNED_COMPLIANCE,
    CANNED_REFUSAL,
    FLATTERY_PREFIXES,
    SANITY_BAD,
    SANITY_PROMPTS,
    probe_length,
    read_xstest_safe,
    render_model_card,
)
from rlhfstack.models.card import write_card
from rlhfstack.models.core import load_reward_model
from rlhfstack.models.encoders import load_reward_tokenizer, reward_max_len, score_texts
from rlhfstack.runtime import (
    atomic_write_json,
    atomic_write_jsonl,
    seed_everything,
)

log = logging.getLogger("rlhfstack.rm_eval")

__all__ = [
    "evaluate_rm_on_pairs",
    "probe_flattery",
    "probe_refusal",
    "probe_sanity",
    "resolve_eval_path",
    "run_probes",
    "run_rm_eval",
    "score_pairs_text",
    "write_model_card",
]


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
    """Metrics (see :mod:`rlhfstack.evaluation.rm_eval`) and the chosen/rejected scores ``[N]``."""
    c, r = score_pairs_text(rm, tok, pairs, max_len=max_len, batch_size=batch_size, device=device)
    m = preference_metrics(c, r, seed)
    m["baselines"] = {"length": length_baseline(pairs), "chance": 0.5}
    return m, c, r


# ----------------------------------------------------------------------------- bias probes


def _format(template: str, prompts: Sequence[str]) -> list[str]:
    t = get_template(template)
    return [t.render_prompt(p) for p in prompts]


def probe_flattery(
    rm: Any, tok: Any, prompts: Sequence[str], responses: Sequence[str], **kw: Any
) -> dict[str, Any]:
    """Mean score change (and share of increases) per flattering prefix, over ``[N]`` responses."""
    base = score_texts(rm, tok, prompts, responses, **kw)["mean"]
    out: dict[str, Any] = {"n": len(responses)}
    deltas = []
    for pre in FLATTERY_PREFIXES:
        s = score_texts(rm, tok, prompts, [pre + r for r in responses], **kw)["mean"]
        d = s - base
        deltas.append(d)
        out[pre.strip()] = {"mean_delta": float(d.mean()), "frac_increase": float((d > 0).mean())}
    all_d = np.concatenate(deltas)
    out["mean_delta"] = float(all_d.mean())
    out["frac_increase"] = float((all_d > 0).mean())
    return out


def probe_refusal(rm: Any, tok: Any, prompts: Sequence[str], **kw: Any) -> dict[str, float]:
    """Canned refusal vs canned compliance on (already templated) safe prompts."""
    ref = score_texts(rm, tok, prompts, [CANNED_REFUSAL] * len(prompts), **kw)["mean"]
    com = score_texts(rm, tok, prompts, [CANNED_COMPLIANCE] * len(prompts), **kw)["mean"]
    return {
        "n": len(prompts),
        "mean_refusal": float(ref.mean()),
        "mean_compliance": float(com.mean()),
        "mean_refusal_minus_compliance": float((ref - com).mean()),
        "refusal_preferred": float((ref > com).mean()),
    }


def probe_sanity(rm: Any, tok: Any, template: str, **kw: Any) -> dict[str, Any]:
    """Good vs obviously bad answers: share of (good, bad) comparisons won by the good answer."""
    prompts = _format(template, [p for p, _ in SANITY_PROMPTS])
    good = score_texts(rm, tok, prompts, [g for _, g in SANITY_PROMPTS], **kw)["mean"]
    bad_PB = np.stack(
        [score_texts(rm, tok, prompts, [b] * len(prompts), **kw)["mean"] for b in SANITY_BAD], 1
    )
    wins_PB = good[:, None] > bad_PB
    return {
        "n_prompts": len(prompts),
        "n_comparisons": int(wins_PB.size),
        "good_wins": float(wins_PB.mean()),
        "prompts_all_good_win": float(wins_PB.all(1).mean()),
        "mean_good": float(good.mean()),
        "mean_bad": float(bad_PB.mean()),
        "good_wins_by_bad_kind": {
            b[:24]: float(wins_PB[:, j].mean()) for j, b in enumerate(SANITY_BAD)
        },
    }


def run_probes(
    rm: Any,
    tok: Any,
    pairs: Sequence[Any],
    *,
    template: str = "hh",
    xstest_path: str | os.PathLike | None = "safety/xstest_prompts.csv",
    data_root: str | os.PathLike | None = None,
    max_items: int = 100,
    device: str = "cpu",
    batch_size: int = 32,
    scores: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """All four probes. ``pairs``: held-out preference examples (prompts already templated);
    ``scores``: their (chosen, rejected) scores if already computed."""
    kw = {"device": device, "batch_size": batch_size}
    out: dict[str, Any] = {}
    if pairs:
        if scores is None:
            scores = score_pairs_text(rm, tok, pairs, **kw)
        out["length"] = probe_length(scores[0], scores[1], pairs)
        sub = list(pairs)[:max_items]
        out["flattery"] = probe_flattery(
            rm, tok, [p.prompt for p in sub], [p.chosen for p in sub], **kw
        )
    else:
        out["length"] = {"skipped": "no held-out pairs"}
        out["flattery"] = {"skipped": "no held-out pairs"}
    path = None
    if xstest_path:
        path = Path(resolve_data_path(xstest_path, data_root))
    if path is not None and path.exists():
        safe = read_xstest_safe(path, max_items)
        out["refusal"] = probe_refusal(rm, tok, _format(template, safe), **kw)
        out["refusal"]["source"] = str(path.name)
    else:
        out["refusal"] = {"skipped": f"XSTest file not found: {path}"}
    out["sanity"] = probe_sanity(rm, tok, template, **kw)
    return out


RM_CARD = {"tags": ["rlhf", "reward-model"], "pipeline_tag": "text-classification"}
"""Model-card metadata of every reward model."""


def write_model_card(
    model_dir: str | os.PathLike, info: dict[str, Any], probes: dict[str, Any], **card: Any
) -> Path:
    """Write the model card ``model_dir/README.md`` (Hugging Face metadata, then the RM's
    description, training, evaluation and bias probes) and ``probes.json`` atomically; returns
    the card path. ``card``: more :func:`rlhfstack.models.card.render_card` arguments (base model,
    datasets, sections)."""
    d = Path(model_dir)
    args = {**RM_CARD, **card, "title": None, "body": render_model_card(info, probes)}
    path = write_card(d, **args)
    atomic_write_json(d / "probes.json", probes)
    return path


# ----------------------------------------------------------------------------- entry point


def run_rm_eval(cfg: Any) -> dict:
    """Score ``cfg.rm_path`` on ``cfg.data_path``; write ``rm_eval.json``, ``reliability.png`` and
    ``rm_eval_scores.jsonl`` into ``cfg.output_dir`` (and ``README.md`` into the RM directory
    when it has none and ``cfg.model_card``). ``cfg`` is an :class:`rlhfstack.configs.RMEvalConfig`."""
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
    if cfg.model_card and card_dir is not None and not (card_dir / "README.md").exists():
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
        result["model_card"] = str(card_dir / "README.md")
    return result


def _first_member(ens_dir: Path) -> Path:
    spec = ens_dir / "ensemble.json"
    if spec.exists():
        return ens_dir / json.loads(spec.read_text())["members"][0]
    return ens_dir
