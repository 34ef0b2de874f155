"""Iterative online DPO (``dpo.rounds``) on tiny settings: stories260K, a few steps per round, the
demo's simulated labelers on a made-up gold calibration. Checks that round 2 samples from the
policy round 1 ended with, that the reference is the one configured (previous: the round starts
at the reference, so its first step has zero implicit reward; sft: the first step's implicit
reward is beta x the round-1 policy's log-prob margin over SFT's on the round's pairs), that each
round trains on the labels it is given, that ``rounds=1`` is the offline DPO, and that a finished
round is not redone on resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rlhfstack.stages.dpo as dpo_stage
from rlhfstack.configs import load_config, to_object
from rlhfstack.data.collate import collate_preference, tokenize_preference
from rlhfstack.data.schemas import PreferenceExample
from rlhfstack.feedback import FeedbackModel
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.rewards import FunctionReward, label_pairs_by_reward

ONLINE_PAIRS = 8
BETA = 0.1


@pytest.fixture(scope="module")
def online_inputs(tmp_path_factory, stories_hf):
    """A gold directory (base_model + data/gold.json), 20 offline pairs and 12 prompts."""
    root = tmp_path_factory.mktemp("online")
    shutil.copytree(stories_hf, root / "base_model")
    (root / "data").mkdir()
    (root / "data" / "gold.json").write_text(json.dumps({"f0": -3.0, "f_scale": 1.0}))
    names, things = ("Tom", "Lily", "Ben", "Sue"), ("ball", "dog", "cat", "cake", "bird")
    prefs = [
        {
            "prompt": f"Once upon a time, {n} saw a {t}.",
            "chosen": f" {n} was happy and played with the {t}.",
            "rejected": f" {n} was sad. The {t} ran away and {n} cried all day long.",
        }
        for n in names
        for t in things
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    prompts = [{"prompt": f"One day, {n} found a {t}."} for n in names for t in things[:3]]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


def _cfg(root: Path, run_dir: Path, **over):
    overrides = {
        "model.path": str(root / "base_model"),
        "data.train_path": str(root / "prefs.jsonl"),
        "artifacts_dir": str(root),
        "run_dir": str(run_dir),
        "trainer.batch_size": 8,
        "trainer.micro_batch_size": 8,
        "trainer.lr": 1e-3,
        "trainer.warmup_steps": 0,
        "dpo.beta": BETA,
        "dpo.online_pairs": ONLINE_PAIRS,
        "dpo.online_prompts_path": str(root / "prompts.jsonl"),
        "dpo.online_max_new_tokens": 12,
        "logging.tensorboard": False,
        "logging.plots": False,
        "cluster.num_threads": 1,
        **over,
    }
    return to_object(
        load_config("dpo", ["+experiment=demo", *(f"{k}={v}" for k, v in overrides.items())])
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


@pytest.fixture
def sampler_spy(monkeypatch):
    """Records the weights of every model the online rounds sample from."""
    seen: list[dict[str, torch.Tensor]] = []
    real = dpo_stage.sample_pairs

    def spy(model, *args, **kwargs):
        seen.append(_weights(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(dpo_stage, "sample_pairs", spy)
    return seen


def test_two_rounds_sample_from_round_one_and_start_at_the_previous_policy(
    online_inputs, tmp_path, sampler_spy
):
    run = tmp_path / "k2"
    dpo_stage.train(_cfg(online_inputs, run, **{"dpo.rounds": 2}))
    start = _weights(load_causal_lm(str(online_inputs / "base_model")))
    round1 = _weights(load_causal_lm(str(run / "round-1" / "model")))
    final = _weights(load_causal_lm(str(run / "model")))
    # round 1 trains on the 20 offline pairs and samples nothing; round 2 samples once, from
    # exactly the weights round 1 ended with
    assert len(sampler_spy) == 1
    assert _same(sampler_spy[0], round1) and not _same(round1, start)
    assert not _same(final, round1)

    # labels per round: round 1 the data file's 20 pairs (2 steps of 8), round 2 the labeled
    # fresh pairs written beside it (at most online_pairs: identical texts are not labeled)
    pairs2 = [json.loads(x) for x in (run / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(pairs2) <= ONLINE_PAIRS
    assert {r["labeler"] for r in pairs2} <= {
        "balanced",
        "sentiment_fan",
        "stickler",
        "length_lover",
    }
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["round"] for r in rows] == [1, 1, 2]
    assert rows[0]["online/labels"] == 20 and rows[0]["online/labels_total"] == 20
    assert rows[2]["online/labels"] == len(pairs2)
    assert rows[2]["online/labels_total"] == 20 + len(pairs2)
    assert rows[2]["online/samples_kl_to_start"] != 0.0  # round 1 moved the policy off the start
    done = json.loads((run / "done.json").read_text())
    assert [r["labels"] for r in done["rounds"]] == [20, len(pairs2)]
    assert done["steps"] == 3

    # reference = previous: round 2 starts at its reference, so its first step sees policy ==
    # reference (implicit rewards 0, loss ln 2), while round 1's first step did too (vs the start)
    for first in (rows[0], rows[2]):
        assert first["chosen_reward"] == pytest.approx(0.0, abs=1e-6)
        assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reference_sft_anchors_every_round_to_the_start(online_inputs, tmp_path):
    run = tmp_path / "k2_sft"
    dpo_stage.train(_cfg(online_inputs, run, **{"dpo.rounds": 2, "dpo.online_reference": "sft"}))
    rows = _rows(run)
    pairs2 = [json.loads(x) for x in (run / "round-2" / "pairs.jsonl").read_text().splitlines()]
    # round 2's first step (all its pairs in one batch): chosen reward = beta (log pi_1 - log pi_sft)
    tok = load_tokenizer(str(online_inputs / "base_model"))
    items = tokenize_preference(
        [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in pairs2], tok, 128
    )
    batch = collate_preference(items, tok.pad_token_id)
    with torch.no_grad():
        c1, r1 = dpo_stage.pair_logps(load_causal_lm(str(run / "round-1" / "model")), batch)
        c0, r0 = dpo_stage.pair_logps(load_causal_lm(str(online_inputs / "base_model")), batch)
    first = next(r for r in rows if r["round"] == 2)
    assert first["chosen_reward"] == pytest.approx(float(BETA * (c1 - c0).mean()), abs=1e-5)
    assert first["rejected_reward"] == pytest.approx(float(BETA * (r1 - r0).mean()), abs=1e-5)
    assert abs(first["chosen_reward"]) > 1e-4  # not trivially the previous-policy case


def test_one_round_is_offline_dpo_and_equals_round_one(online_inputs, tmp_path, sampler_spy):
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    dpo_stage.train(_cfg(online_inputs, k1))
    assert sampler_spy == [] and not list(k1.glob("round-*"))
    assert all("round" not in r for r in _rows(k1))  # offline DPO's rows, unchanged
    dpo_stage.train(_cfg(online_inputs, k2, **{"dpo.rounds": 2}))
    assert _same(
        _weights(load_causal_lm(str(k1 / "model"))),
        _weights(load_causal_lm(str(k2 / "round-1" / "model"))),
    )

    def strip(rows: list[dict]) -> list[dict]:  # the training rows, less the rounds' keys
        return [{k: v for k, v in r.items() if "/" not in k and k != "round"} for r in rows]

    assert strip(_rows(k1)) == strip(_rows(k2)[:2])


def test_online_first_round_samples_from_the_start(online_inputs, tmp_path, sampler_spy):
    run = tmp_path / "all_online"
    dpo_stage.train(_cfg(online_inputs, run, **{"dpo.rounds": 2, "dpo.online_first_round": True}))
    start = _weights(load_causal_lm(str(online_inputs / "base_model")))
    assert len(sampler_spy) == 2 and _same(sampler_spy[0], start)
    assert _same(sampler_spy[1], _weights(load_causal_lm(str(run / "round-1" / "model"))))
    assert (run / "round-1" / "pairs.jsonl").is_file()
    done = json.loads((run / "done.json").read_text())
    assert all(0 < r["labels"] <= ONLINE_PAIRS for r in done["rounds"])


def test_a_finished_round_is_not_redone_on_resume(online_inputs, tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    dpo_stage.train(_cfg(online_inputs, whole, **{"dpo.rounds": 2}))

    real = dpo_stage.sample_pairs

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("stopped during round 2")

    monkeypatch.setattr(dpo_stage, "sample_pairs", crash)
    with pytest.raises(KeyboardInterrupt):
        dpo_stage.train(_cfg(online_inputs, resumed, **{"dpo.rounds": 2}))
    assert (resumed / "round-1" / "done.json").is_file() and not (resumed / "done.json").exists()

    loops = []
    real_loop = dpo_stage.train_loop

    def counting_loop(*args, **kwargs):
        loops.append(kwargs["items"])
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(dpo_stage, "sample_pairs", real)
    monkeypatch.setattr(dpo_stage, "train_loop", counting_loop)
    dpo_stage.train(_cfg(online_inputs, resumed, **{"dpo.rounds": 2}))
    assert len(loops) == 1  # round 2 only
    assert _same(
        _weights(load_causal_lm(str(whole / "model"))),
        _weights(load_causal_lm(str(resumed / "model"))),
    )
    assert _rows(whole) == _rows(resumed)

    # a changed recipe does not continue from the finished round
    (resumed / "done.json").unlink()
    with pytest.raises(RuntimeError, match="dpo.beta"):
        dpo_stage.train(_cfg(online_inputs, resumed, **{"dpo.rounds": 2, "dpo.beta": 0.2}))


def test_reward_model_labeler_chooses_the_higher_score(online_inputs, tmp_path, monkeypatch):
    # a "reward model" that counts words: every round-2 pair's chosen text is the longer one
    seen = []

    def fake_load_reward(path, tok, device="cpu"):
        seen.append(path)
        return FunctionReward(lambda p, c: [len(x.split()) for x in c])

    monkeypatch.setattr(dpo_stage, "load_reward", fake_load_reward)
    run = tmp_path / "rm_labels"
    over = {
        "dpo.rounds": 2,
        "dpo.online_labeler": "reward_model",
        "dpo.online_reward_path": str(online_inputs / "base_model"),
    }
    dpo_stage.train(_cfg(online_inputs, run, **over))
    assert seen == [str(online_inputs / "base_model")]
    pairs2 = [json.loads(x) for x in (run / "round-2" / "pairs.jsonl").read_text().splitlines()]
    assert pairs2 and all(
        len(r["chosen"].split()) > len(r["rejected"].split()) and r["score_margin"] > 0
        for r in pairs2
    )
    first = next(r for r in _rows(run) if r["round"] == 2)
    assert first["online/labels"] == len(pairs2) and first["online/score_margin"] > 0


class _LongerIsBetter(FeedbackModel):
    """A feedback model that prefers the longer text, answering in both orders (debiased)."""

    name = "longer"

    def prefer_first(self, prompts, first, second, principle):
        return np.array(
            [
                0.5 if len(f) == len(s) else 0.9 if len(f) > len(s) else 0.1
                for f, s in zip(first, second)
            ]
        )


def test_ai_feedback_labeler_labels_rounds_with_the_constitution(
    online_inputs, tmp_path, monkeypatch
):
    built = []

    def fake_build(fcfg, device="cpu"):
        built.append(fcfg.constitution)
        return _LongerIsBetter()

    monkeypatch.setattr(dpo_stage, "build_feedback_model", fake_build)
    run = tmp_path / "ai_labels"
    dpo_stage.train(
        _cfg(online_inputs, run, **{"dpo.rounds": 2, "dpo.online_labeler": "ai_feedback"})
    )
    assert built == ["stories"]
    pairs2 = [json.loads(x) for x in (run / "round-2" / "pairs.jsonl").read_text().splitlines()]
    # both orders agree: the longer text is chosen with p 0.9; equal lengths are a coin (0.5)
    assert pairs2 and all(r["principle"] == "ensemble" for r in pairs2)
    for r in pairs2:
        longer = len(r["chosen"]) > len(r["rejected"])
        assert r["p_chosen"] == pytest.approx(0.9 if longer else 0.5)
        assert len(r["chosen"]) >= len(r["rejected"])
    first = next(r for r in _rows(run) if r["round"] == 2)
    assert first["online/labels"] == len(pairs2)
    assert first["online/order_disagreement"] == 0.0


def test_rounds_need_their_inputs_before_anything_loads(online_inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="online_prompts_path"):
        dpo_stage.train(
            _cfg(
                online_inputs,
                tmp_path / "x",
                **{"dpo.rounds": 2, "dpo.online_prompts_path": "null"},
            )
        )
    with pytest.raises(FileNotFoundError, match="online_reward_path"):
        dpo_stage.train(
            _cfg(
                online_inputs,
                tmp_path / "y",
                **{"dpo.rounds": 2, "dpo.online_labeler": "reward_model"},
            )
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_label_pairs_by_reward_chooses_the_higher_score_and_drops_ties():
    words = FunctionReward(lambda p, c: [len(x.split()) for x in c])
    rows = label_pairs_by_reward(
        words, ["p0", "p1", "p2", "p3"], ["a b c", "a", "same", "x y"], ["a", "a b", "same", "y x"]
    )
    # pair 2 is two identical texts, pair 3 a tie (2 words each): neither carries a preference
    assert [(r["index"], r["chosen"], r["rejected"]) for r in rows] == [
        (0, "a b c", "a"),
        (1, "a b", "a"),
    ]
    assert [r["a_is_chosen"] for r in rows] == [True, False]
    assert [r["score_margin"] for r in rows] == [2.0, 1.0]


# ---------------------------------------------------------------------------- the demo experiment


def _experiment(artifacts: Path, demo: Path, extra: dict[str, list[str]] | None = None):
    """``+experiment=demo_online_dpo`` with its ``runs/demo`` inputs replaced by ``demo``."""
    from rlhfstack.configs import PipelineConfig

    cfg = to_object(
        load_config(
            "pipeline", ["+experiment=demo_online_dpo", f"artifacts_dir={artifacts}", "jobs=1"]
        )
    )
    assert isinstance(cfg, PipelineConfig)
    old_abs, old_rel = str(Path("runs/demo").absolute()), "=runs/demo"

    def move(o: str) -> str:
        return o.replace(old_abs, str(demo)).replace(old_rel, f"={demo}")

    cfg.common_overrides = [move(o) for o in cfg.common_overrides]
    cfg.stage_overrides = {
        k: [move(o) for o in v] + (extra or {}).get(k, []) for k, v in cfg.stage_overrides.items()
    }
    return cfg


def test_experiment_compares_at_equal_labels_and_steps():
    from rlhfstack.configs import DemoDataConfig, recipe_of
    from rlhfstack.pipeline import stage_overrides

    cfg = _experiment(Path("runs/x"), Path("/demo"))
    assert cfg.stages == ["dpo", "online_dpo", "online_dpo_eval"]
    offline, online = (
        to_object(load_config(s, stage_overrides(cfg, s))) for s in ("dpo", "online_dpo")
    )
    assert offline.dpo.rounds == 1 and online.dpo.rounds == 3 and online.dpo.online_first_round
    assert online.run_dir.endswith("online_dpo") and offline.run_dir.endswith("/dpo")
    assert online.dpo.online_labeler == "simulated" and online.dpo.online_gold_dir == "/demo"
    # equal labels: the demo's training pairs (its data stage keeps 90% of n_pref_prompts x
    # pairs_per_prompt pairs for training) = rounds x online_pairs
    d = DemoDataConfig()
    assert (
        online.dpo.rounds * online.dpo.online_pairs == 0.9 * d.n_pref_prompts * d.pairs_per_prompt
    )
    # the online arm is the offline recipe (the demo's DPO) plus the online settings only
    a, b = recipe_of(offline), recipe_of(online)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ and all(k.startswith(("dpo.rounds", "dpo.online_")) for k in differ), differ
    demo_dpo = recipe_of(to_object(load_config("dpo", ["+experiment=demo"])))
    same_keys = {k for k in a if not k.startswith(("model.path", "data."))}
    assert {k: a[k] for k in same_keys} == {k: demo_dpo[k] for k in same_keys}


def test_experiment_end_to_end_on_the_smoke_demo(smoke, tmp_path):
    from rlhfstack.evaluation.report import render_online_dpo_section
    from rlhfstack.pipeline import run_pipeline

    art = tmp_path / "odpo"
    tiny = {
        "dpo": ["trainer.max_steps=2", "trainer.batch_size=8", "trainer.micro_batch_size=8"],
        "online_dpo": [
            "trainer.batch_size=8",
            "trainer.micro_batch_size=8",
            "dpo.online_pairs=16",
            "dpo.online_max_new_tokens=8",
        ],
        "online_dpo_eval": ["max_new_tokens=8", "n_bootstrap=100"],
    }
    run_pipeline(_experiment(art, smoke, tiny), command="pytest")
    res = json.loads((art / "results.json").read_text())
    for key in ("online_dpo_vs_sft", "offline_dpo_vs_sft", "online_dpo_vs_offline_dpo"):
        w = res["winrate"][key]
        assert 0 <= w["rate"] <= 1 and w["ci95"][0] <= w["rate"] <= w["ci95"][1]
        assert w["n"] == res["n_prompts"]
    online = res["policies"]["online_dpo"]
    assert [r["round"] for r in online["rounds"]] == [1, 2, 3]
    assert online["labels"] == sum(r["labels"] for r in online["rounds"]) <= 3 * 16
    assert res["policies"]["offline_dpo"]["labels"] > 0
    for arm in ("offline_dpo", "online_dpo"):
        assert res["cost"][arm]["cpu_seconds"] > 0
        assert "mean" in res["policies"][arm]["kl_to_sft"]
    # pi_sft is sampled as the smoke demo's evaluation sampled it (same prompts, seed, settings)
    demo_sft = [json.loads(x)["completion"] for x in (smoke / "samples" / "sft.jsonl").open()]
    ours = [json.loads(x)["completion"] for x in (art / "samples" / "sft.jsonl").open()]
    assert ours == demo_sft
    section = render_online_dpo_section(res)
    assert "| online_dpo |" in section and "| offline_dpo |" in section
    assert (art / "EVAL_REPORT.md").read_text() == section
