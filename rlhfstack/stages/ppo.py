"""PPO against a frozen reward model with a per-token KL penalty to a frozen reference.

One iteration (Ziegler et al. 2019; Ouyang et al. 2022; the details of Huang et al. 2024):

1. rollout   sample responses for ``trainer.batch_size`` prompts with the current policy
2. score     old log-probs and values (policy, no grad; taken from the rollout's own forward
             passes by default), reference log-probs, RM score of the truncated response at its
             last real token; a fixed penalty when no EOS was emitted
3. shape     r_t = -beta * KL_t on every response token, + score on the last one
4. GAE       advantages and returns (gamma, lambda); returns = A + V before whitening A
5. update    ``ppo.epochs`` passes of ``ppo.num_minibatches`` minibatches: clipped policy loss +
             vf_coef * clipped value loss - entropy_coef * entropy
6. KL        the adaptive controller moves beta toward the target KL

Critic-free variants (``ppo.advantage_estimator``): ``grpo`` (Shao et al. 2024) and ``rloo``
(Ahmadian et al. 2024) sample ``rollout.samples_per_prompt`` = G responses per prompt, train no
value model, and replace step 4 by one advantage per response from its group: the sequence reward
(score - beta * summed KL) normalized within the group (grpo) or minus the mean of the other G-1
(rloo), on every token of the response. Steps 1-3, 5 (without the value loss) and 6 are PPO's.

Diagnostics are logged beside the loss every iteration; ``first_minibatch_ratio`` and
``first_minibatch_approx_kl`` must read 1 and 0 (the rollout and training passes agree).

Under ``torchrun`` with ``parallel.dp_shard=N`` (FSDP2 data parallel): every rank draws the same
global batch of prompts and keeps its ``B / N`` rows; it generates and scores them on a full
replica of the policy (``DistributedModel.replica``, refreshed after every update, so that ranks
decode without collectives), trains them under FSDP2 with losses divided by the minibatch's token
count over all ranks (FSDP2 sums the gradients), and whitens advantages, updates the KL
controller and averages diagnostics over all ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack import distributed
from rlhfstack.configs import PPOConfig
from rlhfstack.data.loading import load_prompts
from rlhfstack.losses import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    group_normalized_advantages,
    kl_estimate,
    kl_shaped_rewards,
    leave_one_out_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhfstack.models.core import (
    RewardEnsemble,
    RewardModel,
    ValueHead,
    adapter_disabled,
    causal_lm_parts,
    load_causal_lm,
    load_reward_model,
    response_logprobs,
    save_hf,
    tokenizer_for,
)
from rlhfstack.rollout.fast import supports_fast_decode
from rlhfstack.rollout.generate import generate, left_pad_prompts, sample_texts, score_texts
from rlhfstack.runtime import (
    atomic_write_json,
    plot_metrics,
    release_free_heap,
    rng_state,
    set_rng_state,
    write_stage_done,
)
from rlhfstack.training import (
    Preempted,
    build_optimizer,
    build_scheduler,
    clip_grad,
    preemption_flag,
    setup_run,
)

log = logging.getLogger("rlhfstack.ppo")


class _Critic(torch.nn.Module):
    """A separate value model: a trunk (initialized from the RM) and a value head."""

    def __init__(self, rm: RewardModel) -> None:
        super().__init__()
        import copy

        self.lm = copy.deepcopy(rm.backbone)
        self.lm.requires_grad_(True)
        self.head = ValueHead(rm.backbone.config.hidden_size)
        with torch.no_grad():  # start from the RM's head (its first ensemble member)
            self.head.linear.weight.copy_(rm.head.linear.weight[:1])
            self.head.linear.bias.copy_(rm.head.linear.bias[:1])


def _values(critic: _Critic, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    from rlhfstack.models.core import trunk_hidden

    trunk, _ = causal_lm_parts(critic.lm)
    h = trunk_hidden(trunk, ids, mask)[:, start - 1 : -1]
    return critic.head(h).squeeze(-1).float()


def _reward_members(rm: RewardModel | RewardEnsemble) -> list[RewardModel]:
    return list(rm.members) if isinstance(rm, RewardEnsemble) else [rm]


def _kl_controller(cfg: PPOConfig):
    if cfg.kl.controller == "adaptive":
        return AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
    if cfg.kl.controller == "fixed":
        return FixedKLController(cfg.kl.init_coef)
    raise ValueError(f"kl.controller: unknown controller {cfg.kl.controller!r} (adaptive | fixed)")


def _validate(cfg: PPOConfig) -> None:
    if cfg.rollout.top_k != 0 or cfg.rollout.top_p != 1.0:
        raise ValueError(
            "rollout.top_k must be 0 and rollout.top_p 1.0: truncated sampling breaks PPO's log-probs"
        )
    if cfg.rollout.backend not in ("native", "vllm"):
        raise ValueError(
            f"rollout.backend: unknown backend {cfg.rollout.backend!r} (native | vllm)"
        )
    if cfg.trainer.batch_size % cfg.ppo.num_minibatches:
        raise ValueError(
            f"trainer.batch_size ({cfg.trainer.batch_size}) must be divisible by ppo.num_minibatches "
            f"({cfg.ppo.num_minibatches})"
        )
    if cfg.ppo.value_model not in ("shared", "separate"):
        raise ValueError(
            f"ppo.value_model: unknown value {cfg.ppo.value_model!r} (shared | separate)"
        )
    est, G = cfg.ppo.advantage_estimator, cfg.rollout.samples_per_prompt
    if est not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"ppo.advantage_estimator: unknown estimator {est!r} ({' | '.join(ADVANTAGE_ESTIMATORS)})"
        )
    if G < 1 or cfg.trainer.batch_size % G:
        raise ValueError(
            f"rollout.samples_per_prompt ({G}) must be >= 1 and divide trainer.batch_size "
            f"({cfg.trainer.batch_size}), which counts responses"
        )
    if est != "gae" and G < 2:
        raise ValueError(
            f"ppo.advantage_estimator={est} compares the samples of a prompt: "
            f"rollout.samples_per_prompt must be >= 2 (got {G})"
        )


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")


def _validate_distributed(cfg: PPOConfig, dp: int, tp: int, pp: int) -> None:
    if tp != 1 or pp != 1:
        raise NotImplementedError(
            f"PPO runs FSDP2 data parallel only (parallel.dp_shard); got tp={tp} pp={pp}: "
            "tensor / pipeline parallel PPO is not built"
        )
    if cfg.rollout.backend != "native":
        raise NotImplementedError("rollout.backend=vllm with several training processes")
    if cfg.trainer.batch_size % (cfg.ppo.num_minibatches * dp):
        raise ValueError(
            f"trainer.batch_size ({cfg.trainer.batch_size}) must be divisible by "
            f"ppo.num_minibatches * parallel.dp_shard ({cfg.ppo.num_minibatches} * {dp})"
        )
    G = cfg.rollout.samples_per_prompt
    if cfg.trainer.batch_size % (G * dp):
        raise ValueError(
            f"trainer.batch_size ({cfg.trainer.batch_size}) must be divisible by "
            f"rollout.samples_per_prompt * parallel.dp_shard ({G} * {dp}): each rank samples "
            "whole groups"
        )


def _global_whiten(x: torch.Tensor, m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` with the mean and unbiased variance of the valid entries of *all*
    data-parallel ranks (one all-reduce of three sums)."""
    t = distributed.sum_stats(
        {"n": float(m.sum()), "s": float((x * m).sum()), "s2": float((x * x * m).sum())}
    )
    mean = t["s"] / t["n"]
    var = (t["s2"] - t["n"] * mean * mean) / max(t["n"] - 1.0, 1.0)  # unbiased, as masked_var
    return torch.where(m.bool(), (x - mean) / (var + eps) ** 0.5, torch.zeros_like(x))


def train(cfg: PPOConfig, gold_scorer: Any | None = None) -> Path:
    """Run PPO; returns ``run_dir``. ``gold_scorer(prompts, completions) -> np.ndarray`` (optional)
    scores held-out samples with a hidden gold reward every ``gold_eval_every`` iterations."""
    _validate(cfg)
    run = setup_run(cfg)
    device = run.device
    tcfg, pcfg = cfg.trainer, cfg.ppo
    estimator, G = pcfg.advantage_estimator, cfg.rollout.samples_per_prompt
    critic_free = estimator != "gae"  # grpo / rloo: advantages from the group, no value model
    ps = run.dist  # data-parallel ranks each roll out and train on B / dp prompts
    dp, rank = ps.dp, ps.dp_rank
    if ps.distributed:
        _validate_distributed(cfg, dp, ps.tp, ps.pp)
    tok = tokenizer_for(cfg.model)
    policy = load_causal_lm(
        cfg.model.path,
        dtype=cfg.model.dtype,
        lora=cfg.model.lora,
        activation_checkpointing=cfg.model.activation_checkpointing,
        device=device,
    )
    use_lora = bool(cfg.model.lora.enabled)
    ref = None
    if not use_lora:  # with LoRA the reference is the policy with its adapter switched off
        ref = load_causal_lm(
            cfg.ref_path or cfg.model.path, dtype=cfg.model.dtype, trainable=False, device=device
        )
    # one reward model or an ensemble directory (ensemble.json): mean and std over every head
    rm = load_reward_model(cfg.reward_model_path, dtype=cfg.model.dtype, device=device)
    n_heads = sum(m.head.linear.out_features for m in _reward_members(rm))
    if pcfg.reward_uncertainty_coef > 0 and n_heads < 2:
        raise ValueError(
            f"ppo.reward_uncertainty_coef={pcfg.reward_uncertainty_coef} penalizes the std over "
            f"reward heads, but {cfg.reward_model_path} has {n_heads}: train it with "
            "rm.ensemble_size >= 2 or point reward_model_path at an ensemble directory"
        )
    d_model = causal_lm_parts(policy)[0].config.hidden_size
    critic: _Critic | None = None
    value_head: ValueHead | None = None
    if not critic_free and pcfg.value_model == "shared":
        value_head = ValueHead(d_model).to(device)
    elif not critic_free:
        critic = _Critic(_reward_members(rm)[0]).to(device)
    # what is trained (and checkpointed): {policy, value head or critic (gae only)}
    trained = torch.nn.ModuleDict({"policy": policy})
    if not critic_free:
        trained["value"] = value_head or critic
    params = list(trained.parameters())
    dm: distributed.DistributedModel | None = None
    if ps.distributed:  # FSDP2 over dp_shard; rollouts on a gathered replica (see below)
        dm = distributed.DistributedModel(trained, params, ps)
        params = dm.params
    opt = build_optimizer(params, tcfg)
    total_updates = tcfg.max_steps * pcfg.epochs * pcfg.num_minibatches
    sched = build_scheduler(opt, tcfg, total_updates)
    kl_ctl = _kl_controller(cfg)

    prompts, report = load_prompts(
        cfg.data.train_path,
        adapter=cfg.data.adapter,
        template=cfg.data.template,
        on_error=cfg.data.on_error,
        data_root=cfg.data_root,
    )
    train_prompts = [p.prompt for p in prompts]
    heldout: list[str] = []
    if cfg.data.eval_path:
        ev, _ = load_prompts(
            cfg.data.eval_path,
            adapter=cfg.data.adapter,
            template=cfg.data.template,
            on_error=cfg.data.on_error,
            data_root=cfg.data_root,
        )
        heldout = [p.prompt for p in ev][: cfg.gold_eval_prompts]
    log.info(
        "PPO: %d train prompts, %d held-out; %s", len(train_prompts), len(heldout), report.summary()
    )

    gen_rng = torch.Generator().manual_seed(cfg.seed + rank)  # each rank samples its own rows
    order_rng = np.random.default_rng(cfg.seed)
    order = order_rng.permutation(len(train_prompts)).tolist()
    cursor = 0
    start_step = 0

    # ---- checkpoints (distributed.save_checkpoint: torch.distributed.checkpoint + extra.pt) and resume
    ckpt = distributed.latest_checkpoint(run.run_dir)
    if ckpt is not None:
        state = distributed.load_checkpoint(ckpt, trained, opt)
        if state["rank_extra"] is None:
            raise ValueError(
                f"{ckpt}: no sampling state for rank {ps.rank} (written by fewer processes?)"
            )
        sched.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        set_rng_state(state["rng"])
        gen_rng.set_state(state["rank_extra"]["gen_rng"])
        order_rng.bit_generator.state = state["order_rng"]
        order, cursor, start_step = state["order"], state["cursor"], state["step"]
        run.logger.truncate_after(start_step)
        log.info("resumed from %s at step %d", ckpt, start_step)

    def save_checkpoint(step: int) -> None:
        extra = {
            "scheduler": sched.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "rng": rng_state(),
            "order_rng": order_rng.bit_generator.state,
            "order": order,
            "cursor": cursor,
            "step": step,
        }
        distributed.save_checkpoint(
            distributed.checkpoint_path(run.run_dir, step),
            trained,
            opt,
            extra,
            rank_extra={"gen_rng": gen_rng.get_state()},
        )

    # Rollouts (generation and the no-grad scoring passes) run on ``rollout``: the trained
    # modules themselves in one process; under FSDP2 a full replica on each rank, refreshed
    # after every update, so that each rank decodes its own rows without collectives.
    rollout = dm.replica() if dm is not None else trained
    r_policy = rollout["policy"]
    r_value = rollout["value"] if "value" in rollout else None

    def train_forward(ids_, mask_, start: int, entropy: bool, ref_lsm_BRV=None):
        o = response_logprobs(
            policy,
            ids_,
            mask_,
            start,
            T,
            value_head=value_head,
            return_entropy=entropy,
            ref_logprobs_BRV=ref_lsm_BRV,
        )
        if critic_free:
            return o, None
        v = o["values"] if critic is None else _values(critic, ids_, mask_, start)
        return o, v

    B = tcfg.batch_size  # global responses; this rank rolls out and trains on Bl = B / dp of them
    Bl = B // dp
    NP = B // G  # prompts per step (G responses each)
    mb_size = Bl // pcfg.num_minibatches
    micro = max(1, min(tcfg.micro_batch_size, mb_size))
    T = cfg.rollout.temperature

    # old log-probs (and the shared value head's values) come with the rollout (the KV-cache
    # pass computes the same log softmax(logits / T) as the training pass, up to float
    # rounding) instead of a second forward over the whole batch
    from_rollout = (
        pcfg.logprobs_from_rollout
        and cfg.rollout.backend == "native"
        and supports_fast_decode(r_policy)
    )
    vllm_engine = None
    if cfg.rollout.backend == "vllm":
        from rlhfstack.rollout.vllm_backend import VLLMRollout

        vllm_engine = VLLMRollout(cfg.model.path, dtype="bfloat16", seed=cfg.seed)

    with preemption_flag() as preempt:
        for step in range(start_step + 1, tcfg.max_steps + 1):
            # ---------------------------------------------------------------- 1. rollout
            if cursor + NP > len(order):
                order = order_rng.permutation(len(train_prompts)).tolist()
                cursor = 0
            # each prompt G times in a row (its group); a rank's rows hold whole groups
            batch_prompts = [
                train_prompts[i] for i in order[cursor : cursor + NP] for _ in range(G)
            ]
            cursor += NP
            batch_prompts = batch_prompts[rank * Bl : (rank + 1) * Bl]  # this rank's rows
            p_ids, p_mask = left_pad_prompts(tok, batch_prompts, cfg.data.max_prompt_tokens, device)
            r_policy.eval()
            if vllm_engine is not None:  # GPU-only path (not exercised in CI)
                vllm_engine.sync_weights(policy)
                gen = vllm_engine.generate(
                    p_ids,
                    p_mask,
                    max_new_tokens=cfg.rollout.max_new_tokens,
                    eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id,
                    temperature=T,
                    seed=cfg.seed + step,
                )
            else:
                gen = generate(
                    r_policy,
                    p_ids,
                    p_mask,
                    max_new_tokens=cfg.rollout.max_new_tokens,
                    eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id,
                    temperature=T,
                    generator=gen_rng,
                    return_logprobs=from_rollout,
                    return_hidden=from_rollout and value_head is not None,
                    compile_steps=cfg.rollout.compile,
                    packed_weights=cfg.rollout.packed_weights,
                    prompt_group_size=G,
                )
            ids, mask = gen.full()
            P = p_ids.shape[1]
            resp_mask = gen.response_mask_BR.float()
            run.cost.add_tokens(int(distributed.sum_stats({"n": float(mask.sum())})["n"]))
            # ---------------------------------------------------------------- 2. score
            with torch.no_grad():
                shared = value_head is not None
                old_values = None  # critic-free estimators
                if gen.logprobs_BR is not None:  # old log-probs (and values) from the rollout
                    old_logprobs = gen.logprobs_BR
                    if shared:
                        old_values = r_value(gen.hidden_BRD).squeeze(-1).float()
                    elif critic is not None:
                        old_values = _values(r_value, ids, mask, P)
                else:  # a separate scoring pass (vLLM rollouts, non-HF models)
                    out = response_logprobs(
                        r_policy, ids, mask, P, T, value_head=r_value if shared else None
                    )
                    old_logprobs = out["logprobs"]
                    if shared:
                        old_values = out["values"]
                    elif critic is not None:
                        old_values = _values(r_value, ids, mask, P)
                full_ref = pcfg.kl_loss_coef > 0  # the reference's whole distribution, too
                if use_lora:
                    with adapter_disabled(r_policy):
                        ref_out = response_logprobs(
                            r_policy, ids, mask, P, T, return_log_softmax=full_ref
                        )
                else:
                    ref_out = response_logprobs(ref, ids, mask, P, T, return_log_softmax=full_ref)
                ref_logprobs = ref_out["logprobs"]
                ref_logsoftmax_BRV = ref_out.get("log_softmax")
                rm_out = rm.score(ids, mask)
                raw_scores = rm_out["mean"]
                scores = raw_scores.clone()
                if pcfg.reward_uncertainty_coef:  # mean - coef * std over heads / members
                    scores = scores - pcfg.reward_uncertainty_coef * rm_out["std"]
                if pcfg.missing_eos_penalty:
                    scores = scores - pcfg.missing_eos_penalty * (~gen.ended_B).float()
                if pcfg.reward_clip:
                    scores = scores.clamp(-pcfg.reward_clip, pcfg.reward_clip)
                if pcfg.whiten_rewards:  # over the global batch (all ranks)
                    scores = _global_whiten(scores, torch.ones_like(scores))
                # ------------------------------------------------------------ 3-4. shape, GAE
                beta = kl_ctl.value
                rewards, kl_BT = kl_shaped_rewards(
                    scores, old_logprobs, ref_logprobs, resp_mask, beta, estimator=cfg.kl.estimator
                )
                if critic_free:
                    # one advantage per response from its group: r = score - beta * sum_t KL_t
                    seq_reward_B = (rewards * resp_mask).sum(-1)
                    adv_B = (
                        group_normalized_advantages(seq_reward_B, G)
                        if estimator == "grpo"
                        else leave_one_out_advantages(seq_reward_B, G)
                    )
                    advantages, returns = adv_B.unsqueeze(1) * resp_mask, None
                else:
                    advantages, returns = gae(rewards, old_values, resp_mask, pcfg.gamma, pcfg.lam)
                if pcfg.whiten_advantages and estimator != "grpo":
                    advantages = (
                        _global_whiten(advantages, resp_mask)
                        if dm is not None
                        else masked_whiten(advantages, resp_mask)
                    )
            seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * resp_mask).sum(-1)
            # ---------------------------------------------------------------- 5. update
            release_free_heap()  # the rollout's freed tensors: no resident holes (runtime.py)
            policy.train()
            stats: dict[str, list[float]] = {}
            first: dict[str, float] = {}
            n_tokens_total = distributed.sum_stats({"n": float(resp_mask.sum())})["n"]
            for epoch in range(pcfg.epochs):
                perm = torch.randperm(Bl, generator=gen_rng)
                for mb in range(pcfg.num_minibatches):
                    idx = perm[mb * mb_size : (mb + 1) * mb_size]
                    # losses are normalized by the minibatch's token count over all ranks, and
                    # FSDP2 sums gradients: the update is the one-process update of the global
                    # minibatch
                    mb_tokens = (
                        distributed.sum_stats({"n": float(resp_mask[idx].sum())})["n"] or 1.0
                    )
                    opt.zero_grad(set_to_none=True)
                    for j in range(0, mb_size, micro):
                        sub = idx[j : j + micro]
                        want_entropy = pcfg.entropy_coef > 0 or (epoch == 0 and mb == 0)
                        ref_lsm = None if ref_logsoftmax_BRV is None else ref_logsoftmax_BRV[sub]
                        args = (ids[sub], mask[sub], P, want_entropy, ref_lsm)
                        o, v = dm.call(train_forward, *args) if dm else train_forward(*args)
                        m = resp_mask[sub]
                        pg_loss, pg_stats = ppo_policy_loss(
                            o["logprobs"],
                            old_logprobs[sub],
                            advantages[sub],
                            m,
                            pcfg.clip_eps,
                            normalizer=mb_tokens,
                        )
                        loss = pg_loss
                        if v is not None:
                            vf_loss, vf_stats = ppo_value_loss(
                                v,
                                old_values[sub],
                                returns[sub],
                                m,
                                pcfg.value_clip,
                                normalizer=mb_tokens,
                            )
                            loss = loss + pcfg.vf_coef * vf_loss
                        else:
                            vf_loss, vf_stats = None, {}
                        if pcfg.entropy_coef > 0:
                            loss = loss - pcfg.entropy_coef * (o["entropy"] * m).sum() / mb_tokens
                        if pcfg.kl_loss_coef > 0:  # exact KL to the reference, every token
                            kl_term = (o["kl_full"] * m).sum() / mb_tokens
                            loss = loss + pcfg.kl_loss_coef * kl_term
                            stats.setdefault("kl/full_in_loss", []).append(
                                float(kl_term.detach()) / (float(m.sum()) / mb_tokens or 1.0)
                            )
                        loss.backward()
                        w = float(m.sum()) / mb_tokens
                        for k, val in {
                            "loss/policy": float(pg_loss.detach()) / w if w else 0.0,
                            **(
                                {"loss/value": float(vf_loss.detach()) / w if w else 0.0}
                                if vf_loss is not None
                                else {}
                            ),
                            **{f"ppo/{k2}": float(v2) for k2, v2 in pg_stats.items()},
                            **{f"ppo/{k2}": float(v2) for k2, v2 in vf_stats.items()},
                        }.items():
                            stats.setdefault(k, []).append(val)
                        if epoch == 0 and mb == 0 and j == 0:
                            first["first_minibatch_ratio"] = float(pg_stats["ratio_mean"])
                            first["first_minibatch_approx_kl"] = float(pg_stats["approx_kl"])
                            first["entropy"] = float(masked_mean(o["entropy"].detach(), m))
                    gnorm = (
                        dm.clip_grad(tcfg.grad_clip) if dm else clip_grad(params, tcfg.grad_clip)
                    )
                    stats.setdefault("grad_norm", []).append(gnorm)
                    opt.step()
                    sched.step()
            if dm is not None:
                dm.sync_replica(rollout)  # the next rollout samples from the updated policy
            # ---------------------------------------------------------------- 6. KL controller
            mean_kl = distributed.sum_stats({"kl": float(seq_kl.sum())})["kl"] / B
            kl_ctl.update(mean_kl, B)
            lengths = resp_mask.sum(-1)
            if critic_free:  # no value model: no value loss and no value diagnostics
                value_metrics = {
                    "advantages/abs_mean": float(masked_mean(advantages.abs(), resp_mask))
                }
            else:
                value_metrics = {
                    "returns/mean": float(masked_mean(returns, resp_mask)),
                    "values/mean": float(masked_mean(old_values, resp_mask)),
                    "values/explained_variance": float(
                        explained_variance(old_values, returns, resp_mask)
                    ),
                }
            vf_mean = float(np.mean(stats["loss/value"])) if "loss/value" in stats else 0.0
            metrics = {
                "loss": float(np.mean(stats["loss/policy"])) + pcfg.vf_coef * vf_mean,
                **{k: float(np.mean(v)) for k, v in stats.items()},
                **first,
                "reward/rm_score": float(raw_scores.mean()),
                "reward/rm_score_std": float(rm_out["std"].mean()),
                "reward/shaped_score": float(scores.mean()),
                "reward/total": float((rewards * resp_mask).sum(-1).mean()),
                "kl/seq_k1": mean_kl,
                "kl/token_estimator_mean": float(masked_mean(kl_BT, resp_mask)),
                "kl/beta": beta,
                **value_metrics,
                "response/length": float(lengths.mean()),
                "response/ended_frac": float(gen.ended_B.float().mean()),
                "lr": sched.get_last_lr()[0],
            }
            if dm is not None:  # per-rank means -> means over ranks (equal rows per rank)
                metrics = {k: v / dp for k, v in distributed.sum_stats(metrics).items()}
                metrics["kl/seq_k1"] = mean_kl
            metrics["tokens"] = n_tokens_total
            gold_now = bool(gold_scorer is not None and heldout and cfg.gold_eval_every) and (
                step % cfg.gold_eval_every == 0 or step == tcfg.max_steps or step == 1
            )
            if gold_now and ps.is_main:  # on the (replica of the) updated policy, rank 0 only
                metrics.update(_gold_eval(r_policy, tok, heldout, gold_scorer, rm, cfg, device))
            if step % tcfg.log_every == 0 or step == tcfg.max_steps or gold_now:
                run.logger.log(step, metrics)
            log.info(
                "step %d score %.3f kl %.3f beta %.4f len %.1f pg %.4f vf %.4f ratio0 %.6f",
                step,
                metrics["reward/rm_score"],
                mean_kl,
                beta,
                metrics["response/length"],
                metrics["loss/policy"],
                vf_mean,
                first.get("first_minibatch_ratio", float("nan")),
            )
            if step < tcfg.max_steps and distributed.any_rank(preempt["flag"]):
                save_checkpoint(step)
                log.warning("preempted: checkpoint at step %d saved; exiting for requeue", step)
                run.logger.close()
                raise Preempted(step)
            if tcfg.save_every and step % tcfg.save_every == 0 and step < tcfg.max_steps:
                save_checkpoint(step)

    # ---- final artifacts
    if dm is not None:  # rank 0 gets the full, plain modules back; the other ranks exit here
        dm.finalize()
        policy, value_head, critic = trained["policy"], None, None
        if "value" in trained and pcfg.value_model == "shared":
            value_head = trained["value"]
        elif "value" in trained:
            critic = trained["value"]
    policy.eval()
    save_hf(policy, tok, run.run_dir / "model")
    head = value_head if value_head is not None else critic
    if head is not None:  # gae only
        torch.save(head.state_dict(), run.run_dir / "value_head.pt")
    run.logger.close()
    if cfg.logging.plots:
        plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "plots")
    cost = run.cost.summary()
    write_stage_done(run.run_dir, {"stage": "ppo", "steps": tcfg.max_steps, "cost": cost})
    atomic_write_json(run.run_dir / "kl_controller.json", kl_ctl.state_dict())
    return run.run_dir


def _gold_eval(policy, tok, prompts, gold_scorer, rm, cfg: PPOConfig, device) -> dict[str, float]:
    """Greedy-free evaluation: sample held-out completions, score with gold and the proxy RM."""
    texts, ended, _ = sample_texts(
        policy,
        tok,
        prompts,
        max_new_tokens=cfg.rollout.max_new_tokens,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        temperature=cfg.rollout.temperature,
        seed=cfg.seed + 12345,
        device=device,
    )
    gold = np.asarray(gold_scorer(prompts, texts), dtype=float)
    proxy = score_texts(rm, tok, prompts, texts, device=device).numpy()
    return {"eval/gold_reward": float(gold.mean()), "eval/proxy_reward": float(proxy.mean())}
