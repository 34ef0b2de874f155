"""Two gloo processes on CPU against one process: FSDP2, tensor parallel, pipeline parallel.

One spawn of two workers runs every check in sequence (process start-up and imports dominate
the cost); each worker writes its numbers to ``rank{r}.json`` and the tests below assert on
them. Model: a tiny random Llama (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 64, tied
embeddings, as in stories260K).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhfstack import distributed

WORLD = 2
B = 8  # global batch (sequences or pairs)
VOCAB = 64


# ----------------------------------------------------------------------------- models, data, losses


def tiny_llama(tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def build(kind: str, activation_checkpointing: bool = False):
    m = tiny_llama()
    if activation_checkpointing:
        m.gradient_checkpointing_enable()
        m.config.use_cache = False
    if kind == "rm":
        from rlhfstack.models.core import RewardModel

        torch.manual_seed(1)
        m = RewardModel(m, kind="causal_lm", k=1)
    return m.train()


def _rows(n: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lens = torch.randint(T // 2, T + 1, (n,), generator=g)
    att = (torch.arange(T)[None] < lens[:, None]).long()
    return ids.masked_fill(att == 0, 0), att


def make_batch(kind: str, n: int = B, T: int = 12) -> dict[str, torch.Tensor]:
    if kind == "sft":
        ids, att = _rows(n, T, 1)
        return {"input_ids": ids, "attention_mask": att, "labels": ids.masked_fill(att == 0, -100)}
    out = {}
    for side, seed in (("chosen", 2), ("rejected", 3)):
        ids, att = _rows(n, T, seed)
        lm = att.clone()
        lm[:, :3] = 0  # a 3-token prompt
        out.update(
            {f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_loss_mask": lm}
        )
    g = torch.Generator().manual_seed(4)
    out["ref_chosen"] = -20 - 5 * torch.rand(n, generator=g)
    out["ref_rejected"] = -20 - 5 * torch.rand(n, generator=g)
    return out


def make_loss(kind: str, model):
    """Loss functions shaped like the stages' (``(loss / n_in_step, stats)``; one trunk call)."""
    from rlhfstack.losses import bradley_terry_loss, dpo_loss
    from rlhfstack.models.core import causal_lm_parts, sequence_logprob_sums, trunk_hidden

    def pair(mb, key):
        return torch.cat([mb[f"chosen_{key}"], mb[f"rejected_{key}"]])

    def sft(mb, n):
        trunk, head = causal_lm_parts(model)
        h = trunk_hidden(trunk, mb["input_ids"], mb["attention_mask"])
        logits = head(h[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB),
            mb["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return nll / n, {"nll": float(nll.detach())}

    def rm(mb, n):  # like the stage: padding columns trimmed per micro-batch
        b = mb["chosen_input_ids"].shape[0]
        att = pair(mb, "attention_mask")
        T = int(att.sum(-1).max())
        s = model.raw_scores(pair(mb, "input_ids")[:, :T], att[:, :T])
        loss, stats = bradley_terry_loss(s[:b, 0], s[b:, 0])
        return loss * b / n, {k: float(v) for k, v in stats.items()}

    def dpo(mb, n):
        b = mb["chosen_input_ids"].shape[0]
        lp = sequence_logprob_sums(
            model, pair(mb, "input_ids"), pair(mb, "attention_mask"), pair(mb, "loss_mask")
        )
        losses, cr, rr = dpo_loss(lp[:b], lp[b:], mb["ref_chosen"], mb["ref_rejected"], beta=0.1)
        return losses.sum() / n, {"reward_margin": float((cr - rr).mean())}

    return {"sft": sft, "rm": rm, "dpo": dpo}[kind]


def train(model, kind: str, state, steps: int, micro: int, mixed: str = "none", eval_at: int = 0):
    """The train_loop recipe in miniature: shard, accumulate, clip, AdamW. Returns per-step numbers."""
    dm = distributed.DistributedModel(model, list(model.parameters()), state, mixed)
    opt = torch.optim.AdamW(dm.params, lr=1e-2)
    batch = make_batch(kind)
    loss_fn = make_loss(kind, model)
    losses, norms, evals = [], [], []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        local = distributed.shard_batch(batch, state.dp_rank, state.dp)
        loss, _ = dm.forward_backward(local, loss_fn, B, micro)
        norms.append(dm.clip_grad(1.0))
        opt.step()
        losses.append(loss)
        if step == eval_at:
            with torch.no_grad():
                evals.append(float(dm.call(loss_fn, batch, B)[0]))
    return dm, {"losses": losses, "norms": norms, "evals": evals}


def _par(dp=1, tp=1, pp=1):
    return SimpleNamespace(dp_shard=dp, tp=tp, pp=pp)


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- worker parts


def part_fsdp() -> dict:
    """dp_shard=2, 5 steps, micro-batches of 2 (2 per rank), grad clipping, a mid-run eval."""
    ref_model = build("sft")
    _, ref = train(ref_model, "sft", distributed.ParallelState(), 5, 2, eval_at=3)
    st = distributed.init_distributed(_par(dp=2))
    model = build("sft")
    dm, got = train(model, "sft", st, 5, 2, eval_at=3)
    sd = distributed.gather_full_state_dict(model)
    diff = (
        max((sd[k] - v).abs().max().item() for k, v in ref_model.state_dict().items())
        if sd
        else 0.0
    )
    return {
        "loss_rel": _max_rel(got["losses"], ref["losses"]),
        "norm_rel": _max_rel(got["norms"], ref["norms"]),
        "eval_rel": _max_rel(got["evals"], ref["evals"]),
        "param_diff": diff,
        "losses": got["losses"],
    }


def part_fsdp_ac_bf16() -> dict:
    """Activation checkpointing (exact) and bf16 mixed precision (approximate) under FSDP2."""
    _, ref = train(build("sft"), "sft", distributed.ParallelState(), 3, 2)
    st = distributed.init_distributed(_par(dp=2))
    _, ac = train(build("sft", activation_checkpointing=True), "sft", st, 3, 2)
    _, bf = train(build("sft"), "sft", st, 3, 4, mixed="bf16")
    return {
        "ac_loss_rel": _max_rel(ac["losses"], ref["losses"]),
        "bf16_loss_rel": _max_rel(bf["losses"], ref["losses"]),
    }


def part_dpo_fsdp() -> dict:
    """DPO-shaped loss (pairs, fp32 reference log-probs in the batch) under FSDP2."""
    _, ref = train(build("dpo"), "dpo", distributed.ParallelState(), 3, 4)
    st = distributed.init_distributed(_par(dp=2))
    _, got = train(build("dpo"), "dpo", st, 3, 4)
    return {"loss_rel": _max_rel(got["losses"], ref["losses"])}


def _shared_prompt_batch() -> dict[str, torch.Tensor]:
    """``make_batch("dpo")`` with the rejected rows given the chosen rows' 3-token prompts."""
    b = make_batch("dpo")
    b["rejected_input_ids"][:, :3] = b["chosen_input_ids"][:, :3]
    return b


def part_dpo_fsdp_shared_prompt() -> dict:
    """The stage's shared-prompt DPO pass (prompt run once, then the responses through its KV
    cache: two trunk calls per micro-batch) under FSDP2 against the plain pass in one process."""
    from rlhfstack.losses import dpo_loss
    from rlhfstack.models.pairs import shared_prompt_pair_logprob_sums

    def shared_loss(model):
        def fn(mb, n):
            c, r = shared_prompt_pair_logprob_sums(model, mb, 0)
            losses, cr, rr = dpo_loss(c, r, mb["ref_chosen"], mb["ref_rejected"], beta=0.1)
            return losses.sum() / n, {"reward_margin": float((cr - rr).mean())}

        return fn

    def run(model, state, loss_fn):
        dm = distributed.DistributedModel(model, list(model.parameters()), state)
        opt = torch.optim.AdamW(dm.params, lr=1e-2)
        batch, losses = _shared_prompt_batch(), []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            local = distributed.shard_batch(batch, state.dp_rank, state.dp)
            losses.append(dm.forward_backward(local, loss_fn, B, 2)[0])
            dm.clip_grad(1.0)
            opt.step()
        return losses

    ref_model = build("dpo")
    ref = run(ref_model, distributed.ParallelState(), make_loss("dpo", ref_model))
    st = distributed.init_distributed(_par(dp=2))
    model = build("dpo")
    got = run(model, st, shared_loss(model))
    return {"loss_rel": _max_rel(got, ref), "losses": got, "ref_losses": ref}


def _sample(model) -> torch.Tensor:
    """12 tokens for 4 left-padded prompts from a fixed generator (rollout.tp_decode=sharded)."""
    from rlhfstack.rollout.generate import generate

    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (4, 6), generator=g)
    att = torch.ones_like(ids)
    att[:2, :2] = 0  # left padding
    ids = ids.masked_fill(att == 0, 0)
    kw = dict(max_new_tokens=12, eos_id=VOCAB - 1, pad_id=0, generator=g)
    return generate(model, ids, att, **kw).response_ids_BR


def part_tp() -> dict:
    """tp=2: logits equal tp=1; three training steps equal one process; the tensor-parallel
    modules decode (the plain loop, every rank in step) the tokens the whole model draws."""
    from rlhfstack.rollout.fast import supports_fast_decode

    ids, att = _rows(4, 10, 7)
    ref_model = build("sft")
    ref_tokens = _sample(ref_model)
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, attention_mask=att).logits
    _, ref = train(build("sft"), "sft", distributed.ParallelState(), 3, 4)
    st = distributed.init_distributed(_par(tp=2))
    model = build("sft")
    distributed.apply_tp(model, st.mesh["tp"])
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
    tokens = _sample(model)
    _, got = train(build("sft"), "sft", st, 3, 4)
    return {
        "fast_decode": supports_fast_decode(model),
        "tokens_equal": torch.equal(tokens, ref_tokens),
        "logits_diff": (logits - ref_logits).abs().max().item(),
        "local_q_rows": int(q.to_local().shape[0]),
        "loss_rel": _max_rel(got["losses"], ref["losses"]),
    }


def part_pp() -> dict:
    """pp=2 (1F1B over 4 micro-batches; GPipe over 1 for ``sft_gpipe``): loss and every gradient
    equal pp=1, for SFT, RM and DPO; with the same micro-batches, bit for bit (the tied embedding's
    gradient summed micro-batch by micro-batch, the clip norm from per-tensor norms in the
    one-process order)."""
    out = {}
    st = distributed.init_distributed(_par(pp=2))
    for name in ("sft", "rm", "dpo", "sft_gpipe"):
        kind, micro = name.split("_")[0], (B if name.endswith("gpipe") else 2)
        ref_model = build(kind)
        ref_dm = distributed.DistributedModel(
            ref_model, list(ref_model.parameters()), distributed.ParallelState()
        )
        ref_loss, _ = ref_dm.forward_backward(make_batch(kind), make_loss(kind, ref_model), B, 2)
        ref_norm = ref_dm.clip_grad(0.05)
        ref_grads = {n: p.grad for n, p in ref_model.named_parameters(remove_duplicate=False)}
        model = build(kind)
        dm = distributed.DistributedModel(model, list(model.parameters()), st)
        loss, stats = dm.forward_backward(make_batch(kind), make_loss(kind, model), B, micro)
        norm = dm.clip_grad(0.05)
        checked, gdiff = [], 0.0
        for n, p in model.named_parameters(remove_duplicate=False):
            if any(p is q for q in dm.params):
                gdiff = max(gdiff, (p.grad - ref_grads[n]).abs().max().item())
                checked.append(n)
        out[name] = {
            "loss": loss,
            "ref_loss": ref_loss,
            "norm": norm,
            "ref_norm": ref_norm,
            "grad_diff": gdiff,
            "checked": checked,
            "stats": stats,
        }
    return out


def part_finalize() -> dict:
    """After training, rank 0 holds the full plain model (same object); rank 1 leaves."""
    ref_model = build("sft")
    train(ref_model, "sft", distributed.ParallelState(), 2, 4)
    st = distributed.init_distributed(_par(dp=2))
    model = build("sft")
    dm, _ = train(model, "sft", st, 2, 4)
    obj = id(model)
    try:
        dm.finalize()
    except SystemExit as e:
        return {"exited": True, "code": e.code}
    from torch.distributed.tensor import DTensor

    diff = max(
        (model.state_dict()[k] - v).abs().max().item() for k, v in ref_model.state_dict().items()
    )
    return {
        "exited": False,
        "same_object": id(model) == obj,
        "plain": not any(isinstance(p, DTensor) for p in model.parameters()),
        "class": type(model).__name__,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "param_diff": diff,
        "pg_alive": torch.distributed.is_initialized(),
    }


PARTS = {
    "fsdp": part_fsdp,
    "fsdp_ac_bf16": part_fsdp_ac_bf16,
    "dpo_fsdp": part_dpo_fsdp,
    "dpo_fsdp_shared_prompt": part_dpo_fsdp_shared_prompt,
    "tp": part_tp,
    "pp": part_pp,
    "finalize": part_finalize,  # last: it ends the process group
}


# ----------------------------------------------------------------------------- four processes (slow)


def _combo(
    par,
    kinds=("sft", "rm", "dpo"),
    steps: int = 3,
    micro: int = 2,
    ac: bool = False,
    mixed: str = "none",
) -> dict:
    out = {}
    for kind in kinds:
        _, ref = train(build(kind), kind, distributed.ParallelState(), steps, micro)
        st = distributed.init_distributed(par)
        _, got = train(build(kind, ac), kind, st, steps, micro, mixed=mixed)
        out[kind] = {
            "loss_rel": _max_rel(got["losses"], ref["losses"]),
            "norm_rel": _max_rel(got["norms"], ref["norms"]),
        }
    return out


def part_finalize_pp_dp() -> dict:
    """pp=2 x dp_shard=2: the gathered model on rank 0 equals one process; ranks 1-3 leave."""
    ref_model = build("sft")
    train(ref_model, "sft", distributed.ParallelState(), 2, 2)
    st = distributed.init_distributed(_par(dp=2, pp=2))
    model = build("sft")
    dm, _ = train(model, "sft", st, 2, 2)
    try:
        dm.finalize()
    except SystemExit as e:
        return {"exited": True, "code": e.code}
    diff = max(
        (model.state_dict()[k] - v).abs().max().item() for k, v in ref_model.state_dict().items()
    )
    return {
        "exited": False,
        "param_diff": diff,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }


PARTS4 = {
    "fsdp_tp": lambda: _combo(_par(dp=2, tp=2), ("sft",), steps=5),
    "pp_dp": lambda: _combo(_par(dp=2, pp=2)),
    "pp_tp": lambda: _combo(_par(tp=2, pp=2), ("sft", "dpo")),
    "pp_dp_ac": lambda: _combo(_par(dp=2, pp=2), ("sft",), ac=True),
    "pp_dp_bf16": lambda: _combo(_par(dp=2, pp=2), ("sft",), mixed="bf16"),
    "finalize": part_finalize_pp_dp,  # last: it ends the process group
}


def _battery(out_dir: str, world: int = WORLD) -> None:
    torch.set_num_threads(1)
    st = distributed.init_distributed(_par(dp=world))
    res: dict = {}
    for name, fn in (PARTS if world == WORLD else PARTS4).items():
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # report, keep going: the other parts still run
            res[name] = {"error": traceback.format_exc()}
        res[name]["seconds"] = round(time.perf_counter() - t0, 2)
    Path(out_dir, f"rank{st.rank}.json").write_text(json.dumps(res))
    distributed.teardown()


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    distributed.launch_local(_battery, WORLD, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _part(results, name: str, rank: int = 0) -> dict:
    r = results[rank][name]
    assert "error" not in r, r["error"]
    return r


def test_fsdp2_matches_one_process_over_five_steps(results):
    for rank in range(WORLD):
        r = _part(results, "fsdp", rank)
        assert len(r["losses"]) == 5
        assert r["loss_rel"] < 1e-4, r
        assert r["norm_rel"] < 1e-4, r
        assert r["eval_rel"] < 1e-4, r
    assert _part(results, "fsdp")["param_diff"] < 1e-5  # gathered full state dict (rank 0)


def test_fsdp2_activation_checkpointing_and_bf16(results):
    r = _part(results, "fsdp_ac_bf16")
    assert r["ac_loss_rel"] < 1e-4, r
    assert r["bf16_loss_rel"] < 3e-2, r


def test_fsdp2_dpo_loss_matches(results):
    assert _part(results, "dpo_fsdp")["loss_rel"] < 1e-4


def test_fsdp2_shared_prompt_dpo_matches_plain_one_process(results):
    r = _part(results, "dpo_fsdp_shared_prompt")
    assert r["losses"][0] != r["losses"][-1]  # it trained
    assert r["loss_rel"] < 1e-5


def test_tensor_parallel_logits_and_training_match(results):
    for rank in range(WORLD):
        r = _part(results, "tp", rank)
        assert r["fast_decode"] is False and r["tokens_equal"], r
        assert r["logits_diff"] < 1e-5, r
        assert r["local_q_rows"] == 16  # 4 heads x head_dim 8, split over 2 ranks
        assert r["loss_rel"] < 1e-4, r


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo", "sft_gpipe"])
def test_pipeline_parallel_forward_backward_match(results, kind):
    checked = set()
    for rank in range(WORLD):
        r = _part(results, "pp", rank)[kind]
        if kind == "sft_gpipe":  # one micro-batch of 4 rows against two of 2: float tolerance
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-7)
            assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
            assert r["grad_diff"] < 1e-5, r
        else:  # the same micro-batches: the one-process numbers exactly
            assert (r["loss"], r["norm"], r["grad_diff"]) == (r["ref_loss"], r["ref_norm"], 0.0), r
        checked |= set(r["checked"])
    # between them, the two stages hold (and checked) every parameter
    names = {n for n, _ in build(kind.split("_")[0]).named_parameters(remove_duplicate=False)}
    assert checked == names


def test_finalize_gathers_on_rank0_and_releases_others(results):
    r0 = _part(results, "finalize", 0)
    assert r0["same_object"] and r0["plain"] and r0["tied"] and r0["class"] == "LlamaForCausalLM"
    assert r0["param_diff"] < 1e-5 and not r0["pg_alive"]
    r1 = _part(results, "finalize", 1)
    assert r1["exited"] and r1["code"] == 0


@pytest.fixture(scope="module")
def results4(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist4")
    distributed.launch_local(_battery, 4, str(out), 4)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("combo", ["fsdp_tp", "pp_dp", "pp_tp", "pp_dp_ac"])
def test_four_process_combinations_match_one_process(results4, combo):
    for rank in range(4):
        for kind, r in _part(results4, combo, rank).items():
            if kind == "seconds":
                continue
            assert r["loss_rel"] < 1e-4, (combo, kind, r)
            assert r["norm_rel"] < 1e-4, (combo, kind, r)


@pytest.mark.slow
def test_four_process_pp_dp_bf16_and_finalize(results4):
    r = _part(results4, "pp_dp_bf16")["sft"]
    assert r["loss_rel"] < 3e-2, r
    r0 = _part(results4, "finalize", 0)
    assert not r0["exited"] and r0["tied"] and r0["param_diff"] < 1e-5, r0
    assert all(_part(results4, "finalize", k)["exited"] for k in (1, 2, 3))
