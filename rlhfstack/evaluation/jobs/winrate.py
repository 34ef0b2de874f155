"""Win-rate jobs: judges built from a config, samples generated, results written.

* :func:`run_winrate` (``eval/winrate.py``) -- judge sample file A against B; writes
  ``winrate.json``, ``judgments.jsonl`` and ``config.yaml``.
* :func:`run_generate_samples` (``eval/generate_samples.py``) -- one completion per prompt from a
  local HF model directory or an OpenAI-compatible endpoint.
* :func:`run_hh_eval` (``eval/hh_eval.py``) -- policy vs baseline on Anthropic HH prompts.

The statistics (pairing, bootstrap and length-controlled rates, judge agreement) and
:func:`rlhfstack.evaluation.winrate.compare` are in :mod:`rlhfstack.evaluation.winrate`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from rlhfstack import logs
from rlhfstack.configs import LLMJudgeConfig, validate
from rlhfstack.data.loading import load_prompts
from rlhfstack.evaluation.jobs.judges import RMJudge, load_gold_judge
from rlhfstack.evaluation.judges import (
    ChatClient,
    Judge,
    JudgmentCache,
    LLMJudge,
    load_judge_prompt,
)
from rlhfstack.evaluation.metrics import bootstrap_mean_ci
from rlhfstack.evaluation.winrate import (
    PairedSamples,
    compare,
    cut_at_stop,
    load_samples,
    pair_samples,
)
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.progress import track
from rlhfstack.rollout.generate import sample_texts
from rlhfstack.runtime import (
    atomic_write_json,
    atomic_write_jsonl,
    save_resolved_config,
    seed_everything,
)

log = logging.getLogger("rlhfstack.winrate")

__all__ = [
    "build_judge",
    "build_judges",
    "evaluate_samples",
    "generate_completions",
    "is_endpoint",
    "run_generate_samples",
    "run_hh_eval",
    "run_winrate",
]

# --------------------------------------------------------------------------------------------
# JSON output
# --------------------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Judges from a config
# --------------------------------------------------------------------------------------------


def _data_path(path: str, data_root: str | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or data_root is None else Path(data_root) / p


def _llm_config(cfg: Any, name: str) -> Any:
    """The ``llm`` block, with ``llm_judges[name]`` merged on top (unknown keys raise)."""
    base = OmegaConf.structured(cfg.llm if cfg.llm is not None else LLMJudgeConfig())
    if name == "llm" and name not in (cfg.llm_judges or {}):
        return OmegaConf.to_object(base)
    over = cfg.llm_judges[name]
    if not isinstance(over, Mapping):
        raise ValueError(f"llm_judges.{name} must be a mapping of LLMJudgeConfig fields")
    try:
        merged = OmegaConf.merge(base, dict(over))
    except Exception as err:
        raise ValueError(f"llm_judges.{name}: {err}") from None
    return validate(OmegaConf.to_object(merged), f"llm_judges.{name}.")


def build_judge(name: str, cfg: Any, cache: JudgmentCache) -> Judge:
    """The judge called ``name``: ``gold``, ``rm``, ``llm`` or a key of ``cfg.llm_judges``."""
    if name == "gold":
        return load_gold_judge(cfg.artifacts_dir, cfg.device, cache)
    if name == "rm":
        if not cfg.rm_path:
            raise ValueError("judge=rm needs rm_path=DIR (a reward model saved by the RM stage)")
        return RMJudge.from_path(
            cfg.rm_path,
            device=cfg.device,
            cache=cache,
            max_len=cfg.rm_max_len,
            batch_size=cfg.batch_size,
        )
    if name == "llm" or name in (cfg.llm_judges or {}):
        lc = _llm_config(cfg, name)
        client = ChatClient.from_config(lc)
        prompt_path = _data_path(lc.prompt_file, cfg.data_root) if lc.prompt_file else None
        prompt = load_judge_prompt(prompt_path, lc.prompt_name)
        return LLMJudge(
            name,
            client,
            prompt,
            temperature=lc.temperature,
            max_tokens=lc.max_tokens,
            concurrency=lc.concurrency,
            cache=cache,
        )
    options = ["gold", "rm", "llm", *sorted(cfg.llm_judges or {})]
    raise ValueError(f"unknown judge {name!r}; choose from {options}")


def build_judges(cfg: Any, cache: JudgmentCache) -> dict[str, Judge]:
    """Judges named by ``cfg.judges`` (or ``[cfg.judge]``), in order."""
    names = list(cfg.judges) if cfg.judges else [cfg.judge]
    if len(set(names)) != len(names):
        raise ValueError(f"judges: duplicate names in {names}")
    return {n: build_judge(n, cfg, cache) for n in names}


# --------------------------------------------------------------------------------------------
# Judge and write
# --------------------------------------------------------------------------------------------


def evaluate_samples(
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    cfg: Any,
    output_dir: str | os.PathLike,
    *,
    judges: Mapping[str, Judge] | None = None,
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Pair, judge and write ``output_dir/judgments.jsonl``; returns the results (the caller
    writes them). ``cfg`` is a :class:`rlhfstack.configs.JudgingConfig` (or subclass); the
    judges are built from it (with their own cache) unless ``judges`` is given."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paired = pair_samples(rows_a, rows_b)
    if max_pairs is not None and len(paired) > max_pairs:
        paired = PairedSamples(
            paired.prompts[:max_pairs],
            paired.answers_a[:max_pairs],
            paired.answers_b[:max_pairs],
            None if paired.difficulty_N is None else paired.difficulty_N[:max_pairs],
            paired.n_unmatched_a,
            paired.n_unmatched_b,
        )
    cache = JudgmentCache(cfg.cache_path) if judges is None else None
    try:
        judges = judges if judges is not None else build_judges(cfg, cache)
        res, rows = compare(
            paired,
            judges,
            length_unit=cfg.length_unit,
            n_boot=cfg.n_bootstrap,
            lc_n_boot=cfg.lc_n_bootstrap,
            seed=cfg.seed,
        )
    finally:
        if cache is not None:
            cache.close()
    res = _clean(res)
    atomic_write_jsonl(out_dir / "judgments.jsonl", _clean(rows))
    return res


def _config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def run_winrate(cfg: Any) -> dict[str, Any]:
    """``eval/winrate.py``: judge ``cfg.a`` against ``cfg.b``; writes ``winrate.json``,
    ``judgments.jsonl`` and ``config.yaml`` into ``cfg.output_dir``."""
    logs.tag_job("winrate")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    res = evaluate_samples(
        load_samples(cfg.a), load_samples(cfg.b), cfg, out_dir, max_pairs=cfg.max_pairs
    )
    res = {"a": str(cfg.a), "b": str(cfg.b), **res, "config": _clean(_config_dict(cfg))}
    atomic_write_json(out_dir / "winrate.json", res)
    log.info(
        "win-rate of A over B: %.3f [%.3f, %.3f] (n=%d); written to %s",
        res["rate"],
        *res["ci95"],
        res["n"],
        out_dir / "winrate.json",
    )
    return res


# --------------------------------------------------------------------------------------------
# Generation (local HF directory or OpenAI-compatible endpoint)
# --------------------------------------------------------------------------------------------


def is_endpoint(model: str) -> bool:
    """True for an ``http(s)://`` endpoint URL (else a local model directory)."""
    return model.startswith(("http://", "https://"))


def generate_completions(
    model: str | None,
    prompts: Sequence[str],
    gen: Any,
    *,
    device: str = "cpu",
    seed: int = 0,
    api_model: str | None = None,
) -> list[str]:
    """One completion per prompt from a local HF model directory (``sample_texts``, batched
    KV-cache sampling) or an OpenAI-compatible endpoint (chat completions, one user message per
    prompt): ``model`` when it is an ``http(s)://`` URL (requesting ``api_model``, default
    ``gen.model``), else ``gen.base_url`` when ``model`` is None. ``gen`` is a
    :class:`rlhfstack.configs.GenerationConfig`; completions are cut at ``gen.stop``."""
    base_url = model if model and is_endpoint(model) else None if model else gen.base_url
    if model is None and base_url is None:
        raise ValueError(
            "nothing to generate from: set model_path (a model directory) or generation.base_url "
            "and generation.model (an OpenAI-compatible endpoint)"
        )
    if base_url is not None:
        name = api_model or gen.model
        if not name:
            raise ValueError(
                f"{base_url} is an endpoint: set generation.model (the model to request)"
            )
        client = ChatClient(
            name,
            base_url=base_url,
            api_key_env=gen.api_key_env,
            requests_per_minute=gen.requests_per_minute,
            max_retries=gen.max_retries,
            max_connection_retries=gen.max_connection_retries,
            timeout_s=gen.timeout_s,
        )
        params: dict[str, Any] = {"temperature": gen.temperature, "max_tokens": gen.max_new_tokens}
        if gen.stop:
            params["stop"] = list(gen.stop)[:4]  # the API accepts at most 4

        def one(p: str) -> str:
            return client.complete([{"role": "user", "content": p}], **params)

        with ThreadPoolExecutor(max_workers=max(1, gen.concurrency)) as pool:
            texts = list(track(pool.map(one, prompts), "request", total=len(prompts), unit="req"))
    else:
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model {model!r}: neither a directory nor an http(s) endpoint")
        lm = load_causal_lm(model, dtype=gen.dtype, trainable=False, device=device)
        tok = load_tokenizer(model)
        texts, _, _ = sample_texts(
            lm,
            tok,
            list(prompts),
            max_new_tokens=gen.max_new_tokens,
            max_prompt_tokens=gen.max_prompt_tokens,
            temperature=gen.temperature,
            greedy=gen.greedy,
            batch_size=gen.batch_size,
            seed=seed,
            progress="sample",
            device=device,
        )
    return [cut_at_stop(t, gen.stop) for t in texts]


def run_generate_samples(cfg: Any) -> Path:
    """``eval/generate_samples.py``: write ``cfg.output`` (jsonl of ``{prompt, completion}``)."""
    logs.tag_job("generate_samples")
    if cfg.model_path and is_endpoint(cfg.model_path):
        raise ValueError(
            f"model_path={cfg.model_path!r} is a URL: an endpoint is set with "
            f"generation.base_url={cfg.model_path} generation.model=NAME (model_path names a "
            "local model directory)"
        )
    seed_everything(cfg.seed)
    examples, _ = load_prompts(
        cfg.prompts,
        adapter=cfg.adapter,
        template=cfg.template,
        data_root=cfg.data_root,
        max_records=cfg.max_prompts,
    )
    prompts = [e.prompt for e in examples]
    texts = generate_completions(
        cfg.model_path, prompts, cfg.generation, device=cfg.device, seed=cfg.seed
    )
    out = Path(cfg.output)
    atomic_write_jsonl(out, [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)])
    source = cfg.model_path or f"{cfg.generation.base_url} ({cfg.generation.model})"
    log.info("%d samples from %s written to %s", len(texts), source, out)
    return out


# --------------------------------------------------------------------------------------------
# HH evaluation
# --------------------------------------------------------------------------------------------


def run_hh_eval(cfg: Any) -> dict[str, Any]:
    """``eval/hh_eval.py``: policy vs baseline on Anthropic HH prompts, judged by the reward
    model and/or LLM judges. Writes ``policy_samples.jsonl``, ``baseline_samples.jsonl``,
    ``winrate.json``, ``judgments.jsonl``, ``hh_eval.json`` and ``config.yaml``."""
    logs.tag_job("hh_eval")
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out_dir)
    examples, _ = load_prompts(
        cfg.prompts, adapter=cfg.adapter, template=cfg.template, data_root=cfg.data_root
    )
    prompts = list(dict.fromkeys(e.prompt for e in examples))  # distinct, in file order
    if cfg.n_prompts is not None and cfg.n_prompts < len(prompts):
        idx = np.sort(
            np.random.default_rng(cfg.seed).choice(len(prompts), cfg.n_prompts, replace=False)
        )
        prompts = [prompts[i] for i in idx]
    sides: dict[str, list[dict[str, Any]]] = {}
    for side, src, api_model in (
        ("policy", cfg.policy, cfg.policy_api_model),
        ("baseline", cfg.baseline, cfg.baseline_api_model),
    ):
        if src.endswith(".jsonl"):
            sides[side] = load_samples(src)
            continue
        log.info("generating %d %s completions with %s", len(prompts), side, src)
        texts = generate_completions(
            src, prompts, cfg.generation, device=cfg.device, seed=cfg.seed, api_model=api_model
        )
        sides[side] = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]
        atomic_write_jsonl(out_dir / f"{side}_samples.jsonl", sides[side])
    res: dict[str, Any] = {
        "policy": str(cfg.policy),
        "baseline": str(cfg.baseline),
        "prompts": str(cfg.prompts),
        "n_prompts": len(prompts),
    }
    cache = JudgmentCache(cfg.cache_path)
    try:
        judges = build_judges(cfg, cache)
        wr = evaluate_samples(sides["policy"], sides["baseline"], cfg, out_dir, judges=judges)
        res["winrate"] = wr
        rm_judge = judges.get("rm")
        if isinstance(rm_judge, RMJudge):  # mean RM reward per side (scores come from the cache)
            paired = pair_samples(sides["policy"], sides["baseline"])
            sa, _ = rm_judge.score(paired.prompts, paired.answers_a)
            sb, _ = rm_judge.score(paired.prompts, paired.answers_b)
            res["rm_reward"] = {
                "policy": bootstrap_mean_ci(sa, cfg.n_bootstrap, cfg.seed),
                "baseline": bootstrap_mean_ci(sb, cfg.n_bootstrap, cfg.seed),
                "difference": bootstrap_mean_ci(sa - sb, cfg.n_bootstrap, cfg.seed),
            }
    finally:
        cache.close()
    res["config"] = _config_dict(cfg)
    res = _clean(res)
    atomic_write_json(out_dir / "winrate.json", {**wr, "config": res["config"]})
    atomic_write_json(out_dir / "hh_eval.json", res)
    log.info(
        "HH: policy over baseline %.3f [%.3f, %.3f] (n=%d, judges %s)",
        wr["rate"],
        *wr["ci95"],
        wr["n"],
        wr["judges"],
    )
    return res
