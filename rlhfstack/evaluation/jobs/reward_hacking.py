"""The reward-hacking job: query the policy (and a reference) model, run every detector, write
``reward_hacking.json``.

The detectors themselves (pure functions of texts and probe results) are in
:mod:`rlhfstack.evaluation.detectors`; this module loads the models they need, generates XSTest
completions, asks the sycophancy questions and writes the files. ``eval/reward_hacking.py`` calls
:func:`run_reward_hacking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from rlhfstack import logs
from rlhfstack.configs import DetectorThresholds
from rlhfstack.data.templates import get_template
from rlhfstack.evaluation.detectors import (
    LETTERS,
    ChoiceFn,
    load_completions,
    load_xstest,
    proxy_gold_gap,
    read_gold_proxy,
    run_detectors,
    skipped,
    sycophancy_probe,
    xstest_refusal,
)
from rlhfstack.models.core import load_causal_lm
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import atomic_write_json, atomic_write_jsonl, seed_everything

__all__ = ["make_choice_fn", "run_reward_hacking"]


def make_choice_fn(
    model: Any, tokenizer: Any, template: Any, device: str = "cpu", max_tokens: int | None = None
) -> ChoiceFn:
    """A :data:`ChoiceFn` that renders the conversation with ``template`` (a
    :class:`rlhfstack.data.templates.ChatTemplate`), appends the assistant prefix and picks the
    option letter whose continuation has the higher log-likelihood.

    The continuation is scored from the first token where ``text + letter`` tokenizes
    differently from ``text`` (BPE/SentencePiece may merge ``(`` and the letter into one token).
    """
    limit = max_tokens or int(getattr(model.config, "max_position_embeddings", 4096))

    def continuation_logprob(full: list[int], start: int) -> float:
        ids = full[-limit:]
        offset = len(full) - len(ids)
        start = max(start, offset + 1, 1)
        with torch.no_grad():
            logits_T = model(input_ids=torch.tensor([ids], device=device)).logits[0]
        logp_TV = logits_T.float().log_softmax(-1)
        pos = torch.arange(start - offset, len(ids), device=logp_TV.device)
        tgt = torch.tensor(ids, device=logp_TV.device)[pos]
        return float(logp_TV[pos - 1, tgt].sum())

    def choose(messages: list[dict[str, str]], prefix: str) -> int:
        text = template.join(template.render_prompt(messages), prefix)
        ctx = tokenizer.encode(text)
        scores = []
        for letter in LETTERS:
            full = tokenizer.encode(text + letter)
            k = 0
            while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
                k += 1
            scores.append(continuation_logprob(full, min(k, len(full) - 1)))
        return int(np.argmax(scores))

    return choose


def _data_path(data_root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(data_root) / p


def _generate(
    model: Any, tok: Any, template: Any, prompts: Sequence[str], cfg: Any, device: str
) -> list[str]:
    rendered = [template.render_prompt(p) for p in prompts]
    texts, _, _ = sample_texts(
        model,
        tok,
        rendered,
        max_new_tokens=cfg.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        temperature=cfg.temperature,
        greedy=cfg.greedy,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
        progress="sample",
    )
    out = []
    for t in texts:
        for stop in template.stop_strings:
            t = t.split(stop, 1)[0]
        out.append(t.strip())
    return out


def _load_model(path: str, cfg: Any, device: str) -> tuple[Any, Any, Any]:
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path, dtype=cfg.dtype, device=device, trainable=False)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Generation batches need a PAD distinct from EOS; the extra embedding row is never
        # attended to (pad positions are masked), so scores are unchanged.
        tok.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tok))
    return model, tok, get_template(cfg.template, tok)


def run_reward_hacking(cfg: Any) -> dict[str, Any]:
    """Run every detector as configured by a ``RewardHackingConfig`` and write
    ``output_dir/reward_hacking.json`` (plus ``xstest_samples.jsonl`` / ``sycophancy.json`` when a
    model was queried). Returns the JSON written."""
    logs.tag_job("reward_hacking")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    prompts, texts = load_completions(cfg.samples)
    ref_prompts, ref_texts = load_completions(cfg.reference) if cfg.reference else (None, None)

    xs_rows = None
    need_xstest = cfg.xstest_samples or cfg.model_path
    if need_xstest:
        xs_rows = load_xstest(_data_path(cfg.data_root, cfg.xstest_path))
    safe_prompts = [r["prompt"] for r in xs_rows or [] if r["label"] == "safe"]

    def query(model_path: str | None, xstest_file: str | None, tag: str) -> tuple[Any, Any]:
        """(xstest refusal stats, sycophancy probe) of one model; loads it only if needed and
        frees it before the next one (policy and reference never share the GPU)."""
        xs = None
        if xs_rows is not None and xstest_file:
            p_, c_ = load_completions(xstest_file)
            xs = xstest_refusal(p_, c_, xs_rows)
        if not model_path:
            return xs, None
        model, tok, template = _load_model(model_path, cfg, device)
        try:
            if xs is None and xs_rows is not None:
                comps = _generate(model, tok, template, safe_prompts, cfg, device)
                atomic_write_jsonl(
                    out_dir / f"xstest_{tag}.jsonl",
                    [
                        {"prompt": p, "completion": c}
                        for p, c in zip(safe_prompts, comps, strict=True)
                    ],
                )
                xs = xstest_refusal(safe_prompts, comps, xs_rows)
            probe = sycophancy_probe(make_choice_fn(model, tok, template, device))
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return xs, probe

    xstest, syc = query(cfg.model_path, cfg.xstest_samples, "samples")
    xstest_ref, syc_ref = query(cfg.reference_model_path, cfg.xstest_reference, "reference")
    if syc is not None:
        atomic_write_json(out_dir / "sycophancy.json", {"policy": syc, "reference": syc_ref})

    th = (
        cfg.thresholds
        if isinstance(cfg.thresholds, DetectorThresholds)
        else DetectorThresholds(**dict(cfg.thresholds))
    )
    result = run_detectors(
        texts,
        ref_texts,
        th,
        xstest=xstest,
        xstest_reference=xstest_ref,
        sycophancy=syc,
        sycophancy_reference=syc_ref,
        seed=cfg.seed,
        prompts=prompts,
        ref_prompts=ref_prompts,
    )
    if cfg.ppo_run_dir:
        steps, gold, proxy = read_gold_proxy(cfg.ppo_run_dir)
        result["proxy_gold_gap"] = proxy_gold_gap(steps, gold, proxy, th.proxy_gold_gap)
    else:
        result["proxy_gold_gap"] = skipped("needs ppo_run_dir")
    result["xstest"] = {"samples": xstest, "reference": xstest_ref}
    result["inputs"] = {
        "samples": str(cfg.samples),
        "reference": cfg.reference,
        "xstest_samples": cfg.xstest_samples,
        "xstest_reference": cfg.xstest_reference,
        "model_path": cfg.model_path,
        "reference_model_path": cfg.reference_model_path,
        "ppo_run_dir": cfg.ppo_run_dir,
    }
    atomic_write_json(out_dir / "reward_hacking.json", result)
    return result
