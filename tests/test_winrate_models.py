"""Gold and RM judges on the real tiny stories260K model, local / endpoint generation, HH eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfstack.configs import load_config, to_object
from rlhfstack.evaluation.jobs.judges import RMJudge
from rlhfstack.evaluation.jobs.winrate import run_generate_samples, run_hh_eval, run_winrate
from rlhfstack.evaluation.judges import JudgmentCache

PROMPTS = [
    "Lily and Tom went to the park.",
    "Once upon a time, there was a cat.",
    "The sun was hot.",
    "Ben had a red ball.",
]
GOOD = [
    "They played and laughed. It was a happy day.",
    "The cat was kind and loved to play.",
    "They had fun in the water.",
    "He loved his ball very much.",
]
BAD = [
    "ball the the sad sad tree",
    "It was sad. It was sad. It was sad. It was sad.",
    "They were angry and cried.",
    "no no no no no no",
]


def _rows(prompts, answers):
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def demo_artifacts(stories_hf, tmp_path_factory) -> Path:
    """A tiny ``artifacts_dir`` with what ``load_gold`` needs: base_model/ and data/gold.json."""
    art = tmp_path_factory.mktemp("art")
    (art / "base_model").symlink_to(stories_hf, target_is_directory=True)
    (art / "data").mkdir()
    (art / "data" / "gold.json").write_text(json.dumps({"f0": -1.5, "f_scale": 0.5}))
    return art


@pytest.fixture(scope="module")
def tiny_rm(stories_hf, tmp_path_factory) -> Path:
    """A reward model with a random head on the stories260K trunk, saved as the RM stage does."""
    from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    rm = RewardModel(
        load_causal_lm(str(stories_hf), trainable=False), kind="causal_lm", k=1, init_std=1.0
    )
    out = tmp_path_factory.mktemp("rm") / "model"
    out.mkdir()
    rm.save(out)
    load_tokenizer(str(stories_hf)).save_pretrained(out)
    return out


def test_gold_judge_cli_self_is_half_and_good_beats_bad(demo_artifacts, tmp_path):
    fa = _write(tmp_path / "good.jsonl", _rows(PROMPTS, GOOD))
    fb = _write(tmp_path / "bad.jsonl", _rows(PROMPTS, BAD))
    common = [
        f"artifacts_dir={demo_artifacts}",
        "judge=gold",
        f"cache_path={tmp_path}/c.sqlite",
        "n_bootstrap=200",
        "lc_n_bootstrap=10",
    ]
    self_res = run_winrate(
        to_object(
            load_config("winrate", [f"a={fa}", f"b={fa}", f"output_dir={tmp_path}/self", *common])
        )
    )
    assert self_res["rate"] == 0.5
    assert self_res["ci95"][0] <= 0.5 <= self_res["ci95"][1]
    assert json.loads((tmp_path / "self" / "winrate.json").read_text())["rate"] == 0.5

    res = run_winrate(
        to_object(
            load_config("winrate", [f"a={fa}", f"b={fb}", f"output_dir={tmp_path}/gb", *common])
        )
    )
    assert res["rate"] == 1.0  # the gold reward prefers fluent, happy, non-repetitive text
    assert res["per_judge"]["gold"]["stats"]["n_scored"] == 4  # the GOOD texts came from the cache
    # the reverse direction is the complement
    rev = run_winrate(
        to_object(
            load_config("winrate", [f"a={fb}", f"b={fa}", f"output_dir={tmp_path}/bg", *common])
        )
    )
    assert rev["rate"] == 0.0 and rev["per_judge"]["gold"]["stats"]["n_scored"] == 0


def test_rm_judge_matches_training_time_scoring(tiny_rm, tmp_path):
    from rlhfstack.data.collate import tokenize_preference
    from rlhfstack.data.schemas import PreferenceExample
    from rlhfstack.models.core import RewardModel, load_tokenizer
    from rlhfstack.stages.reward_model import score_pairs

    judge = RMJudge.from_path(tiny_rm, cache=JudgmentCache(tmp_path / "c.sqlite"), batch_size=3)
    res = judge.judge(PROMPTS, GOOD, BAD)
    rm, tok = RewardModel.load(tiny_rm), load_tokenizer(str(tiny_rm))
    items = tokenize_preference(
        [PreferenceExample(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)], tok, 1024
    )
    c, r = score_pairs(rm, items, tok.pad_token_id, "cpu")
    np.testing.assert_allclose(res.details["score_a"], c, atol=1e-4)
    np.testing.assert_allclose(res.details["score_b"], r, atol=1e-4)
    np.testing.assert_array_equal(res.outcomes_N, (c > r).astype(float) + 0.5 * (c == r))
    # self-comparison through the config path: exactly 0.5
    fa = _write(tmp_path / "a.jsonl", _rows(PROMPTS, GOOD))
    out = run_winrate(
        to_object(
            load_config(
                "winrate",
                [
                    f"a={fa}",
                    f"b={fa}",
                    "judge=rm",
                    f"rm_path={tiny_rm}",
                    f"output_dir={tmp_path}/o",
                    f"cache_path={tmp_path}/c.sqlite",
                    "n_bootstrap=100",
                    "lc_n_bootstrap=0",
                ],
            )
        )
    )
    assert out["rate"] == 0.5 and out["per_judge"]["rm"]["stats"]["n_scored"] == 0  # cached


def test_generate_samples_local_and_endpoint(stories_hf, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_samples_script",
        Path(__file__).resolve().parent.parent / "eval" / "generate_samples.py",
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.alias_model_arg(["model=x", "prompts=y", "model_path=z"]) == [
        "model_path=x",
        "prompts=y",
        "model_path=z",
    ]
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "local.jsonl"
    cfg = to_object(
        load_config(
            "generate_samples",
            [
                f"model_path={stories_hf}",
                f"prompts={prompts}",
                f"output={out}",
                "generation.max_new_tokens=6",
                "generation.stop=['.']",
            ],
        )
    )
    run_generate_samples(cfg)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    assert all(isinstance(r["completion"], str) and "." not in r["completion"] for r in rows)

    from test_judges_llm import FakeChatServer

    with FakeChatServer(n_429=1) as server:
        out2 = tmp_path / "api.jsonl"
        cfg = to_object(
            load_config(
                "generate_samples",
                [
                    f"generation.base_url={server.url}",
                    f"prompts={prompts}",
                    f"output={out2}",
                    "generation.model=longer",
                    "generation.api_key_env=null",
                    "generation.requests_per_minute=0",
                ],
            )
        )
        run_generate_samples(cfg)
        assert server.n_requests == 3 + 1
        assert server.bodies[-1]["max_tokens"] == 128
    rows = [json.loads(x) for x in out2.read_text().splitlines()]
    assert sorted(r["completion"] for r in rows) == sorted(
        f"reply from longer: {p[:24]}" for p in PROMPTS[:3]
    )


def test_hh_eval_rm_scored(stories_hf, tiny_rm, tmp_path):
    out = tmp_path / "hh"
    cfg = to_object(
        load_config(
            "hh_eval",
            [
                f"policy={stories_hf}",
                f"baseline={stories_hf}",
                f"rm_path={tiny_rm}",
                "n_prompts=3",
                "generation.max_new_tokens=5",
                "generation.max_prompt_tokens=48",
                "rm_max_len=96",
                f"output_dir={out}",
                f"cache_path={tmp_path}/c.sqlite",
                "n_bootstrap=100",
                "lc_n_bootstrap=0",
            ],
        )
    )
    res = run_hh_eval(cfg)
    assert res["n_prompts"] == 3 and res["winrate"]["n"] == 3
    # same model, same seed: identical samples, a tie everywhere
    assert res["winrate"]["rate"] == 0.5
    assert res["rm_reward"]["difference"]["mean"] == 0.0
    pol = [json.loads(x) for x in (out / "policy_samples.jsonl").read_text().splitlines()]
    assert all(
        r["prompt"].startswith("\n\nHuman:") and r["prompt"].endswith("Assistant:") for r in pol
    )
    for name in ("hh_eval.json", "winrate.json", "judgments.jsonl", "config.yaml"):
        assert (out / name).exists()


def test_gold_without_its_base_model_names_the_missing_directory(tmp_path):
    from rlhfstack.tasks.demo import gold_scorer_for

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gold.json").write_text(json.dumps({"f0": -1.5, "f_scale": 0.5}))
    with pytest.raises(FileNotFoundError, match=r"base_model: the gold reward's frozen base model"):
        gold_scorer_for("stories", tmp_path)
