"""The fast decoding loop is pinned to the plain loop and to HF ``generate`` on fixed inputs."""

from __future__ import annotations

import pytest
import torch

from rlhfstack.models.core import (
    ValueHead,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    response_logprobs,
)
from rlhfstack.rollout.fast import (
    PreallocatedCache,
    fast_decode,
    sample_categorical,
    supports_fast_decode,
)
from rlhfstack.rollout.generate import generate, left_pad_prompts

PROMPTS = [
    "Once upon a time",
    "Lily saw a dog. The dog was big and",
    "Tom had a red ball. He liked to play with it every day in the park with his",
    "Sue",
]


#: a tiny grouped-KV decoder (random weights) for the lean / compiled decode-step tests
_TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _sample_tiny(model, ids, mask, *, max_new_tokens: int, stop: int = -1, **kw):
    """``fast_decode`` at temperature 1 with a fixed generator (seed 2), PAD 0 suppressed,
    log-probs returned; ``kw`` selects the path (lean / packed / compiled, hidden states)."""
    return fast_decode(
        model,
        ids,
        mask,
        position_ids_from_mask(mask),
        max_new_tokens=max_new_tokens,
        pad_id=0,
        temperature=1.0,
        greedy=False,
        generator=torch.Generator().manual_seed(2),
        suppress=[0],
        stops_S=torch.tensor([stop]),
        return_logprobs=True,
        **kw,
    )


@pytest.fixture(scope="module")
def model_tok(stories_hf):
    return load_causal_lm(str(stories_hf), trainable=False), load_tokenizer(str(stories_hf))


def _kw(tok, **extra):
    return dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, **extra)


def test_stories_model_takes_the_fast_path(model_tok):
    model, _ = model_tok
    assert supports_fast_decode(model)
    assert not supports_fast_decode(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_samples_the_same_tokens_as_plain(model_tok, temperature):
    """Same generator seed -> the same tokens, masks and ended flags (left-padded batch, EOS stops)."""
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS * 2, 64)
    outs = []
    for fast in (False, True):
        g = torch.Generator().manual_seed(123)
        outs.append(
            generate(
                model,
                ids,
                mask,
                max_new_tokens=48,
                stop_ids=(tok.eos_token_id, tok.convert_tokens_to_ids(".")),
                temperature=temperature,
                generator=g,
                fast=fast,
                **_kw(tok),
            )
        )
    plain, fast = outs
    assert torch.equal(plain.response_ids_BR, fast.response_ids_BR)
    assert torch.equal(plain.response_mask_BR, fast.response_mask_BR)
    assert torch.equal(plain.ended_B, fast.ended_B)
    assert plain.ended_B.any()  # the EOS path is exercised


def test_fast_stops_early_like_plain(model_tok):
    """With "." as a stop token every row ends early; both loops stop at the same length."""
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS, 64)
    period = tok.convert_tokens_to_ids(".")
    kw = _kw(tok, max_new_tokens=200, greedy=True, stop_ids=(tok.eos_token_id, period))
    plain = generate(model, ids, mask, fast=False, **kw)
    fast = generate(model, ids, mask, fast=True, **kw)
    assert fast.ended_B.all()
    assert fast.response_ids_BR.shape[1] < 200
    assert torch.equal(plain.response_ids_BR, fast.response_ids_BR)
    assert torch.equal(plain.response_mask_BR, fast.response_mask_BR)


def test_fast_greedy_matches_hf_generate(model_tok):
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS, 64)
    ours = generate(model, ids, mask, max_new_tokens=30, greedy=True, stop_ids=(), **_kw(tok))
    hf = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=30,
        min_new_tokens=30,
        pad_token_id=tok.pad_token_id,
    )
    assert ours.response_ids_BR.tolist() == hf[:, ids.shape[1] :].tolist()


def test_rollout_logprobs_and_hidden_match_the_training_pass(model_tok):
    """``return_logprobs`` / ``return_hidden`` equal what the scoring pass would compute."""
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS, 64)
    g = torch.Generator().manual_seed(7)
    gen = generate(
        model,
        ids,
        mask,
        max_new_tokens=24,
        temperature=0.8,
        generator=g,
        return_logprobs=True,
        return_hidden=True,
        **_kw(tok),
    )
    full, fmask = gen.full()
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    ref = response_logprobs(model, full, fmask, ids.shape[1], temperature=0.8, value_head=head)
    m = gen.response_mask_BR.bool()
    assert gen.logprobs_BR.shape == gen.response_ids_BR.shape
    # the PAD id is suppressed while sampling, yet the log-probs are those of the whole
    # vocabulary (the training pass's function): equal up to float rounding
    assert torch.allclose(gen.logprobs_BR[m], ref["logprobs"][m], atol=2e-5)
    assert (gen.logprobs_BR[~m] == 0).all()
    values = head(gen.hidden_BRD).squeeze(-1)
    assert torch.allclose(values[m], ref["values"][m], atol=2e-5)


def test_ppo_losses_from_rollout_logprobs_equal_the_scoring_pass(model_tok):
    """The fast path (old log-probs and values from the rollout, as ``stages/ppo.py`` does by
    default) gives PPO the same losses as the plain path (a separate scoring forward)."""
    from rlhfstack.losses import gae, masked_whiten, ppo_policy_loss, ppo_value_loss

    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS * 2, 64)
    gen = generate(
        model,
        ids,
        mask,
        max_new_tokens=20,
        generator=torch.Generator().manual_seed(3),
        return_logprobs=True,
        return_hidden=True,
        **_kw(tok),
    )
    full, fmask = gen.full()
    P = ids.shape[1]
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    with torch.no_grad():
        plain = response_logprobs(model, full, fmask, P, value_head=head)
        fast = {"logprobs": gen.logprobs_BR, "values": head(gen.hidden_BRD).squeeze(-1)}
    new = response_logprobs(model, full, fmask, P, value_head=head)  # the training pass
    m = gen.response_mask_BR.float()
    scores = torch.linspace(-1.0, 1.0, m.shape[0])
    rewards = torch.zeros_like(m)
    rewards[torch.arange(m.shape[0]), m.sum(-1).long() - 1] = scores
    losses = []
    for old in (plain, fast):
        adv, ret = gae(rewards, old["values"], m, 1.0, 0.95)
        adv = masked_whiten(adv, m)
        pg, st = ppo_policy_loss(new["logprobs"], old["logprobs"], adv, m, 0.2)
        vf, _ = ppo_value_loss(new["values"], old["values"], ret, m, 0.2)
        losses.append(
            (
                float(pg.detach()),
                float(vf.detach()),
                float(st["ratio_mean"]),
                float(st["approx_kl"]),
            )
        )
    (pg_p, vf_p, r_p, kl_p), (pg_f, vf_f, r_f, kl_f) = losses
    assert pg_f == pytest.approx(pg_p, abs=1e-5)
    assert vf_f == pytest.approx(vf_p, abs=1e-5)
    assert r_p == pytest.approx(1.0, abs=1e-6) and r_f == pytest.approx(1.0, abs=1e-5)
    assert abs(kl_f) < 1e-6 and abs(kl_p) < 1e-9


def test_return_logprobs_needs_an_hf_model():
    class Fake(torch.nn.Module):
        def forward(self, **kw):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(ValueError, match="fast path"):
        generate(
            Fake(),
            torch.tensor([[3]]),
            torch.tensor([[1]]),
            max_new_tokens=2,
            eos_id=2,
            pad_id=0,
            return_logprobs=True,
        )


def test_sample_categorical_matches_the_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    draws = sample_categorical(p.expand(200_000, -1), g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0  # zero-probability entries are never drawn
    assert torch.allclose(freq, p, atol=5e-3)
    # unnormalized rows are fine; a row's draw depends only on its own probabilities
    a = sample_categorical(torch.tensor([[2.0, 0.0, 2.0]]), torch.Generator().manual_seed(1))
    assert a.item() in (0, 2)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (make gpu-check runs PPO there)"
)
def test_a_cpu_generator_drives_a_cuda_rollout_with_the_cpu_draws():
    # PPO's sampling generator lives on CPU (it is checkpointed); torch.rand refuses it for a
    # CUDA tensor, so the uniforms are drawn on CPU and moved
    probs = torch.rand(16, 300, generator=torch.Generator().manual_seed(3))
    cpu = sample_categorical(probs, torch.Generator().manual_seed(0))
    cuda = sample_categorical(probs.cuda(), torch.Generator().manual_seed(0))
    assert cuda.device.type == "cuda" and torch.equal(cpu, cuda.cpu())


def test_preallocated_cache_refuses_to_overflow():
    cache = PreallocatedCache(1, 3)
    k = torch.zeros(1, 2, 2, 4)
    cache.update(k, k, 0)
    assert cache.get_seq_length() == 2
    with pytest.raises(RuntimeError, match="capacity"):
        cache.update(k, k, 0)


def test_prompt_groups_sample_the_same_tokens(model_tok):
    """GRPO layout (G samples per prompt): the prompt pass once per group, same tokens."""
    model, tok = model_tok
    ids, mask = left_pad_prompts(tok, PROMPTS[:2], 64)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    outs = [
        generate(
            model,
            ids,
            mask,
            max_new_tokens=20,
            generator=torch.Generator().manual_seed(5),
            prompt_group_size=g,
            **_kw(tok),
        )
        for g in (1, 3)
    ]
    assert torch.equal(outs[0].response_ids_BR, outs[1].response_ids_BR)
    with pytest.raises(ValueError, match="identical prompts"):
        generate(model, ids[2:6], mask[2:6], max_new_tokens=2, prompt_group_size=2, **_kw(tok))


def _pref_batch(pad_id: int) -> dict[str, torch.Tensor]:
    from rlhfstack.data.collate import collate_preference

    g = torch.Generator().manual_seed(0)
    items = []
    for P, C, R in [(5, 3, 7), (9, 4, 2), (3, 6, 6)]:  # different prompt and response lengths
        p = [1] + torch.randint(3, 500, (P - 1,), generator=g).tolist()
        c = torch.randint(3, 500, (C,), generator=g).tolist() + [2]
        r = torch.randint(3, 500, (R,), generator=g).tolist() + [2]
        items.append(
            {
                "chosen_input_ids": p + c,
                "chosen_loss_mask": [0] * P + [1] * (C + 1),
                "rejected_input_ids": p + r,
                "rejected_loss_mask": [0] * P + [1] * (R + 1),
            }
        )
    return collate_preference(items, pad_id)


def test_training_pass_shortcuts_match_the_plain_passes(stories_hf):
    """Response-only LM head and shared-prompt passes: same log-probs, scores and gradients."""
    from rlhfstack.models import pairs as F
    from rlhfstack.models.core import RewardModel, sequence_logprob_sums

    torch.manual_seed(0)
    model, tok = load_causal_lm(str(stories_hf)), load_tokenizer(str(stories_hf))
    pad = tok.pad_token_id
    b = _pref_batch(pad)
    ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
    att = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    lm = torch.cat([b["chosen_loss_mask"], b["rejected_loss_mask"]])

    def run(fn):
        model.zero_grad()
        c, r = fn()
        (c.sum() - 2 * r.sum()).backward()
        return c.detach(), r.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    def split(lp):
        return lp[:3], lp[3:]

    c0, r0, g0 = run(lambda: split(sequence_logprob_sums(model, ids, att, lm)))
    for fn in (
        lambda: split(F.masked_logprob_sums(model, ids, att, lm)),
        lambda: F.shared_prompt_pair_logprob_sums(model, b, pad),
    ):
        c1, r1, g1 = run(fn)
        assert torch.allclose(c0, c1, atol=1e-4) and torch.allclose(r0, r1, atol=1e-4)
        assert (g0 - g1).norm() <= 1e-4 * g0.norm()
    rm = RewardModel(model, k=2)
    s = rm.raw_scores(ids, att)
    c2, r2 = F.shared_prompt_pair_scores(rm, b, pad)
    assert torch.allclose(s[:3], c2, atol=1e-5) and torch.allclose(s[3:], r2, atol=1e-5)
    # GRPO layout: 2 left-padded prompts x 3 right-padded responses
    p_ids = torch.tensor([[pad, pad, 1, 5, 6], [1, 7, 8, 9, 10]])
    p_mask = (p_ids != pad).long()
    resp = torch.randint(3, 500, (6, 4), generator=torch.Generator().manual_seed(1))
    r_mask = torch.ones(6, 4, dtype=torch.long)
    r_mask[1, 3] = 0
    resp[1, 3] = pad
    full = torch.cat([p_ids.repeat_interleave(3, 0), resp], 1)
    f_mask = torch.cat([p_mask.repeat_interleave(3, 0), r_mask], 1)
    vh = ValueHead(model.config.hidden_size)
    a = response_logprobs(model, full, f_mask, 5, 0.7, value_head=vh)
    o = F.shared_prefix_response_logprobs(model, p_ids, p_mask, resp, r_mask, 0.7, value_head=vh)
    m = r_mask.bool()
    assert torch.allclose(a["logprobs"][m], o["logprobs"][m], atol=1e-4)
    assert torch.allclose(a["values"][m], o["values"][m], atol=1e-5)


def test_dpo_stage_loss_on_the_shared_prompt_path_equals_the_plain_path(stories_hf):
    """``stages/dpo.pair_logps`` with ``dpo.shared_prompt`` (the default) gives the same DPO loss
    as the plain ``[2B, T]`` pass; a batch whose prompts differ falls back to the plain pass."""
    from rlhfstack.losses import dpo_loss
    from rlhfstack.stages.dpo import pair_logps

    torch.manual_seed(0)
    model, tok = load_causal_lm(str(stories_hf)), load_tokenizer(str(stories_hf))
    pad = tok.pad_token_id
    b = _pref_batch(pad)
    ref_c, ref_r = torch.tensor([-30.0, -12.0, -25.0]), torch.tensor([-35.0, -9.0, -26.0])
    losses = [
        dpo_loss(*pair_logps(model, b, pad_id), ref_c, ref_r, beta=0.1)[0] for pad_id in (None, pad)
    ]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    bad = {k: v.clone() for k, v in b.items()}
    bad["rejected_input_ids"][0, 1] += 1  # pair 0's prompts now differ
    plain = pair_logps(model, bad, None)
    fallback = pair_logps(model, bad, pad)
    assert torch.equal(plain[0], fallback[0]) and torch.equal(plain[1], fallback[1])


def test_rm_stage_loss_on_the_shared_prompt_path_equals_the_plain_path(stories_hf):
    """``stages/reward_model.pair_scores`` with ``rm.shared_prompt`` (the default) gives the same
    Bradley-Terry loss and gradients as the ``[2B, T]`` pass; differing prompts fall back."""
    from rlhfstack.losses import bradley_terry_loss
    from rlhfstack.models.core import RewardModel
    from rlhfstack.stages.reward_model import pair_scores

    torch.manual_seed(0)
    model, tok = load_causal_lm(str(stories_hf)), load_tokenizer(str(stories_hf))
    rm = RewardModel(model, k=2)
    pad = tok.pad_token_id
    b = _pref_batch(pad)
    out = []
    for pad_id in (None, pad):
        rm.zero_grad()
        c, r = pair_scores(rm, b, pad_id)
        loss, _ = bradley_terry_loss(c.reshape(-1), r.reshape(-1))
        loss.backward()
        out.append((float(loss), torch.cat([p.grad.flatten() for p in rm.parameters()])))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    assert (out[0][1] - out[1][1]).norm() <= 1e-4 * out[0][1].norm()
    bad = {k: v.clone() for k, v in b.items()}
    bad["rejected_input_ids"][0, 1] += 1  # pair 0's prompts now differ
    with torch.no_grad():
        plain, fallback = pair_scores(rm, bad, None), pair_scores(rm, bad, pad)
    assert torch.equal(plain[0], fallback[0]) and torch.equal(plain[1], fallback[1])


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias"])
def test_lean_decode_steps_match_the_hf_module_steps(arch):
    """``LeanDecoder`` on grouped KV heads (Llama) and q/k/v biases (Qwen2): the same tokens,
    log-probs and hidden states as stepping through the HF modules (left-padded batch)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhfstack.rollout.fast import LeanDecoder

    kw = dict(_TINY_LLAMA, max_position_embeddings=64)
    torch.manual_seed(0)
    if arch == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=False)).eval()
    assert LeanDecoder.build(model.model) is not None
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    ids[0, :2] = 0
    outs = [
        _sample_tiny(
            model,
            ids,
            mask,
            max_new_tokens=12,
            stop=2,
            return_hidden=True,
            lean_steps=lean,
            packed_weights=packed,
        )
        for lean, packed in ((False, False), (True, False), (True, True))
    ]
    hf = outs[0]
    for lean in outs[1:]:  # the lean prompt pass and steps, on F.linear and on packed weights
        assert torch.equal(hf.tokens_BN, lean.tokens_BN)
        assert torch.allclose(hf.logprobs_BN, lean.logprobs_BN, atol=1e-5)
        assert torch.allclose(hf.hidden_BND, lean.hidden_BND, atol=1e-5)


def test_packed_linears_equal_f_linear_and_refuse_other_dtypes():
    """``PackedLinears``: oneDNN-packed weights give ``F.linear``'s products (with a bias, for
    the row count packed for and another one); not float32 or not CPU: no packing."""
    from rlhfstack.rollout.fast import PackedLinears

    if not PackedLinears.available():
        pytest.skip("PyTorch built without oneDNN")
    torch.manual_seed(0)
    lins = [torch.nn.Linear(40, 24), torch.nn.Linear(24, 7, bias=False)]
    packed = PackedLinears.build(lins, rows=8)
    assert packed is not None
    for rows in (8, 3):
        x = torch.randn(rows, 40)
        h = packed.linear(x, lins[0])
        assert torch.allclose(h, lins[0](x), atol=1e-5)
        assert torch.allclose(packed.linear(h, lins[1]), lins[1](h), atol=1e-5)
    assert PackedLinears.build([torch.nn.Linear(4, 4).double()], rows=8) is None
    assert PackedLinears.build([torch.nn.Linear(4, 4).bfloat16()], rows=8) is None


def test_packed_decode_weights_follow_weight_updates():
    """The packed copies are taken per call: after an in-place update of the weights (an
    optimizer step) the next rollout uses the new weights, as the ``F.linear`` path does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfstack.rollout.fast import LeanDecoder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_TINY_LLAMA, max_position_embeddings=64)).eval()
    lean = LeanDecoder.build(model.model)
    assert lean is not None and lean.pack(3, model.lm_head)  # this build packs
    ids = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def decode(packed):
        return _sample_tiny(model, ids, mask, max_new_tokens=8, packed_weights=packed)

    before = decode(True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    after, plain = decode(True), decode(False)
    assert torch.equal(after.tokens_BN, plain.tokens_BN)
    assert torch.allclose(after.logprobs_BN, plain.logprobs_BN, atol=1e-5)
    assert not torch.allclose(before.logprobs_BN, after.logprobs_BN, atol=1e-3)


def test_compiled_static_decode_steps_match_the_lean_steps_and_follow_weight_updates():
    """``compile_steps``: the compiled static-shape step draws the same tokens (log-probs and
    hidden states within 1e-5) as the eager lean step, on left-padded prompts of two lengths
    (one graph: the cache length is bucketed), and after an in-place weight update, as an
    optimizer step makes it (the graph reads the live parameters, not a frozen copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**_TINY_LLAMA, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()

    def decode(ids, mask, compiled):
        return _sample_tiny(
            model, ids, mask, max_new_tokens=10, return_hidden=True, compile_steps=compiled
        )

    def check(ids, mask):
        eager, comp = decode(ids, mask, False), decode(ids, mask, True)
        assert torch.equal(eager.tokens_BN, comp.tokens_BN)
        assert torch.allclose(eager.logprobs_BN, comp.logprobs_BN, atol=1e-5)
        assert torch.allclose(eager.hidden_BND, comp.hidden_BND, atol=1e-5)
        return comp

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    ids[0, :2] = 0
    before = check(ids, mask)
    ids2 = torch.randint(3, 97, (3, 9), generator=g)  # another prompt length, same bucket
    check(ids2, torch.ones_like(ids2))
    with torch.no_grad():  # an optimizer step: parameters change in place
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    after = check(ids, mask)
    assert not torch.allclose(before.logprobs_BN, after.logprobs_BN, atol=1e-3)
