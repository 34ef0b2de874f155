"""The eval stage scores exactly the sampled tokens: no EOS that was never sampled, KL and
length on the sampled ids, the proxy reward read where PPO's rollout scoring reads it."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer
from rlhfstack.models.encoders import score_texts
from rlhfstack.rewards import RewardModelReward, score_samples
from rlhfstack.rollout.generate import SampledTokens, sample_tokens, sampled_logprob_sums


@pytest.fixture(scope="module")
def model_tok(stories_hf):
    return load_causal_lm(str(stories_hf), trainable=False), load_tokenizer(str(stories_hf))


PROMPTS = ["Once upon a time", "Tom had a cat.", "Lily saw a big dog in the park"]


def _by_hand_logprob_sum(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t) from one unpadded forward pass over prompt + response."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    P = len(prompt_ids)
    return sum(float(logp[P + j - 1, t]) for j, t in enumerate(response_ids))


def test_a_sample_that_did_not_end_gets_no_eos(model_tok):
    model, tok = model_tok
    s = sample_tokens(model, tok, PROMPTS, max_new_tokens=4, seed=0)
    assert len(s) == 3 and s.ended == [False, False, False]  # 4 tokens: too short to end
    for p_ids, r_ids in zip(s.prompt_ids, s.response_ids):
        assert len(r_ids) == 4 and tok.eos_token_id not in r_ids
        assert p_ids[0] == tok.bos_token_id and tok.pad_token_id not in p_ids
    assert s.n_tokens == sum(len(p) + 4 for p in s.prompt_ids)
    # stop at EOS or a full stop (frequent, so some rows end within 12 tokens and some do not):
    # the rows that end, end with the stop token they sampled, and only there
    stops = (tok.eos_token_id, tok.encode(" He went.", add_special_tokens=False)[-1])
    s = sample_tokens(model, tok, PROMPTS * 4, max_new_tokens=12, seed=1, stop_ids=stops)
    assert any(s.ended) and not all(s.ended)
    for r_ids, ended in zip(s.response_ids, s.ended):
        assert (r_ids[-1] in stops) == ended
        assert not set(stops) & set(r_ids[:-1]) and tok.pad_token_id not in r_ids


def test_kl_and_length_on_the_sampled_ids_equal_a_hand_computation(model_tok):
    model, tok = model_tok
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    eos = tok.eos_token_id
    # row 0 did not end (3 tokens, no EOS), row 1 ended (its EOS was sampled); different prompt
    # lengths, so the batch is padded on both sides
    s = SampledTokens(
        prompt_ids=[[1, 400, 300, 59], [1, 67]],
        response_ids=[[261, 280, 303], [400, 300, eos]],
        ended=[False, True],
        texts=["", ""],
    )
    ids, mask, P = s.batch(0, 2, tok.pad_token_id)
    assert P == 4 and ids.shape == (2, 7)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    lp_pi, n = sampled_logprob_sums(model, s, tok.pad_token_id)
    lp_ref, _ = sampled_logprob_sums(other, s, tok.pad_token_id)
    assert n.tolist() == [3, 3]  # the sampled tokens: no EOS added to row 0
    for i in range(2):
        hand_pi = _by_hand_logprob_sum(model, s.prompt_ids[i], s.response_ids[i])
        hand_ref = _by_hand_logprob_sum(other, s.prompt_ids[i], s.response_ids[i])
        assert float(lp_pi[i]) == pytest.approx(hand_pi, abs=1e-4)
        assert float(lp_pi[i] - lp_ref[i]) == pytest.approx(hand_pi - hand_ref, abs=1e-4)
    # the same rows one at a time: padding changes nothing
    for i in range(2):
        one = SampledTokens(s.prompt_ids[i : i + 1], s.response_ids[i : i + 1], [s.ended[i]], [""])
        assert float(sampled_logprob_sums(model, one, tok.pad_token_id)[0][0]) == pytest.approx(
            float(lp_pi[i]), abs=1e-4
        )


def test_proxy_reward_is_read_at_the_last_sampled_token(model_tok):
    model, tok = model_tok
    torch.manual_seed(0)
    rm = RewardModel(copy.deepcopy(model)).eval()
    s = sample_tokens(model, tok, PROMPTS, max_new_tokens=5, seed=0)
    assert not any(s.ended)
    reward = RewardModelReward(rm, tok, tok)  # the policy's tokenizer: the token-id path
    assert reward.uses_policy_ids
    got = score_samples(reward, PROMPTS, s, tok.pad_token_id)
    for i in range(len(s)):  # by hand: the RM on the unpadded sampled ids
        ids = torch.tensor([s.prompt_ids[i] + s.response_ids[i]])
        want = rm.score(ids, torch.ones_like(ids))["mean"]
        assert float(got[i]) == pytest.approx(float(want), abs=1e-4)
        with_eos = torch.tensor([s.prompt_ids[i] + s.response_ids[i] + [tok.eos_token_id]])
        assert float(got[i]) != pytest.approx(
            float(rm.score(with_eos, torch.ones_like(with_eos))["mean"]), abs=1e-4
        )
    # the text path appends an EOS that was never sampled: a different number
    by_text = torch.as_tensor(score_texts(rm, tok, PROMPTS, s.texts)["mean"], dtype=torch.float32)
    assert not torch.allclose(by_text, got, atol=1e-4)
