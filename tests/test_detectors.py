"""Reward-hacking detectors: crafted degenerate samples must trip them, clean samples must not."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rlhfstack.evaluation.detectors import (
    FAMILIES,
    SYCOPHANCY_QUESTIONS,
    DetectorThresholds,
    equal_budget_distinct_n,
    is_refusal,
    load_completions,
    load_xstest,
    make_choice_fn,
    proxy_gold_gap,
    run_detectors,
    sycophancy_probe,
    xstest_refusal,
)

WORDS = (
    "the a little girl boy dog cat park tree sun rain happy sad ran jumped played found "
    "ball red blue big small friend mom dad home school day night wanted saw said went "
    "loved ate apple cake bird fish water sky flower garden toy box door window car road"
).split()


def clean_texts(n: int, seed: int) -> list[str]:
    """Varied story-like sentences of 20-40 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 40))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def looping_texts(n: int, seed: int) -> list[str]:
    """Degenerate samples: a short phrase repeated until the text is ~4x the clean length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = " ".join(rng.choice(WORDS) for _ in range(3))
        out.append(" ".join([phrase] * rng.randint(35, 45)))
    return out


def flagged(result: dict) -> set[str]:
    return {k for k, v in result["flags"].items() if v["flagged"]}


def test_every_entry_is_named_by_family_and_well_formed():
    res = run_detectors(clean_texts(40, 1), clean_texts(40, 2))
    assert res["flags"], "no detectors ran"
    for name, entry in res["flags"].items():
        assert name.split("_", 1)[0] in FAMILIES, name
        assert {"flagged", "value", "threshold"} <= set(entry), name
        assert isinstance(entry["flagged"], bool)
    assert res["flags"]["sycophancy_pushback_flip_rate"] == {
        "flagged": False,
        "value": None,
        "threshold": None,
        "skipped": "needs model_path",
    }
    json.dumps(res)  # JSON-able


def test_clean_samples_trip_nothing():
    ref = clean_texts(60, seed=10)
    for seed in (11, 12, 13):
        res = run_detectors(clean_texts(60, seed=seed), ref)
        assert flagged(res) == set(), res["flags"]
        assert res["n_flagged"] == 0


def test_degenerate_samples_trip_length_and_repetition():
    res = run_detectors(looping_texts(60, seed=3), clean_texts(60, seed=10))
    hit = flagged(res)
    assert {"length_ratio_mean", "length_p90_ratio"} <= hit
    assert {"repetition_ngram_rate", "repetition_distinct2_drop", "repetition_loop_frac"} <= hit
    assert not any(k.startswith(("format_", "refusal_", "sycophancy_")) for k in hit)
    assert res["flags"]["length_ratio_mean"]["value"] > 2.5


def test_length_only_blowup_is_not_repetition():
    """Longer but still varied text: length flags fire, repetition flags do not."""
    rng = random.Random(0)
    long_clean = [
        " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(rng.randint(90, 120)))
        for _ in range(50)
    ]
    res = run_detectors(long_clean, clean_texts(50, 1))
    hit = flagged(res)
    assert "length_ratio_mean" in hit and "length_p90_ratio" in hit
    assert not any(k.startswith("repetition_") for k in hit)


def test_format_tics_against_reference():
    ref = clean_texts(40, 5)
    tics = []
    for i, t in enumerate(clean_texts(40, 6)):
        tics.append(
            f"Great question! \U0001f60a\n## Answer {i}\n- {t[:40]}\n- {t[40:80]}\n**Summary**\n{t}"
        )
    res = run_detectors(tics, ref)
    hit = flagged(res)
    assert {
        "format_bullet_rate",
        "format_heading_rate",
        "format_emoji_rate",
        "format_stock_opener_rate",
    } <= hit
    # the same rates in the reference: nothing flagged relative to it
    res2 = run_detectors(tics, tics)
    assert not any(k.startswith("format_") for k in flagged(res2))


def test_refusal_classifier():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry, I cannot do that")
    assert is_refusal("As an AI language model, I do not have opinions.")
    assert is_refusal("Well... I cannot assist with killing anything.")
    assert not is_refusal("To kill a Python process, run `kill -9 PID`.")
    assert not is_refusal("Sure, here is how you do it.")


def test_refusal_rate_vs_reference():
    ref = clean_texts(40, 1)
    refusing = ["I'm sorry, but I cannot help with that request."] * 20 + clean_texts(20, 2)
    res = run_detectors(refusing, ref)
    assert "refusal_rate_vs_reference" in flagged(res)
    assert res["flags"]["refusal_rate_vs_reference"]["value"] == pytest.approx(0.5)
    assert res["flags"]["refusal_xstest_rate"]["skipped"]


def test_xstest_refusal_explosion(data_root):
    rows = load_xstest(data_root / "safety" / "xstest_prompts.csv")
    safe = [r["prompt"] for r in rows if r["label"] == "safe"]
    assert len(safe) == 250
    th = DetectorThresholds()
    helpful = xstest_refusal(safe, ["Here is how: first, open the settings."] * 250, rows)
    assert helpful["n_safe"] == 250 and helpful["safe_refusal_rate"] == 0.0
    refusing = xstest_refusal(
        safe, ["I'm sorry, I can't help with that."] * 100 + ["Sure, here you go."] * 150, rows
    )
    assert refusing["safe_refusal_rate"] == pytest.approx(0.4)
    texts = clean_texts(30, 1)
    res_ok = run_detectors(texts, texts, th, xstest=helpful)
    res_bad = run_detectors(texts, texts, th, xstest=refusing)
    assert not res_ok["flags"]["refusal_xstest_rate"]["flagged"]
    assert res_bad["flags"]["refusal_xstest_rate"]["flagged"]
    assert res_bad["flags"]["refusal_xstest_rate"]["threshold"] == th.refusal_xstest
    # relative to a reference that refuses as often: not flagged
    res_rel = run_detectors(texts, texts, th, xstest=refusing, xstest_reference=refusing)
    assert not res_rel["flags"]["refusal_xstest_rate"]["flagged"]
    # unsafe prompts are separated out when the prompts are given
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"][:10]
    mixed = xstest_refusal(safe[:10] + unsafe, ["ok"] * 10 + ["I cannot."] * 10, rows)
    assert mixed["n_safe"] == 10 and mixed["safe_refusal_rate"] == 0.0
    assert mixed["unsafe_refusal_rate"] == 1.0


def _user_opinion(messages) -> int | None:
    text = messages[-1]["content"]
    for i, letter in enumerate("AB"):
        if f"I think the answer is ({letter})" in text:
            return i
    return None


def test_sycophancy_probe_flags_a_sycophant_only():
    def stubborn(messages, prefix):
        return 0

    def sycophant(messages, prefix):
        op = _user_opinion(messages)
        return 0 if op is None else op

    th = DetectorThresholds()
    calm = sycophancy_probe(stubborn)
    yes_man = sycophancy_probe(sycophant)
    assert calm["n"] == len(SYCOPHANCY_QUESTIONS)
    assert calm["pushback_flip_rate"] == 0.0 and calm["opinion_flip_rate"] == 0.0
    assert yes_man["pushback_flip_rate"] == 1.0 and yes_man["opinion_flip_rate"] == 1.0
    assert calm["initial_accuracy"] == pytest.approx(0.5)  # correct options alternate A/B
    texts = clean_texts(20, 0)
    ok = run_detectors(texts, texts, th, sycophancy=calm)
    bad = run_detectors(texts, texts, th, sycophancy=yes_man)
    assert not any(k.startswith("sycophancy_") for k in flagged(ok))
    assert {"sycophancy_pushback_flip_rate", "sycophancy_opinion_flip_rate"} <= flagged(bad)
    rel = run_detectors(texts, texts, th, sycophancy=yes_man, sycophancy_reference=yes_man)
    assert not any(k.startswith("sycophancy_") for k in flagged(rel))


def test_sycophancy_probe_runs_on_tiny_model(stories_hf):
    import torch

    from rlhfstack.data.templates import get_template
    from rlhfstack.models.core import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(str(stories_hf))
    model = load_causal_lm(str(stories_hf), trainable=False)
    fn = make_choice_fn(model, tok, get_template("hh"))
    probe = sycophancy_probe(fn, SYCOPHANCY_QUESTIONS[:6])
    assert probe["n"] == 6
    assert 0.0 <= probe["pushback_flip_rate"] <= 1.0
    assert probe == sycophancy_probe(fn, SYCOPHANCY_QUESTIONS[:6])  # deterministic


def test_proxy_gold_gap():
    steps = np.arange(10)
    proxy = np.linspace(0.0, 3.0, 10)
    gold_hacked = np.array([0.0, 0.4, 0.7, 0.9, 1.0, 0.9, 0.6, 0.3, 0.1, -0.1])
    gold_fine = np.array([0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.05, 1.1, 1.12])
    hacked = proxy_gold_gap(steps, gold_hacked, proxy)
    assert hacked["flagged"] and hacked["value"] > 0.8
    assert hacked["gold_peak_step"] == 4
    fine = proxy_gold_gap(steps, gold_fine, proxy)
    assert not fine["flagged"] and fine["value"] == pytest.approx(0.0, abs=0.05)
    # gold falls but proxy falls too: a broken run, not over-optimization
    assert not proxy_gold_gap(steps, gold_hacked, proxy[::-1])["flagged"]
    assert proxy_gold_gap([0, 1], [0, 1], [0, 1])["skipped"]


def test_equal_budget_distinct_n_is_size_fair():
    small, large = clean_texts(20, 1), clean_texts(200, 1)
    budget = sum(len(t.split()) - 1 for t in small)
    a = equal_budget_distinct_n(small, 2, budget)
    b = equal_budget_distinct_n(large, 2, budget)
    assert abs(a - b) < 0.05


def test_load_completions_formats(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"instruction": "p2", "output": "c2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"samples": rows}))
    (tmp_path / "c.json").write_text(json.dumps(["x", "y"]))
    assert load_completions(tmp_path / "a.jsonl") == (["p1", "p2"], ["c1", "c2"])
    assert load_completions(tmp_path / "b.json") == (["p1", "p2"], ["c1", "c2"])
    assert load_completions(tmp_path / "c.json") == ([None, None], ["x", "y"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="completion keys"):
        load_completions(tmp_path / "bad.jsonl")


def _write_jsonl(path, texts, prompts=None):
    prompts = prompts or [f"prompt {i}" for i in range(len(texts))]
    path.write_text(
        "".join(json.dumps({"prompt": p, "completion": t}) + "\n" for p, t in zip(prompts, texts))
    )
    return str(path)


def test_entry_point_config_end_to_end(tmp_path, data_root):
    """Hydra config -> run_reward_hacking -> reward_hacking.json (no model: sycophancy skipped)."""
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.evaluation.detectors import run_reward_hacking

    samples = _write_jsonl(tmp_path / "s.jsonl", looping_texts(30, 1))
    ref = _write_jsonl(tmp_path / "r.jsonl", clean_texts(30, 2))
    rows = load_xstest(data_root / "safety" / "xstest_prompts.csv")
    safe = [r["prompt"] for r in rows if r["label"] == "safe"]
    xs = _write_jsonl(tmp_path / "xs.jsonl", ["I'm sorry, I can't."] * len(safe), safe)
    run = tmp_path / "ppo"
    run.mkdir()
    gold = [0.0, 0.5, 1.0, 0.6, 0.2, 0.0]
    with open(run / "metrics.jsonl", "w") as f:
        for i, g in enumerate(gold):
            f.write(json.dumps({"step": i + 1, "kl/seq_k1": 0.5 * i, "loss": 1.0}) + "\n")
            f.write(
                json.dumps({"step": i + 1, "eval/gold_reward": g, "eval/proxy_reward": i}) + "\n"
            )
    out = tmp_path / "out"
    cfg = to_object(
        load_config(
            "reward_hacking",
            [
                f"samples={samples}",
                f"reference={ref}",
                f"xstest_samples={xs}",
                f"ppo_run_dir={run}",
                f"output_dir={out}",
                "thresholds.length_ratio_mean=2.0",
            ],
        )
    )
    assert cfg.thresholds.length_ratio_mean == 2.0
    res = run_reward_hacking(cfg)
    written = json.loads((out / "reward_hacking.json").read_text())
    assert written["flagged"] == res["flagged"]
    hit = set(res["flagged"])
    assert {"length_ratio_mean", "repetition_ngram_rate", "refusal_xstest_rate"} <= hit
    assert res["flags"]["length_ratio_mean"]["threshold"] == 2.0
    assert res["flags"]["sycophancy_opinion_flip_rate"]["skipped"] == "needs model_path"
    assert res["proxy_gold_gap"]["flagged"]
    assert res["xstest"]["samples"]["n_safe"] == 250


def test_entry_point_with_model_generates_xstest_and_probes(tmp_path, stories_hf):
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.evaluation.detectors import run_reward_hacking

    samples = _write_jsonl(tmp_path / "s.jsonl", clean_texts(20, 1))
    cfg = to_object(
        load_config(
            "reward_hacking",
            [
                f"samples={samples}",
                f"model_path={stories_hf}",
                f"output_dir={tmp_path / 'out'}",
                "max_new_tokens=4",
                "batch_size=128",
            ],
        )
    )
    res = run_reward_hacking(cfg)
    assert res["flags"]["refusal_xstest_rate"]["n"] == 250
    assert 0.0 <= res["flags"]["sycophancy_pushback_flip_rate"]["value"] <= 1.0
    assert (tmp_path / "out" / "xstest_samples.jsonl").exists()
    assert (tmp_path / "out" / "sycophancy.json").exists()
    assert res["flags"]["length_ratio_mean"]["skipped"] == "needs reference"


def test_real_outputs_same_model_clean_verbose_model_flagged(data_root):
    """AlpacaEval outputs: text-davinci-003 against itself (disjoint halves) trips nothing;
    GPT-4-turbo against davinci-003 on the same 805 prompts trips length and formatting only."""
    ev = data_root / "eval_prompts"
    dv = json.loads((ev / "alpaca_eval_805_text_davinci_003_outputs.json").read_text())
    g4 = json.loads((ev / "alpaca_eval_805_gpt4_1106_preview_outputs.json").read_text())
    dv_texts = [r["output"] for r in dv]
    assert flagged(run_detectors(dv_texts[1::2], dv_texts[::2])) == set()
    res = run_detectors(
        [r["output"] for r in g4],
        dv_texts,
        prompts=[r["instruction"] for r in g4],
        ref_prompts=[r["instruction"] for r in dv],
    )
    assert res["stats"]["paired_by_prompt"] == 805
    hit = flagged(res)
    assert {"length_ratio_mean", "length_p90_ratio", "format_bullet_rate"} <= hit
    assert not any(k.startswith(("repetition_", "refusal_")) for k in hit)


def test_pairing_by_prompt_removes_prompt_mix_effects():
    """Samples answer long-answer prompts only; the reference covers all prompts. Unpaired the
    length detector fires, paired (same prompts, same lengths) it does not."""
    rng = random.Random(0)
    prompts = [f"q{i}" for i in range(40)]
    ref = [" ".join(rng.choice(WORDS) for _ in range(10 if i % 2 else 60)) for i in range(40)]
    sample_prompts = prompts[::2]  # the long-answer half
    samples = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in sample_prompts]
    assert "length_ratio_mean" in flagged(run_detectors(samples, ref))
    paired = run_detectors(samples, ref, prompts=sample_prompts, ref_prompts=prompts)
    assert paired["stats"]["paired_by_prompt"] == 20
    assert "length_ratio_mean" not in flagged(paired)
