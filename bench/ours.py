"""One benchmark child for rlhfstack ("ours"): times one algorithm on one model size.

    .venv/bin/python bench/ours.py --algo ppo --model-dir runs/bench/models/35m --out r.json

Each algorithm runs the library pieces in the same shape as its stage:

* ``rm``   ``stages/reward_model.py``: ``RewardModel`` on the causal-LM trunk, each pair's
  prompt run once for chosen and rejected (``rm.shared_prompt``; ``--plain``: one ``[2B, T]``
  forward), Bradley-Terry loss, ``training.train_loop``.
* ``dpo``  ``stages/dpo.py``: reference log-probs precomputed once (their cost is amortized
  over the steps and included), each pair's prompt run once for chosen and rejected and the LM
  head on response tokens only (``dpo.shared_prompt``), ``train_loop``.
* ``ppo``  ``stages/ppo.py``: rollout with ``rollout.generate``, scoring (policy log-probs and
  values, reference log-probs, RM score), KL-shaped rewards, GAE, whitening, one PPO epoch of
  one minibatch (clipped policy + value loss). ``--value-model shared`` (the stage default: a
  value head on the policy trunk) or ``separate`` (a second model, as TRL).
  Old log-probs (and shared-head values) come with the rollout, as in the stage
  (``ppo.logprobs_from_rollout``); ``--no-logprobs-from-rollout`` adds the separate scoring pass.
* ``grpo`` 2 prompts x 4 samples, group-normalized advantages, PPO clipped loss, no reference;
  old log-probs from the rollout.
* ``gen``  ``rollout.generate`` alone (``--hf`` for HF ``generate`` at the same shape).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def _tcfg(**kw) -> SimpleNamespace:
    base = dict(
        lr=C.LR,
        adam_betas=(0.9, 0.999),
        adam_eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
        warmup_steps=0,
        lr_schedule="constant",
        batch_size=C.BATCH,
        micro_batch_size=C.BATCH,
        log_every=1,
        eval_every=0,
        save_every=0,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _run(tmp: Path):
    from rlhfstack.runtime import CostMeter, RunLogger
    from rlhfstack.training import Run

    cfg = SimpleNamespace(trainer=_tcfg(), seed=C.SEED, parallel=None)
    return Run(
        cfg=cfg,
        run_dir=tmp,
        logger=RunLogger(tmp, tensorboard=False),
        cost=CostMeter(),
        device="cpu",
    )


def _pref_items(model_dir: str, n: int) -> list[dict[str, list[int]]]:
    """``tokenize_preference`` layout: ``{chosen,rejected}_{input_ids,loss_mask}``."""
    from rlhfstack.models.core import load_tokenizer

    items = []
    for r in C.preference_rows(load_tokenizer(model_dir), n):
        it = {}
        for name in ("chosen", "rejected"):
            it[f"{name}_input_ids"] = r["prompt_ids"] + r[f"{name}_ids"]
            it[f"{name}_loss_mask"] = [0] * len(r["prompt_ids"]) + [1] * len(r[f"{name}_ids"])
        items.append(it)
    return items


def bench_rm(model_dir: str, steps: int, shared_prompt: bool = False) -> list[float]:
    import torch

    from rlhfstack.data.collate import collate_preference
    from rlhfstack.losses import bradley_terry_loss
    from rlhfstack.models.core import RewardModel, load_causal_lm

    rm = RewardModel(load_causal_lm(model_dir), kind="causal_lm", k=1)
    items = _pref_items(model_dir, steps * C.BATCH)
    timer = C.StepTimer()

    def trim(mb):  # stages/reward_model.trim_padding
        T = int(
            max(
                mb["chosen_attention_mask"].sum(-1).max(),
                mb["rejected_attention_mask"].sum(-1).max(),
            )
        )
        return {k: v[:, :T] for k, v in mb.items()}

    def loss_fn(mb, n_in_step):
        timer.tick()
        mb = trim(mb)
        if shared_prompt:
            from rlhfstack.models.pairs import shared_prompt_pair_scores

            c, r = shared_prompt_pair_scores(rm, mb, C.PAD_ID)
        else:
            B = mb["chosen_input_ids"].shape[0]
            ids = torch.cat([mb["chosen_input_ids"], mb["rejected_input_ids"]])
            att = torch.cat([mb["chosen_attention_mask"], mb["rejected_attention_mask"]])
            s = rm.raw_scores(ids, att)
            c, r = s[:B], s[B:]
        loss, stats = bradley_terry_loss(c.reshape(-1), r.reshape(-1))
        return loss * c.shape[0] / n_in_step, {k: float(v) for k, v in stats.items()}

    from rlhfstack.training import train_loop

    rm.train()
    with tempfile.TemporaryDirectory() as tmp:
        run = _run(Path(tmp))
        timer.start()
        train_loop(
            run,
            params=[p for p in rm.parameters() if p.requires_grad],
            items=items,
            collate=lambda b: collate_preference(b, C.PAD_ID),
            loss_fn=loss_fn,
            max_steps=steps,
            model=rm,
        )
        timer.tick()
    return timer.times[1:]  # the first tick starts step 1


def bench_dpo(model_dir: str, steps: int, mode: str = "shared_prompt") -> tuple[list[float], float]:
    """``mode``: ``shared_prompt`` (the stage default, ``dpo.shared_prompt``: each pair's prompt
    run once, the LM head on response tokens only), ``masked_head`` (only the latter) or
    ``plain`` (``sequence_logprob_sums`` over the ``[2B, T]`` batch)."""
    import torch

    from rlhfstack.data.collate import collate_preference
    from rlhfstack.losses import dpo_loss
    from rlhfstack.models.core import load_causal_lm, sequence_logprob_sums
    from rlhfstack.training import train_loop

    policy = load_causal_lm(model_dir)
    items = _pref_items(model_dir, steps * C.BATCH)

    def pair_logps(model, b):
        if mode == "shared_prompt":
            from rlhfstack.models.pairs import shared_prompt_pair_logprob_sums

            return shared_prompt_pair_logprob_sums(model, b, C.PAD_ID)
        B = b["chosen_input_ids"].shape[0]
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
        att = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]])
        lm = torch.cat([b["chosen_loss_mask"], b["rejected_loss_mask"]])
        if mode == "masked_head":
            from rlhfstack.models.pairs import masked_logprob_sums

            lp = masked_logprob_sums(model, ids, att, lm)
        else:
            lp = sequence_logprob_sums(model, ids, att, lm)
        return lp[:B], lp[B:]

    # reference log-probs, once (stages/dpo.py); the cost is amortized over the steps below
    t0 = time.perf_counter()
    ref = load_causal_lm(model_dir, trainable=False)
    with torch.no_grad():
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            c, r = pair_logps(ref, collate_preference(chunk, C.PAD_ID))
            for it, cc, rr in zip(chunk, c.tolist(), r.tolist()):
                it["ref_chosen"], it["ref_rejected"] = cc, rr
    del ref
    ref_s = time.perf_counter() - t0

    def collate(batch):
        out = collate_preference(batch, C.PAD_ID)
        out["ref_chosen"] = torch.tensor([b["ref_chosen"] for b in batch])
        out["ref_rejected"] = torch.tensor([b["ref_rejected"] for b in batch])
        return out

    timer = C.StepTimer()

    def loss_fn(mb, n_in_step):
        timer.tick()
        pc, pr = pair_logps(policy, mb)
        losses, cr, rr = dpo_loss(pc, pr, mb["ref_chosen"], mb["ref_rejected"], beta=0.1)
        return losses.sum() / n_in_step, {"reward_accuracy": float((cr > rr).float().mean())}

    policy.train()
    with tempfile.TemporaryDirectory() as tmp:
        run = _run(Path(tmp))
        timer.start()
        train_loop(
            run,
            params=[p for p in policy.parameters() if p.requires_grad],
            items=items,
            collate=collate,
            loss_fn=loss_fn,
            max_steps=steps,
            model=policy,
        )
        timer.tick()
    return timer.times[1:], ref_s


def bench_ppo(
    model_dir: str,
    steps: int,
    value_model: str,
    from_rollout: bool,
    compile_steps: bool = False,
    packed: bool = True,
) -> list[float]:
    import copy

    import torch

    from rlhfstack.losses import (
        AdaptiveKLController,
        gae,
        kl_shaped_rewards,
        masked_whiten,
        ppo_policy_loss,
        ppo_value_loss,
    )
    from rlhfstack.models.core import (
        RewardModel,
        ValueHead,
        causal_lm_parts,
        load_causal_lm,
        response_logprobs,
        trunk_hidden,
    )
    from rlhfstack.rollout.generate import generate
    from rlhfstack.runtime import release_free_heap
    from rlhfstack.training import build_optimizer, clip_grad

    tcfg = _tcfg()
    policy = load_causal_lm(model_dir)
    ref = load_causal_lm(model_dir, trainable=False)
    rm = RewardModel(load_causal_lm(model_dir, trainable=False), kind="causal_lm", k=1)
    rm.requires_grad_(False)
    rm.eval()
    d = policy.config.hidden_size
    value_head = critic_lm = critic_head = None
    if value_model == "shared":
        value_head = ValueHead(d)
        params = list(policy.parameters()) + list(value_head.parameters())
    else:  # stages/ppo.py _Critic: a copy of the RM trunk + a value head
        critic_lm = copy.deepcopy(rm.backbone)
        critic_lm.requires_grad_(True)
        critic_head = ValueHead(d)
        params = (
            list(policy.parameters())
            + list(critic_lm.parameters())
            + list(critic_head.parameters())
        )
    opt = build_optimizer(params, tcfg)
    kl_ctl = AdaptiveKLController(0.05, 6.0, 10000)
    gen_rng = torch.Generator().manual_seed(C.SEED)
    prompts = torch.tensor(C.prompt_rows(C.BATCH * steps))
    T, P = 1.0, C.PROMPT_LEN

    def critic_values(ids, mask):
        trunk, _ = causal_lm_parts(critic_lm)
        h = trunk_hidden(trunk, ids, mask)[:, P - 1 : -1]
        return critic_head(h).squeeze(-1).float()

    timer = C.StepTimer()
    timer.start()
    for step in range(steps):
        p_ids = prompts[step * C.BATCH : (step + 1) * C.BATCH]
        p_mask = torch.ones_like(p_ids)
        policy.eval()
        gen = generate(
            policy,
            p_ids,
            p_mask,
            max_new_tokens=C.COMPLETION_LEN,
            eos_id=C.EOS_ID,
            pad_id=C.PAD_ID,
            temperature=T,
            generator=gen_rng,
            return_logprobs=from_rollout,
            return_hidden=from_rollout and value_head is not None,
            compile_steps=compile_steps,
            packed_weights=packed,
        )
        ids, mask = gen.full()
        resp_mask = gen.response_mask_BR.float()
        with torch.no_grad():
            if from_rollout:
                old_logprobs = gen.logprobs_BR
                if value_head is not None:
                    old_values = value_head(gen.hidden_BRD).squeeze(-1).float()
                else:
                    old_values = critic_values(ids, mask)
            else:
                out = response_logprobs(policy, ids, mask, P, T, value_head=value_head)
                old_logprobs = out["logprobs"]
                old_values = out["values"] if value_head is not None else critic_values(ids, mask)
            ref_logprobs = response_logprobs(ref, ids, mask, P, T)["logprobs"]
            scores = rm.score(ids, mask)["mean"]
            scores = scores - 1.0 * (~gen.ended_B).float()
            rewards, _ = kl_shaped_rewards(
                scores, old_logprobs, ref_logprobs, resp_mask, kl_ctl.value, estimator="k1"
            )
            advantages, returns = gae(rewards, old_values, resp_mask, 1.0, 0.95)
            advantages = masked_whiten(advantages, resp_mask)
        release_free_heap()  # as the PPO stage does before its update
        policy.train()
        n_tok = float(resp_mask.sum()) or 1.0
        opt.zero_grad(set_to_none=True)
        o = response_logprobs(policy, ids, mask, P, T, value_head=value_head, return_entropy=True)
        v = o["values"] if value_head is not None else critic_values(ids, mask)
        pg, _ = ppo_policy_loss(
            o["logprobs"], old_logprobs, advantages, resp_mask, 0.2, normalizer=n_tok
        )
        vf, _ = ppo_value_loss(v, old_values, returns, resp_mask, 0.2, normalizer=n_tok)
        (pg + 0.1 * vf).backward()
        clip_grad(params, tcfg.grad_clip)
        opt.step()
        kl_ctl.update(0.0, C.BATCH)
        timer.tick()
    return timer.times


def reward_fn(texts: list[str]) -> list[float]:
    """The GRPO benchmark's reward (same function on both sides): distinct words / 64."""
    return [len(set(t.split())) / 64.0 for t in texts]


def bench_grpo(model_dir: str, steps: int, shared_prompt: bool = False) -> list[float]:
    import torch

    from rlhfstack.losses import group_normalized_advantages, ppo_policy_loss
    from rlhfstack.models.core import load_causal_lm, load_tokenizer, response_logprobs
    from rlhfstack.rollout.generate import decode_responses, generate
    from rlhfstack.training import build_optimizer, clip_grad

    tcfg = _tcfg()
    tok = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir)
    params = list(policy.parameters())
    opt = build_optimizer(params, tcfg)
    gen_rng = torch.Generator().manual_seed(C.SEED)
    texts = C.text_prompts(tok, C.GRPO_PROMPTS * steps)
    G, P = C.GRPO_GENERATIONS, C.PROMPT_LEN
    timer = C.StepTimer()
    timer.start()
    for step in range(steps):
        batch = texts[step * C.GRPO_PROMPTS : (step + 1) * C.GRPO_PROMPTS]
        enc = tok(batch, add_special_tokens=False, return_tensors="pt")
        p_ids = enc["input_ids"].repeat_interleave(G, 0)
        p_mask = enc["attention_mask"].repeat_interleave(G, 0)
        policy.eval()
        gen = generate(
            policy,
            p_ids,
            p_mask,
            max_new_tokens=C.COMPLETION_LEN,
            eos_id=C.EOS_ID,
            pad_id=C.PAD_ID,
            generator=gen_rng,
            return_logprobs=True,
            prompt_group_size=G if shared_prompt else 1,
        )
        rewards = torch.tensor(reward_fn(decode_responses(tok, gen)))
        adv_B = group_normalized_advantages(rewards, G)
        ids, mask = gen.full()
        resp_mask = gen.response_mask_BR.float()
        policy.train()
        opt.zero_grad(set_to_none=True)
        if shared_prompt:
            from rlhfstack.models.pairs import shared_prefix_response_logprobs

            o = shared_prefix_response_logprobs(
                policy, p_ids[::G], p_mask[::G], gen.response_ids_BR, gen.response_mask_BR
            )
        else:
            o = response_logprobs(policy, ids, mask, P)
        adv_BT = adv_B.unsqueeze(1).expand_as(resp_mask)
        loss, _ = ppo_policy_loss(
            o["logprobs"],
            gen.logprobs_BR,
            adv_BT,
            resp_mask,
            0.2,
            normalizer=float(resp_mask.sum()) or 1.0,
        )
        loss.backward()
        clip_grad(params, tcfg.grad_clip)
        opt.step()
        timer.tick()
    return timer.times


def bench_gen(
    model_dir: str, steps: int, hf: bool, compile_steps: bool = False, packed: bool = True
) -> tuple[list[float], int]:
    import torch

    from rlhfstack.models.core import load_causal_lm
    from rlhfstack.rollout.generate import generate

    model = load_causal_lm(model_dir, trainable=False)
    prompts = torch.tensor(C.prompt_rows(C.BATCH * steps))
    g = torch.Generator().manual_seed(C.SEED)
    times, n_tokens = [], 0
    for step in range(steps):
        p = prompts[step * C.BATCH : (step + 1) * C.BATCH]
        m = torch.ones_like(p)
        t0 = time.perf_counter()
        if hf:
            with torch.no_grad():
                out = model.generate(
                    p,
                    attention_mask=m,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=C.COMPLETION_LEN,
                    min_new_tokens=C.COMPLETION_LEN,
                    pad_token_id=C.PAD_ID,
                )
            n = out.shape[1] - p.shape[1]
        else:
            gen = generate(
                model,
                p,
                m,
                max_new_tokens=C.COMPLETION_LEN,
                eos_id=C.EOS_ID,
                pad_id=C.PAD_ID,
                generator=g,
                stop_ids=(),
                suppress_ids=(C.PAD_ID, C.EOS_ID),
                compile_steps=compile_steps,
                packed_weights=packed,
            )
            n = gen.response_ids_BR.shape[1]
        times.append(time.perf_counter() - t0)
        n_tokens = n * p.shape[0]
    return times, n_tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algo", required=True, choices=["rm", "dpo", "ppo", "grpo", "gen"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--value-model", default="shared", choices=["shared", "separate"])
    ap.add_argument(
        "--logprobs-from-rollout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ppo: old log-probs from the rollout (the stage default); --no-...: a scoring pass",
    )
    ap.add_argument(
        "--shared-prompt", action="store_true", help="rm/dpo/grpo: run each shared prompt once"
    )
    ap.add_argument(
        "--masked-head", action="store_true", help="dpo: LM head on response tokens only"
    )
    ap.add_argument(
        "--plain", action="store_true", help="rm/dpo: the plain [2B, T] pass (no shared prompt)"
    )
    ap.add_argument("--hf", action="store_true", help="gen: time HF generate instead")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="gen/ppo: torch.compile the decode step (rollout.compile=true)",
    )
    ap.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gen/ppo: oneDNN-packed decode weights (rollout.packed_weights, the default)",
    )
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    C.set_threads(a.threads)
    import torch

    torch.manual_seed(C.SEED)
    n = a.warmup + a.steps
    extra: dict = {"side": "ours", "algo": a.algo, "threads": a.threads}
    if a.algo == "rm":
        times = bench_rm(a.model_dir, n, shared_prompt=not a.plain)  # the stage default
        extra.update(shared_prompt=not a.plain)
    elif a.algo == "dpo":
        mode = "plain" if a.plain else "masked_head" if a.masked_head else "shared_prompt"
        times, ref_s = bench_dpo(a.model_dir, n, mode)
        extra.update(mode=mode)
        # the reference pass ran once for the whole data set: charge each step its share
        extra.update(
            train_s_per_step=C.summarize(times, a.warmup)["s_per_step"], ref_precompute_s=ref_s
        )
        times = [t + ref_s / n for t in times]
    elif a.algo == "ppo":
        times = bench_ppo(
            a.model_dir, n, a.value_model, a.logprobs_from_rollout, a.compile, a.packed
        )
        extra.update(
            value_model=a.value_model,
            logprobs_from_rollout=a.logprobs_from_rollout,
            compile=a.compile,
            packed_weights=a.packed,
        )
    elif a.algo == "grpo":
        times = bench_grpo(a.model_dir, n, a.shared_prompt)
        extra.update(shared_prompt=a.shared_prompt)
    else:
        times, n_tok = bench_gen(a.model_dir, n, a.hf, a.compile, a.packed)
        impl = "hf" if a.hf else "ours-compiled" if a.compile else "ours"
        if not a.hf and not a.compile and not a.packed:
            impl = "ours-mkl"
        res = C.summarize(times, a.warmup, {**extra, "impl": impl})
        res["tok_s"] = n_tok / res["s_per_step"]
        C.emit(res, a.out)
        return res
    res = C.summarize(times, a.warmup, extra)
    C.emit(res, a.out)
    return res


if __name__ == "__main__":
    main()
