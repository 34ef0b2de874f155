"""SL-CAI (Bai et al. 2022, "Constitutional AI", section 3): critiques and revisions.

For each of ``n_prompts`` training prompts: sample a response from the policy (``model.path``),
draw a principle of the constitution at random, critique the response against it and revise it.
The revisions are the fine-tuning data; the ``sft`` stage trains on them
(``conf/experiment/demo_rlaif.yaml`` points it at ``sl_train.jsonl``; ``recipes/train_cai_sl.py``
runs both).

What stands in for critique and revision depends on the feedback model:

* a generative model (``feedback.kind=endpoint``: a served instruction model) writes the critique
  with the principle's ``critique_request`` and the revision with its ``revision_request``, as in
  the paper;
* a non-generative one (the embedding labeler, a local LM scoring options) cannot write, so
  there is **no critique**, and the "revision" is the best of ``candidates`` samples of the same
  policy under the drawn principle (a sequential tournament of both-order comparisons). Every
  saved row says which (``revision_method``).

Writes into ``run_dir`` (``runs/demo_rlaif/cai_sl``):
    revisions.jsonl       one row per prompt: prompt, principle, response, critique (or null),
                          revision, revision_method (and the candidates when best-of-k)
    sl_train.jsonl / sl_val.jsonl   ``{prompt, completion=revision}`` for the fine-tune
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from rlhfstack.configs import CAISLConfig
from rlhfstack.data import map_records, require_field
from rlhfstack.feedback import build_feedback_model, load_constitution
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.runtime import atomic_write_jsonl, write_stage_done
from rlhfstack.tasks.demo import sample_story_candidates
from rlhfstack.training import setup_run

log = logging.getLogger("rlhfstack.cai_sl")


def read_prompts(path: str, data_root: str, n: int) -> list[str]:
    """The first ``n`` prompts of a ``{prompt}`` jsonl file (errors name file, line, field)."""
    rows = map_records(
        path, lambda r: require_field(r, "prompt", str), fmt="jsonl", data_root=data_root
    )
    return rows[:n]


def _sample(cfg: CAISLConfig, run, policy, tok, prompts: list[str], k: int) -> list[list[str]]:
    cands, n_tok = sample_story_candidates(
        policy, tok, prompts, k, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, seed=cfg.seed, device=run.device,
    )  # fmt: skip
    run.cost.add_tokens(n_tok)
    return cands


def train(cfg: CAISLConfig) -> Path:
    run = setup_run(cfg)
    out = run.run_dir
    constitution = load_constitution(cfg.feedback.constitution)
    prompts = read_prompts(cfg.data.train_path, cfg.data_root, cfg.n_prompts)
    rng = np.random.default_rng(cfg.seed)
    drawn = [
        constitution.principles[int(rng.integers(len(constitution.principles)))] for _ in prompts
    ]
    fb = build_feedback_model(cfg.feedback, run.device)
    tok = load_tokenizer(cfg.model.path)
    policy = load_causal_lm(cfg.model.path, trainable=False, device=run.device)
    t0 = time.perf_counter()
    if fb.generative:
        responses = [c[0] for c in _sample(cfg, run, policy, tok, prompts, 1)]
        critiques: list[str | None] = list(fb.critique(prompts, responses, drawn))
        revisions = [r.strip() for r in fb.revise(prompts, responses, critiques, drawn)]
        method = "critique_and_revision: the feedback model wrote both (principle's requests)"
        candidates: list[list[str]] | None = None
    else:
        candidates = _sample(cfg, run, policy, tok, prompts, cfg.candidates)
        responses = [c[0] for c in candidates]
        best = fb.best_of(prompts, candidates, drawn)
        revisions = [c[b] for c, b in zip(candidates, best)]
        critiques = [None] * len(prompts)
        method = (
            f"best_of_{cfg.candidates}: no critique (the feedback model cannot write); the "
            "revision is the sample it prefers under the principle"
        )
    rows = []
    for i, p in enumerate(prompts):
        row = {
            "prompt": p,
            "principle": drawn[i].name,
            "response": responses[i],
            "critique": critiques[i],
            "revision": revisions[i],
            "revision_method": method,
        }
        if candidates is not None:
            row["candidates"] = candidates[i]
        rows.append(row)
    atomic_write_jsonl(out / "revisions.jsonl", rows)
    keep = [r for r in rows if r["revision"].strip()]
    perm = rng.permutation(len(keep))
    n_val = int(round(cfg.val_fraction * len(keep)))
    sl = [{"prompt": r["prompt"], "completion": r["revision"]} for r in keep]
    atomic_write_jsonl(out / "sl_train.jsonl", [sl[i] for i in sorted(perm[n_val:])])
    atomic_write_jsonl(out / "sl_val.jsonl", [sl[i] for i in sorted(perm[:n_val])])
    changed = float(np.mean([r["revision"] != r["response"] for r in rows])) if rows else 0.0
    log.info(
        "cai_sl: %d prompts, %d revisions kept (%.0f%% differ from the first response); "
        "feedback model %s: %.1f CPU s",
        len(rows),
        len(keep),
        100 * changed,
        fb.name,
        fb.cpu_seconds,
    )
    run.logger.log(0, {"revisions": len(keep), "revised_fraction": changed})
    run.logger.close()
    write_stage_done(
        out,
        {
            "stage": "cai_sl",
            "cost": run.cost.summary(),
            "feedback_model": {
                "name": fb.name,
                "cpu_seconds": round(fb.cpu_seconds, 3),
                "queries": fb.n_queries,
                "wall_seconds": round(time.perf_counter() - t0, 3),
            },
            "revisions": len(keep),
            "revised_fraction": changed,
            "revision_method": method,
            "constitution": constitution.path,
        },
    )
    return out


def fine_tune_overrides(cfg: CAISLConfig) -> list[str]:
    """Overrides of the ``sft`` stage that fine-tune ``model.path`` on this stage's revisions,
    saved in ``run_dir/policy`` (``recipes/train_cai_sl.py``; ``demo_rlaif.yaml`` names the same)."""
    out = Path(cfg.run_dir).resolve()
    return [
        f"artifacts_dir={cfg.artifacts_dir}",
        f"seed={cfg.seed}",
        f"data_root={cfg.data_root}",
        f"model.path={cfg.model.path}",
        f"run_dir={out / 'policy'}",
        f"data.train_path={out / 'sl_train.jsonl'}",
        f"data.eval_path={out / 'sl_val.jsonl'}",
    ]
