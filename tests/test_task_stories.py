"""Tests for the embedded story-continuation task: prompts, gold reward, simulated labelers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfstack.tasks.stories import (
    GoldReward,
    Labeler,
    LMFluencyScorer,
    best_of_k_pairs,
    calibrate_fluency,
    default_labeler_pool,
    gold_judge,
    join_prompt_completion,
    judge_outcomes,
    judge_pool_noiseless,
    label_pair,
    label_pairs,
    labeler_agreement_with_gold,
    make_story_prompts,
    normalize_words,
    split_prompts,
)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("RLHF_DATA_ROOT", REPO.parent / "shared" / "data"))
if not DATA_ROOT.is_absolute():
    DATA_ROOT = (REPO / DATA_ROOT).resolve()
GPT2_DIR = DATA_ROOT / "models" / "tiny-gpt2"

HAPPY = "She was so happy and loved her new friend."
SAD = "She was sad and angry and cried."
SALAD = "ball the the happy happy happy tree the"
FLUENT_POS = "They played with the ball and had a happy day."
LOOP = "they were happy and they were happy and they were happy and they were happy"
NO_LOOP = "they were happy and they played with the ball in the sun all day"


def fake_fluency(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """Stand-in for the base LM: -1.4 nats/token, -1.5 more per immediately repeated word and per
    stray "the" before a non-noun-ish word (crude, but deterministic and text-based)."""
    out = []
    for c in completions:
        w = normalize_words(c)
        bad = sum(a == b for a, b in zip(w, w[1:]))
        bad += sum(a == "the" and b in {"the", "happy", "tree"} for a, b in zip(w, w[1:]))
        out.append(-1.4 - 1.5 * bad / max(len(w), 1) * 4)
    return np.array(out)


@pytest.fixture(scope="module")
def gold() -> GoldReward:
    return GoldReward(fluency_fn=fake_fluency)


# ------------------------------------------------------------------------------ prompts


def test_prompts_deterministic_distinct_and_clean() -> None:
    p1 = make_story_prompts(3000, seed=0)
    p2 = make_story_prompts(3000, seed=0)
    assert p1 == p2
    assert len(set(p1)) == 3000
    assert make_story_prompts(50, seed=1) != p1[:50]
    for p in p1:
        assert p.isascii() and p == p.strip() and "{" not in p
        assert p[-1].isalpha() or p[-1] in ".,"
        assert " a a" not in p and " a o" not in p and " a e" not in p  # no "a owl"
    # many different templates are used
    assert len({p.split()[0] for p in p1}) > 10


def test_split_prompts() -> None:
    prompts = make_story_prompts(100, seed=3)
    train, held = split_prompts(prompts, 20, seed=0)
    assert len(train) == 80 and len(held) == 20
    assert set(train) | set(held) == set(prompts) and not set(train) & set(held)
    assert split_prompts(prompts, 20, seed=0) == (train, held)
    with pytest.raises(ValueError):
        split_prompts(prompts, 101)


def test_join_prompt_completion() -> None:
    assert join_prompt_completion("They saw", "a dog") == "They saw a dog"
    assert join_prompt_completion("They saw", " a dog") == "They saw a dog"
    assert join_prompt_completion("He said,", '"Hi!"') == 'He said, "Hi!"'
    assert join_prompt_completion("Max", "'s ball.") == "Max's ball."
    assert join_prompt_completion("They saw", ".") == "They saw."
    assert join_prompt_completion("They saw", "") == "They saw"


# ------------------------------------------------------------------------------ gold reward


def test_gold_prefers_positive(gold: GoldReward) -> None:
    f = gold.features(["Lily went to the park."] * 2, [HAPPY, SAD])
    assert f["sentiment"][0] > 0.5 > -0.5 > f["sentiment"][1]
    s = gold.score(["Lily went to the park."] * 2, [HAPPY, SAD])
    assert s[0] > s[1] + 1.0
    np.testing.assert_allclose(s, f["gold"])
    assert set(f) == {"sentiment", "fluency", "fluency_norm", "repetition", "length_words", "gold"}


def test_gold_word_salad_loses(gold: GoldReward) -> None:
    s = gold.score(["They saw"] * 2, [FLUENT_POS, SALAD])
    assert s[0] > s[1] + 0.5


def test_gold_repetition_penalizes_loops(gold: GoldReward) -> None:
    f = gold.features(["Lily and Tom went to the park."] * 2, [LOOP, NO_LOOP])
    assert f["repetition"][0] > 0.5 and f["repetition"][1] == 0.0
    assert f["gold"][0] < f["gold"][1] - 0.5


def test_gold_empty_and_weights() -> None:
    g = GoldReward(fluency_fn=fake_fluency, w_fluency=0.0, w_repetition=0.0)
    f = g.features(["x", "y"], ["", "   "])
    assert np.all(f["sentiment"] == 0.0) and np.all(f["gold"] == 0.0)
    with pytest.raises(ValueError):
        GoldReward()
    g2 = GoldReward(fluency_fn=fake_fluency, f0=-1.0, f_scale=0.5)
    np.testing.assert_allclose(g2.normalize_fluency(np.array([-1.0, 0.0, -10.0])), [0, 1, -3])
    f0, scale = calibrate_fluency([-1.0, -2.0, -1.5, float("nan")])
    assert f0 == pytest.approx(-1.5) and scale == 0.5
    assert calibrate_fluency([-1.0, -3.0], min_scale=0.1) == (-2.0, 1.0)


# ------------------------------------------------------------------------------ LM fluency


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    if not GPT2_DIR.exists():
        pytest.skip(f"missing {GPT2_DIR}")
    tok = transformers.AutoTokenizer.from_pretrained(str(GPT2_DIR))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return model, tok


def _manual_fluency(model, tok, prompt: str, completion: str) -> float:
    p_ids = tok(prompt)["input_ids"]
    ids = tok(join_prompt_completion(prompt, completion))["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    tgt = torch.tensor(ids[1:])
    tok_lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
    return float(tok_lp[len(p_ids) - 1 :].mean())


def test_lm_fluency_matches_manual_and_is_batch_invariant(tiny_lm) -> None:
    model, tok = tiny_lm
    model.train()  # the scorer must switch to eval and back
    prompts = ["Lily and Tom went to the park.", "One day, Max", "The cat", "Hi"]
    comps = ["They saw a dog.", "ran home", "", "there was a big happy dog and a cat"]
    s1 = LMFluencyScorer(model, tok, batch_size=1)(prompts, comps)
    s4 = LMFluencyScorer(model, tok, batch_size=4)(prompts, comps)
    np.testing.assert_allclose(s1, s4, atol=1e-5)
    assert s1[2] == -10.0  # empty completion
    assert model.training
    for i in (0, 1, 3):
        assert s1[i] == pytest.approx(_manual_fluency(model, tok, prompts[i], comps[i]), abs=1e-5)
    assert np.all(s1[[0, 1, 3]] < 0)


def test_lm_fluency_truncates_long_inputs(tiny_lm) -> None:
    model, tok = tiny_lm
    long_prompt = " ".join(["the dog ran"] * 30)  # ~90 tokens > max_position_embeddings=32
    scorer = LMFluencyScorer(model, tok, batch_size=2)
    out = scorer([long_prompt, ""], ["and the cat sat.", "x"])
    assert np.all(np.isfinite(out)) and out.shape == (2,)
    g = GoldReward(model, tok)
    assert g.score(["Hi"], [HAPPY]).shape == (1,)


def test_gold_with_real_stories260k(stories_hf) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(stories_hf))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(stories_hf))
    g = GoldReward(model, tok)
    prompt = "Lily and Tom went to the park."
    fluent = "They saw a big dog. The dog was very friendly and they became best friends."
    f = g.features([prompt] * 4, [fluent, SALAD, LOOP, SAD])
    assert f["fluency"][0] > f["fluency"][1] + 2.0
    assert f["gold"][0] > max(f["gold"][1:]) + 1.0
    assert f["gold"][1] > f["gold"][3]  # salad is bad, a fluent sad story is worse


# ------------------------------------------------------------------------------ labelers


def _random_features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "sentiment": rng.uniform(-1, 1, n),
        "fluency_norm": rng.uniform(-3, 1, n),
        "repetition": rng.uniform(0, 0.5, n),
        "length_words": rng.integers(5, 40, n).astype(float),
    }


def test_label_pair_flip_rate() -> None:
    rng = np.random.default_rng(0)
    fa, fb = _random_features(rng, 2000), _random_features(rng, 2000)
    lab = default_labeler_pool()[0]
    res = [
        label_pair({k: v[i] for k, v in fa.items()}, {k: v[i] for k, v in fb.items()}, lab, rng)
        for i in range(2000)
    ]
    disagree = np.mean([r["prefers_a"] != r["noiseless_prefers_a"] for r in res])
    assert abs(disagree - 0.25) < 0.03
    assert all(r["noiseless_prefers_a"] == (r["utility_a"] > r["utility_b"]) for r in res)
    noiseless = Labeler("exact", 1.0, 0.0, 0.0, 0.0, flip_prob=0.0)
    r = label_pair({**{k: v[0] for k, v in fa.items()}, "sentiment": 0.9}, {**{k: v[0] for k, v in fb.items()}, "sentiment": -0.9}, noiseless, rng)  # fmt: skip
    assert r["prefers_a"] and not r["flipped"]


def test_length_lover_prefers_longer() -> None:
    rng = np.random.default_rng(1)
    fa, fb = _random_features(rng, 2000), _random_features(rng, 2000)
    a_longer = fa["length_words"] > fb["length_words"]
    rates = {}
    for lab in default_labeler_pool():
        prefers_a = np.array(
            [
                label_pair(
                    {k: v[i] for k, v in fa.items()}, {k: v[i] for k, v in fb.items()}, lab, rng
                )["prefers_a"]
                for i in range(2000)
            ]
        )
        rates[lab.name] = np.mean(prefers_a == a_longer)
    others = [v for k, v in rates.items() if k != "length_lover"]
    assert rates["length_lover"] > max(others) + 0.05
    assert abs(max(others) - 0.5) < 0.05


def _corpus(rng: np.random.Generator, n: int) -> list[str]:
    parts = [
        "they played all day",
        "she was very happy",
        "he was sad",
        "the dog ran to the park",
        "they were scared",
        "it was a fun day",
        "mom gave them a big hug",
        "the ball was lost",
        "they laughed and smiled",
        "he cried and cried",
        "the sun was warm",
        "she found her friend",
    ]
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        out.append(
            ". ".join(parts[int(j)] for j in rng.integers(0, len(parts), k)).capitalize() + "."
        )
    return out


def test_label_pairs_end_to_end(gold: GoldReward) -> None:
    rng = np.random.default_rng(2)
    n = 2000
    a, b = _corpus(rng, n), _corpus(rng, n)
    b[0] = a[0]  # identical pair is skipped
    prompts = ["Lily went to the park."] * n
    labels = label_pairs(prompts, a, b, gold, seed=0)
    assert len(labels) == n - int(sum(x == y for x, y in zip(a, b)))
    assert all(lab["index"] != 0 for lab in labels)
    flip_rate = np.mean([lab["flipped"] for lab in labels])
    assert abs(flip_rate - 0.25) < 0.03
    for lab in labels[:50]:
        i = lab["index"]
        assert {lab["chosen"], lab["rejected"]} == {a[i], b[i]}
        assert lab["chosen"] == (a[i] if lab["a_is_chosen"] else b[i])
        assert lab["agrees_with_gold"] == (lab["gold_margin"] > 0)
    names = [lab["labeler"] for lab in labels]
    assert names[:4] == [lab.name for lab in default_labeler_pool()]  # round robin
    agree = labeler_agreement_with_gold(labels)
    assert set(agree) == set(names)
    # "balanced" has the gold weights: it agrees with gold unless it flipped (or gold ties).
    assert abs(agree["balanced"] - 0.75) < 0.06
    assert agree["length_lover"] < agree["balanced"]
    assert label_pairs(prompts[:2], a[:2], a[:2], gold) == []
    rnd = label_pairs(prompts[:100], a[:100], b[:100], gold, seed=0, assignment="random")
    assert rnd == label_pairs(prompts[:100], a[:100], b[:100], gold, seed=0, assignment="random")


def test_best_of_k_pairs() -> None:
    prompts = ["p1", "p2", "p3"]
    comps = [["a", "b", "c", "a"], ["x", "x"], ["u", "v"]]
    pp, ca, cb = best_of_k_pairs(prompts, comps, pairs_per_prompt=2, seed=0)
    assert pp == ["p1", "p1", "p3"]
    assert all(x != y for x, y in zip(ca, cb))
    assert len({frozenset(t) for t in zip(ca[:2], cb[:2])}) == 2
    pp, ca, cb = best_of_k_pairs(prompts, comps, strategy="all")
    assert pp == ["p1"] * 3 + ["p3"]
    assert best_of_k_pairs(prompts, comps, 2, seed=5) == best_of_k_pairs(prompts, comps, 2, seed=5)


def test_judges(gold: GoldReward) -> None:
    prompts = ["Tom went to the park."] * 3
    a = [HAPPY, SAD, FLUENT_POS]
    b = [SAD, HAPPY, FLUENT_POS]
    out = judge_outcomes(prompts, a, b, gold)
    np.testing.assert_array_equal(out["gold"], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(out["judge"], [1.0, 0.0, 0.5])
    fa, fb = gold.features(prompts, a), gold.features(prompts, b)
    np.testing.assert_array_equal(gold_judge(fa, fb), out["gold"])
    # a pool split 1-1 gives a tie
    pool = [Labeler("pos", 1, 0, 0, 0), Labeler("long", 0, 0, 0, 1.0)]
    fa2 = {"sentiment": np.array([1.0]), "fluency_norm": np.zeros(1), "repetition": np.zeros(1), "length_words": np.array([3.0])}  # fmt: skip
    fb2 = {"sentiment": np.array([0.0]), "fluency_norm": np.zeros(1), "repetition": np.zeros(1), "length_words": np.array([9.0])}  # fmt: skip
    np.testing.assert_array_equal(judge_pool_noiseless(fa2, fb2, pool), [0.5])
