"""The reward interface (rlhfstack.rewards): functions of text, ensembles, reward models on the
policy's token ids or through text re-tokenized with their own tokenizer, and PPO against an
encoder reward model (another tokenizer) through the text path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_rm_encoder import make_tiny_bert

from rlhfstack.configs import load_config, to_object
from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer
from rlhfstack.models.encoders import load_encoder, score_texts
from rlhfstack.rewards import (
    EnsembleReward,
    FunctionReward,
    RewardModelReward,
    WeightedSum,
    length_penalty,
    load_reward,
    same_tokenizer,
)
from rlhfstack.runtime import read_jsonl

PROMPTS = ["Once upon a time, Tom saw a dog.", "Lily had a red ball."]
COMPLETIONS = [" Tom was happy.", " She played with the ball all day long."]


def test_function_reward_and_length_penalty_and_weighted_sum():
    f = FunctionReward(lambda p, c: [float(len(x)) for x in c], name="chars")
    out = f.score(PROMPTS, COMPLETIONS)
    # " Tom was happy." has 15 characters, " She played with the ball all day long." 39
    assert out.scores_B.tolist() == [15.0, 39.0] and out.spread_B is None
    assert out.components["chars"].tolist() == [15.0, 39.0]
    assert not f.uses_policy_ids and not f.has_spread
    # 3 and 8 words -> -0.5 * [3, 8] = [-1.5, -4]
    assert length_penalty(0.5).score(PROMPTS, COMPLETIONS).scores_B.tolist() == [-1.5, -4.0]
    total = WeightedSum({"chars": (f, 2.0), "len": (length_penalty(1.0), 1.0)})
    out = total.score(PROMPTS, COMPLETIONS)
    # 2 * [15, 39] + [-3, -8] = [27, 70]
    assert out.scores_B.tolist() == [27.0, 70.0] and out.spread_B is None
    assert set(out.components) == {"chars", "len"}
    with pytest.raises(ValueError, match="1 scores for 2"):
        FunctionReward(lambda p, c: [0.0]).score(PROMPTS, COMPLETIONS)


def test_ensemble_mean_and_std():
    a = FunctionReward(lambda p, c: [1.0, 3.0], name="a")
    b = FunctionReward(lambda p, c: [3.0, 7.0], name="b")
    out = EnsembleReward([a, b]).score(PROMPTS, COMPLETIONS)
    # mean [2, 5]; unbiased std of (1, 3) = sqrt((1 + 1) / 1) = sqrt(2), of (3, 7) = sqrt(8)
    assert torch.allclose(out.scores_B, torch.tensor([2.0, 5.0]))
    assert torch.allclose(out.spread_B, torch.tensor([math.sqrt(2.0), math.sqrt(8.0)]))
    assert out.components["0:a"].tolist() == [1.0, 3.0]
    assert out.components["1:b"].tolist() == [3.0, 7.0]
    one = EnsembleReward([a]).score(PROMPTS, COMPLETIONS)
    assert one.spread_B is None and not EnsembleReward([a]).has_spread


@pytest.fixture(scope="module")
def encoder_rm_dir(tmp_path_factory) -> Path:
    """A tiny encoder reward model (2-layer BERT, word-level vocabulary) saved with its tokenizer,
    as the RM stage writes one."""
    root = tmp_path_factory.mktemp("enc_rm")
    bert = make_tiny_bert(root / "bert")
    tok = load_tokenizer(str(bert))
    torch.manual_seed(0)
    rm = RewardModel(load_encoder(bert), kind="encoder", sep_token_id=tok.sep_token_id)
    rm.max_length = 64
    with torch.no_grad():  # a visible spread of scores
        rm.head.linear.weight.mul_(20.0)
    rm.save(root / "rm")
    tok.save_pretrained(root / "rm")
    return root / "rm"


def test_encoder_rm_takes_the_text_path_and_refuses_the_id_path(encoder_rm_dir, stories_hf):
    policy_tok = load_tokenizer(str(stories_hf))
    reward = load_reward(encoder_rm_dir, policy_tok)
    assert not reward.uses_policy_ids  # another tokenizer: decode, re-tokenize, score
    assert not same_tokenizer(policy_tok, reward.tokenizer)
    # the text path scores what encoders.score_texts scores (the RM's own tokenizer and layout)
    want = score_texts(reward.rm, reward.tokenizer, PROMPTS, COMPLETIONS)["mean"]
    ids = torch.zeros(2, 4, dtype=torch.long)  # policy ids are ignored on the text path
    got = reward.score(PROMPTS, COMPLETIONS, ids, torch.ones_like(ids)).scores_B
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-6)
    with pytest.raises(ValueError) as e:
        load_reward(encoder_rm_dir, policy_tok, input_path="ids")
    msg = str(e.value)
    assert str(stories_hf) in msg and str(encoder_rm_dir) in msg, msg  # both tokenizers named


def test_causal_rm_on_policy_ids_and_a_mismatched_tokenizer(stories_hf, tmp_path):
    tok = load_tokenizer(str(stories_hf))
    torch.manual_seed(0)
    rm = RewardModel(load_causal_lm(str(stories_hf), trainable=False), kind="causal_lm").eval()
    same = RewardModelReward(rm, tok, load_tokenizer(str(stories_hf)))
    assert same.uses_policy_ids  # same vocabulary and BOS / EOS under two loads
    enc = tok(["Tom saw a dog. He was happy."], add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([[tok.bos_token_id, *enc, tok.eos_token_id]])
    mask = torch.ones_like(ids)
    assert same.score(["x"], ["y"], ids, mask).scores_B.tolist() == pytest.approx(
        rm.score(ids, mask)["mean"].tolist(), abs=0
    )
    # a policy tokenizer with one more token: not the RM's vocabulary
    other = load_tokenizer(str(stories_hf))
    other.add_tokens(["<extra_tok>"])
    other.name_or_path = "other-policy-tokenizer"
    assert not same_tokenizer(tok, other)
    assert not RewardModelReward(rm, tok, other).uses_policy_ids  # auto: the text path
    with pytest.raises(ValueError, match="other-policy-tokenizer.*" + str(stories_hf)):
        RewardModelReward(rm, tok, other, input_path="ids")
    with pytest.raises(ValueError, match="reward_input"):
        RewardModelReward(rm, tok, other, input_path="bytes")


SMALL = [
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "ppo.num_minibatches=2",
    "ppo.epochs=1",
    "rollout.max_new_tokens=8",
    "gold_eval_every=0",
    "logging.tensorboard=false",
    "logging.plots=false",
    "ppo.value_model=shared",
]


def _ppo_cfg(smoke: Path, run_dir: Path, rm_dir: Path, extra: list[str]):
    overrides = [f"artifacts_dir={smoke}", f"run_dir={run_dir}", f"reward_model_path={rm_dir}"]
    return to_object(load_config("ppo", [*overrides, *SMALL, *extra]))


def test_ppo_against_an_encoder_rm_through_the_text_path(smoke, encoder_rm_dir, tmp_path):
    from rlhfstack.stages.ppo import train

    cfg = _ppo_cfg(smoke, tmp_path / "enc", encoder_rm_dir, ["trainer.max_steps=2"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert math.isfinite(r["reward/rm_score"]) and r["reward/rm_score_std"] == 0.0
    # forced onto the policy's ids: refused before training, both tokenizers named
    with pytest.raises(ValueError, match="reward_input=ids.*policy tokenizer"):
        train(_ppo_cfg(smoke, tmp_path / "ids", encoder_rm_dir, ["reward_input=ids"]))
    # a separate critic would run the encoder's trunk on the policy's ids
    with pytest.raises(ValueError, match="ppo.value_model=separate"):
        train(_ppo_cfg(smoke, tmp_path / "sep", encoder_rm_dir, ["ppo.value_model=separate"]))
