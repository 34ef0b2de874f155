"""The project's KV-cache sampler: agrees with HF generate, padding-invariant, EOS handling."""

from __future__ import annotations

import pytest
import torch

from rlhfstack.models.core import load_causal_lm, load_tokenizer, response_logprobs
from rlhfstack.rollout.generate import decode_responses, generate, left_pad_prompts


@pytest.fixture(scope="module")
def model_tok(stories_hf):
    return load_causal_lm(str(stories_hf), trainable=False), load_tokenizer(str(stories_hf))


def test_greedy_matches_hf_generate(model_tok):
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, ["Once upon a time"], 64)
    ours = generate(
        model,
        ids,
        mask,
        max_new_tokens=40,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        greedy=True,
        stop_ids=(tok.eos_token_id, tok.bos_token_id),
    )
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    n = ours.response_ids_BR.shape[1]
    assert ours.response_ids_BR[0].tolist() == hf[0, ids.shape[1] : ids.shape[1] + n].tolist()
    assert decode_responses(tok, ours)[0].startswith(", there was a little girl named Lily")


def test_left_padding_does_not_change_greedy_continuation(model_tok):
    model, tok = model_tok
    short = "Lily saw a dog."
    long = "Once upon a time, there was a little boy named Tom. He liked to play with his red ball."
    ids1, m1 = left_pad_prompts(tok, [short], 64)
    ids2, m2 = left_pad_prompts(tok, [short, long], 64)
    kw = dict(max_new_tokens=20, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, greedy=True)
    alone = generate(model, ids1, m1, **kw)
    batched = generate(model, ids2, m2, **kw)
    n = alone.response_ids_BR.shape[1]
    assert batched.response_ids_BR[0, :n].tolist() == alone.response_ids_BR[0].tolist()


def test_rollout_logprobs_equal_training_pass_logprobs(model_tok):
    """Sampling is from softmax(logits/T): the log-probs the rollout returns (what PPO uses as
    old log-probs) equal those of a separate training-style pass over the same tokens."""
    model, tok = model_tok
    ids, mask = left_pad_prompts(
        tok, ["Tom had a cat.", "Once upon a time, there was a big tree"], 64
    )
    g = torch.Generator().manual_seed(0)
    gen = generate(
        model,
        ids,
        mask,
        max_new_tokens=12,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=0.7,
        generator=g,
        return_logprobs=True,
    )
    full, fmask = gen.full()
    rollout = gen.logprobs_BR
    train = response_logprobs(model, full, fmask, ids.shape[1], temperature=0.7)["logprobs"]
    m = gen.response_mask_BR.bool()
    assert rollout is not None and rollout.shape == train.shape
    assert m.sum() > 0 and torch.isfinite(rollout[m]).all()
    assert (rollout[m] < 0).all()  # real log-probs, not the zeros of a missing value
    torch.testing.assert_close(rollout[m], train[m], atol=1e-4, rtol=0)
    assert (rollout[~m] == 0).all()  # no log-prob after the first EOS


def test_response_mask_stops_after_first_stop_token():
    """A tiny fake model that always emits EOS at step 3: mask covers tokens 0..2, pads after."""

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.training = False

        def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
            B, T = input_ids.shape
            logits = torch.full((B, T, 8), -10.0)
            tok = 2 if self.step >= 2 else 5
            logits[:, -1, tok] = 10.0
            self.step += 1

            class Out:
                pass

            o = Out()
            o.logits, o.past_key_values = logits, past_key_values
            return o

    ids = torch.tensor([[7, 3]])
    gen = generate(
        Fake(), ids, torch.ones_like(ids), max_new_tokens=6, eos_id=2, pad_id=0, greedy=True
    )
    assert gen.response_ids_BR.tolist() == [[5, 5, 2]]
    assert gen.response_mask_BR.tolist() == [[1, 1, 1]]
    assert gen.ended_B.tolist() == [True]


def test_pad_token_is_never_sampled(model_tok):
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, ["Sue"] * 16, 64)
    gen = generate(
        model,
        ids,
        mask,
        max_new_tokens=16,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=2.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert not (gen.response_ids_BR[gen.response_mask_BR.bool()] == tok.pad_token_id).any()
