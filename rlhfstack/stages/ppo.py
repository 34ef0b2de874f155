"""PPO against a frozen reward model with a per-token KL penalty to a frozen reference.

One iteration (Ziegler et al. 2019; Ouyang et al. 2022; the details of Huang et al. 2024):

1. rollout   sample responses for ``trainer.batch_size`` prompts with the current policy
2. score     old log-probs and values (policy, no grad; taken from the rollout's own forward
             passes by default), reference log-probs, the reward's score of the truncated
             response (:mod:`rlhfstack.rewards`); a fixed penalty when no EOS was emitted
3. shape     r_t = -beta * KL_t on every response token, + score on the last one
4. GAE       advantages and returns (gamma, lambda); returns = A + V before whitening A
5. update    ``ppo.epochs`` passes of ``ppo.num_minibatches`` minibatches: clipped policy loss +
             vf_coef * clipped value loss - entropy_coef * entropy
6. KL        the adaptive controller moves beta toward the target KL

Steps 1-4 are :meth:`PPOTrainer.make_experience` (an :class:`~rlhfstack.rollout.experience.
Experience`), step 5 :meth:`PPOTrainer.ppo_update`; :func:`train` orders them.

Critic-free variants (``ppo.advantage_estimator``): ``grpo`` (Shao et al. 2024) and ``rloo``
(Ahmadian et al. 2024) sample ``rollout.samples_per_prompt`` = G responses per prompt, train no
value model, and replace step 4 by one advantage per response from its group: the sequence reward
(score - beta * summed KL) normalized within the group (grpo) or minus the mean of the other G-1
(rloo), on every token of the response (:data:`rlhfstack.losses.ADVANTAGE_ESTIMATORS`). Steps
1-3, 5 (without the value loss) and 6 are PPO's.

The reward model reads the policy's token ids when it shares the policy's tokenizer, else the
decoded text re-tokenized with its own (``reward_input``; :class:`rlhfstack.rewards.
RewardModelReward`). The value model (:mod:`rlhfstack.models.value`) is a head on the policy
trunk (``shared``), a critic initialized from the reward model (``separate``), or none.

Diagnostics are logged beside the loss every iteration; ``first_minibatch_ratio`` and
``first_minibatch_approx_kl`` must read 1 and 0 (the rollout and training passes agree). When the
trainer recomputes the old log-probs (``ppo.logprobs_from_rollout=false``, or vLLM rollouts), the
rollout engine's own log-probs are kept too and ``mismatch/*`` measures the per-token gap between
the two; ``ppo.rollout_is=token_tis`` corrects for it with truncated importance weights on the
policy loss (:mod:`rlhfstack.losses.mismatch`).

Under ``torchrun`` with ``parallel.dp_shard=N`` (FSDP2 data parallel): every rank draws the same
global batch of prompts and keeps its ``B / N`` rows; it generates and scores them on a full
replica of the policy (``DistributedModel.replica``, refreshed after every update, so that ranks
decode without collectives), trains them under FSDP2 with losses divided by the minibatch's token
count over all ranks (FSDP2 sums the gradients), and whitens advantages, updates the KL
controller and averages diagnostics over all ranks.

With ``parallel.tp=N`` (DTensor tensor parallel) the policy and critic train sharded and the
frozen reference and reward model score sharded over the tensor-parallel group; with
``parallel.pp=N`` the policy's layers are split over pipeline stages for the training passes
(the critic, value and LM heads run on the last stage) and the reference and reward model stay
whole on every rank. In both, rollouts decode on the gathered replica
(``rollout.tp_decode=replica``; under ``tp`` alone, ``sharded`` decodes with the
tensor-parallel modules themselves, in step on every rank of the group, and a scoring pass
computes the old log-probs), the ranks of one data-parallel rank hold the same rows (the first
one's rollout is broadcast to the others), and every sum over rows (token counts, whitening,
KL, metrics) runs over the data-parallel group only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfstack import distributed
from rlhfstack.configs import PPOConfig, validate
from rlhfstack.data.collate import count_long_prompts
from rlhfstack.data.loading import load_prompts
from rlhfstack.evaluation.jobs.plots import ppo_dashboard_panels
from rlhfstack.losses import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_FREE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    kl_estimate,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    mismatch_metrics,
    mismatch_sums,
    ppo_policy_loss,
    ppo_value_loss,
    truncated_is_weights,
)
from rlhfstack.models.core import (
    adapter_disabled,
    causal_lm_parts,
    load_causal_lm,
    response_logprobs,
    tokenizer_for,
)
from rlhfstack.models.value import VALUE_FILE, build_value_model, save_value_model
from rlhfstack.progress import Progress
from rlhfstack.rewards import (
    FunctionReward,
    Reward,
    load_reward,
    reward_members,
    score_samples,
    tokenizer_label,
)
from rlhfstack.rollout.experience import Experience
from rlhfstack.rollout.fast import supports_fast_decode
from rlhfstack.rollout.generate import (
    Generation,
    decode_responses,
    generate,
    left_pad_prompts,
    sample_tokens,
)
from rlhfstack.rollout.vllm_backend import VLLMRollout
from rlhfstack.runtime import atomic_write_json, release_free_heap
from rlhfstack.training import (
    Checkpointer,
    FiniteGuard,
    Run,
    build_optimizer,
    build_scheduler,
    clip_grad,
    finish_stage,
    load_policy,
    load_train_eval,
    refresh_dashboard,
    setup_run,
)

log = logging.getLogger("rlhfstack.ppo")


def _kl_controller(cfg: PPOConfig):
    if cfg.kl.controller == "adaptive":
        return AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
    if cfg.kl.controller == "fixed":
        return FixedKLController(cfg.kl.init_coef)
    raise ValueError(f"kl.controller: unknown controller {cfg.kl.controller!r} (adaptive | fixed)")


def _validate(cfg: PPOConfig) -> None:
    """Checks across fields (each field's own range is checked with the config schema)."""
    if cfg.trainer.batch_size % cfg.ppo.num_minibatches:
        raise ValueError(
            f"trainer.batch_size ({cfg.trainer.batch_size}) must be divisible by ppo.num_minibatches "
            f"({cfg.ppo.num_minibatches})"
        )
    est, G = cfg.ppo.advantage_estimator, cfg.rollout.samples_per_prompt
    if cfg.trainer.batch_size % G:
        raise ValueError(
            f"rollout.samples_per_prompt ({G}) must divide trainer.batch_size "
            f"({cfg.trainer.batch_size}), which counts responses"
        )
    if est != "gae" and G < 2:
        raise ValueError(
            f"ppo.advantage_estimator={est} compares the samples of a prompt: "
            f"rollout.samples_per_prompt must be >= 2 (got {G})"
        )
    if (
        cfg.ppo.rollout_is != "none"
        and cfg.ppo.logprobs_from_rollout
        and cfg.rollout.backend == "native"
    ):
        raise ValueError(
            f"ppo.rollout_is={cfg.ppo.rollout_is} weighs each token by pi_old / mu_rollout, with "
            "pi_old the trainer's own log-probs: set ppo.logprobs_from_rollout=false (with it "
            "true the old log-probs are the rollout engine's and there is nothing to correct)"
        )


def _validate_distributed(cfg: PPOConfig, dp: int, tp: int, pp: int) -> None:
    if tp > 1 and cfg.rollout.tp_decode == "sharded":
        if dp > 1:
            raise NotImplementedError(
                f"rollout.tp_decode=sharded with parallel.dp_shard={dp}: FSDP2 gathers the "
                "weights of each layer at every forward, so the data-parallel ranks, which "
                "decode different prompts to different lengths, would have to decode in step; "
                "use rollout.tp_decode=replica (or parallel.dp_shard=1)"
            )
        if pp > 1:
            raise NotImplementedError(
                f"rollout.tp_decode=sharded with parallel.pp={pp}: the sharded decode runs the "
                "whole policy on each tensor-parallel group, and pipeline stages hold parts of "
                "it; use rollout.tp_decode=replica (or parallel.pp=1)"
            )
        if cfg.ppo.rollout_is != "none":
            raise ValueError(
                f"ppo.rollout_is={cfg.ppo.rollout_is} with rollout.tp_decode=sharded: the "
                "rollout samples from the trained modules themselves, so there is no engine gap "
                "to correct; set ppo.rollout_is=none"
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


def _global_whiten(
    x: torch.Tensor, m: torch.Tensor, group: Any = None, eps: float = 1e-8
) -> torch.Tensor:
    """``masked_whiten`` with the mean and unbiased variance of the valid entries of *all*
    data-parallel ranks (one all-reduce of three sums over ``group``, the data-parallel group:
    tensor-parallel ranks hold the same rows and must not count them twice)."""
    t = distributed.sum_stats(
        {"n": float(m.sum()), "s": float((x * m).sum()), "s2": float((x * x * m).sum())}, group
    )
    mean = t["s"] / t["n"]
    var = (t["s2"] - t["n"] * mean * mean) / max(t["n"] - 1.0, 1.0)  # unbiased, as masked_var
    return torch.where(m.bool(), (x - mean) / (var + eps) ** 0.5, torch.zeros_like(x))


class PromptStream:
    """The training prompts in shuffled passes: each step takes ``n_prompts`` of them, each
    repeated ``group_size`` times in a row (a prompt's group); a new permutation when a pass
    runs out. Its state (generator, order, cursor) goes into checkpoints."""

    def __init__(self, prompts: list[str], seed: int, n_prompts: int, group_size: int) -> None:
        self.prompts, self.n_prompts, self.group_size = prompts, n_prompts, group_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(prompts)).tolist()
        self.cursor = 0

    def next(self) -> list[str]:
        """The next step's ``n_prompts * group_size`` prompts (global: every rank draws all)."""
        if self.cursor + self.n_prompts > len(self.order):
            self.order = self.rng.permutation(len(self.prompts)).tolist()
            self.cursor = 0
        i = self.order[self.cursor : self.cursor + self.n_prompts]
        self.cursor += self.n_prompts
        return [self.prompts[j] for j in i for _ in range(self.group_size)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "order_rng": self.rng.bit_generator.state,
            "order": self.order,
            "cursor": self.cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["order_rng"]
        self.order, self.cursor = state["order"], state["cursor"]


class PPOTrainer:
    """The models, optimizer and samplers of one PPO run, and its two phases.

    ``trained`` (a ``ModuleDict``: ``policy`` and, for gae, ``value``) is what the optimizer
    updates and checkpoints hold; under FSDP2 it is sharded in place (``dm``) and ``rollout`` is a
    full replica of it that generation and the no-grad scoring passes run on (in one process,
    and with ``rollout.tp_decode=sharded``, ``rollout`` is ``trained`` itself).
    """

    def __init__(self, cfg: PPOConfig, run: Run) -> None:
        self.cfg, self.run, self.device = cfg, run, run.device
        pcfg, tcfg = cfg.ppo, cfg.trainer
        self.critic_free = pcfg.advantage_estimator in CRITIC_FREE_ESTIMATORS
        self.G = cfg.rollout.samples_per_prompt
        self.dp, self.rank = run.dist.dp, run.dist.dp_rank
        # run_dir/dashboard.png: the KL panel shows the adaptive controller's target
        adaptive = cfg.kl.controller == "adaptive"
        self.dashboard = ppo_dashboard_panels(cfg.kl.target if adaptive else None)
        # sums over rows (token counts, whitening, KL, metrics) run over the data-parallel group:
        # the tensor-parallel ranks of one data-parallel rank hold the same rows
        self.dp_group = run.dist.group("dp_shard")
        self.pipelined = run.dist.distributed and run.dist.pp > 1
        # rollout.tp_decode=sharded: decode with the tensor-parallel modules (no replica)
        self.sharded_decode = (
            run.dist.distributed and run.dist.tp > 1 and cfg.rollout.tp_decode == "sharded"
        )
        self.B = tcfg.batch_size  # global responses; this rank rolls out Bl = B / dp of them
        self.Bl = self.B // self.dp
        self.mb_size = self.Bl // pcfg.num_minibatches
        self.micro = max(1, min(tcfg.micro_batch_size, self.mb_size))
        self.T = cfg.rollout.temperature
        self.tok = tokenizer_for(cfg.model)
        self.policy = load_policy(cfg, run)
        self.use_lora = bool(cfg.model.lora.enabled)
        self.ref = None  # with LoRA the reference is the policy with its adapter switched off
        if not self.use_lora:
            self.ref = load_causal_lm(
                cfg.ref_path or cfg.model.path,
                dtype=cfg.model.dtype,
                trainable=False,
                device=self.device,
            )
        self.reward = load_reward(
            cfg.reward_model_path,
            self.tok,
            input_path=cfg.reward_input,
            dtype=cfg.model.dtype,
            device=self.device,
        )
        log.info(
            "reward model %s: %s path (policy tokenizer %s, reward tokenizer %s)",
            cfg.reward_model_path,
            "token-id" if self.reward.uses_policy_ids else "text",
            tokenizer_label(self.tok),
            tokenizer_label(self.reward.tokenizer),
        )
        rm_template = getattr(self.reward.rm, "template", None)
        if rm_template and rm_template != cfg.data.template:  # prompts arrive rendered as text
            log.warning(
                "the reward model was trained on template %r, the prompts are rendered with "
                "data.template=%r: it scores them as rendered",
                rm_template,
                cfg.data.template,
            )
        if pcfg.reward_uncertainty_coef > 0 and not self.reward.has_spread:
            raise ValueError(
                f"ppo.reward_uncertainty_coef={pcfg.reward_uncertainty_coef} penalizes the std "
                f"over reward heads, but {cfg.reward_model_path} has {self.reward.num_heads}: "
                "train it with rm.ensemble_size >= 2 or point reward_model_path at an ensemble "
                "directory"
            )
        self.trained = torch.nn.ModuleDict({"policy": self.policy})
        self.value = None  # the trained value model (gae only): SharedValueHead | Critic
        if not self.critic_free:
            if pcfg.value_model == "separate" and not self.reward.uses_policy_ids:
                raise ValueError(
                    "ppo.value_model=separate runs a copy of the reward model's trunk on the "
                    f"policy's token ids, but the reward model ({cfg.reward_model_path}) reads "
                    "another tokenizer or input layout: use ppo.value_model=shared"
                )
            self.value = build_value_model(
                pcfg.value_model,
                policy_hidden_size=causal_lm_parts(self.policy)[0].config.hidden_size,
                reward_model=reward_members(self.reward.rm)[0],
            ).to(self.device)
            self.trained["value"] = self.value
        self.params = list(self.trained.parameters())
        self.dm: distributed.DistributedModel | None = None
        if run.dist.distributed:  # FSDP2 / TP; rollouts on a gathered replica
            self.dm = distributed.DistributedModel(
                self.trained, self.params, run.dist, pp_tied_grads=cfg.parallel.pp_tied_grads
            )
            self.params = self.dm.params
        if run.dist.distributed and run.dist.tp > 1:
            self._shard_frozen_models(run.dist)
        self.opt = build_optimizer(self.params, tcfg)
        total_updates = tcfg.max_steps * pcfg.epochs * pcfg.num_minibatches
        self.sched = build_scheduler(self.opt, tcfg, total_updates)
        self.kl_ctl = _kl_controller(cfg)
        self.guard = FiniteGuard(run)  # non-finite values stop the run before the update
        self.kl_high_iters = 0  # consecutive iterations above kl.stop_multiple x kl.target
        self.gen_rng = torch.Generator().manual_seed(cfg.seed + self.rank)  # per-rank sampling

    def _shard_frozen_models(self, state: distributed.ParallelState) -> None:
        """Tensor parallelism for the frozen reference and reward model (Llama-family trunks;
        another reward model, such as an encoder, stays whole on every rank). They score the
        rollout, which every rank of a tensor-parallel group holds identically, together."""
        tp_mesh = state.mesh["tp"]
        if self.ref is not None:
            distributed.apply_tp(self.ref, tp_mesh)
        for member in reward_members(self.reward.rm):
            if member.kind == "causal_lm":
                distributed.apply_tp(member, tp_mesh)
            else:
                log.info("parallel.tp: the %s reward model stays whole on every rank", member.kind)

    def start_rollouts(self) -> None:
        """Build the rollout side (after a resume: the replica copies the restored weights)."""
        cfg = self.cfg
        replica = self.dm is not None and not self.sharded_decode
        self.rollout = self.dm.replica() if replica else self.trained
        if self.sharded_decode:
            log.info(
                "rollout.tp_decode=sharded: rollouts decode with the tensor-parallel modules "
                "(plain KV-cache loop); a scoring pass computes the old log-probs"
            )
        self.r_policy = self.rollout["policy"]
        self.r_value = self.rollout["value"] if "value" in self.rollout else None
        # old log-probs (and the shared value head's values) come with the rollout (the KV-cache
        # pass computes the same log softmax(logits / T) as the training pass, up to float
        # rounding) instead of a second forward over the whole batch
        self.from_rollout = (
            cfg.ppo.logprobs_from_rollout
            and cfg.rollout.backend == "native"
            and supports_fast_decode(self.r_policy)
        )
        # the engine's own log-probs of what it sampled (free with the native fast loop; vLLM
        # returns them): the old log-probs above, or, when the trainer recomputes those, the
        # other side of the mismatch/* gap
        self.engine_logprobs = cfg.rollout.backend == "vllm" or supports_fast_decode(self.r_policy)
        if cfg.ppo.rollout_is != "none" and not self.engine_logprobs:
            raise ValueError(
                f"ppo.rollout_is={cfg.ppo.rollout_is} needs the rollout engine's log-probs, which "
                "the native engine returns for HF causal LMs only"
            )
        self.vllm_engine = None
        if cfg.rollout.backend == "vllm":
            self.vllm_engine = VLLMRollout(cfg.model.path, dtype="bfloat16", seed=cfg.seed)
            if (
                not self.vllm_engine.processed_logprobs
                and cfg.ppo.rollout_is != "none"
                and self.T != 1.0
            ):
                raise ValueError(
                    f"ppo.rollout_is={cfg.ppo.rollout_is} with rollout.temperature={self.T}: this "
                    "vLLM returns log-probs at temperature 1 (no logprobs_mode), so the importance "
                    "weights would be wrong; use temperature 1 or a vLLM with logprobs_mode"
                )

    # ------------------------------------------------------------------ checkpoint state

    def checkpoint_state(self, stream: PromptStream) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(extra, rank_extra)`` for :meth:`Checkpointer.save`; ``extra`` records the layout
        (the sampling generators are per data-parallel rank)."""
        st = self.run.dist
        extra = {
            "kl_controller": self.kl_ctl.state_dict(),
            "layout": {"dp_shard": st.dp, "tp": st.tp, "pp": st.pp},
            **stream.state_dict(),
        }
        return extra, {"gen_rng": self.gen_rng.get_state()}

    def load_checkpoint_state(self, extra: dict[str, Any], stream: PromptStream) -> None:
        """The KL controller, prompt stream and this rank's sampling generator of a checkpoint.

        The model and optimizer reshard to any layout (``distributed.load_checkpoint``); the
        sampling generators belong to data-parallel ranks (rank ``d`` draws its rows with
        ``seed + d``), so a checkpoint resumes under any ``parallel.tp`` and ``parallel.pp``
        with the ``parallel.dp_shard`` it was written with, and under no other."""
        st = self.run.dist
        layout = extra.get("layout")
        if layout is not None:
            if int(layout["dp_shard"]) != st.dp:
                raise ValueError(
                    f"{extra['path']}: written with parallel.dp_shard={layout['dp_shard']} "
                    f"(tp={layout['tp']}, pp={layout['pp']}); PPO resumes it with "
                    f"parallel.dp_shard={layout['dp_shard']} and any parallel.tp and parallel.pp "
                    f"(world size {layout['dp_shard']} x tp x pp), not with dp_shard={st.dp}: "
                    "each data-parallel rank's sampling generator is part of the run"
                )
            # tensor-parallel rank 0 / pipeline stage 0 of this data-parallel rank in the writing
            # layout (mesh order pp, dp_shard, tp)
            rank_extra = distributed.read_rank_extra(extra["path"], self.rank * int(layout["tp"]))
        else:
            rank_extra = extra["rank_extra"]
        if rank_extra is None:
            raise ValueError(
                f"{extra['path']}: no sampling state for rank {st.rank} "
                "(written by fewer processes?)"
            )
        self.kl_ctl.load_state_dict(extra["kl_controller"])
        self.gen_rng.set_state(rank_extra["gen_rng"])
        stream.load_state_dict(extra)

    # ------------------------------------------------------------------ steps 1-4

    def _generate(self, prompts: list[str], step: int) -> Generation:
        gen = self._decode(prompts, step)
        st = self.run.dist
        # the tensor-parallel ranks and pipeline stages of a data-parallel rank decode the same
        # prompts from the same generator on the same replica; the first one's rollout and
        # generator state are made everyone's (pipeline stage 0 over each pipeline group, then
        # tensor-parallel rank 0 over each tensor-parallel group), so that the sharded passes
        # and the minibatch order agree even where decoding is not bitwise reproducible
        for dim, size, coord, stride in (
            ("pp", st.pp, st.pp_rank, st.dp * st.tp),
            ("tp", st.tp, st.tp_rank, 1),
        ):
            if st.distributed and size > 1:
                src = st.rank - coord * stride  # global rank of coordinate 0 along ``dim``
                gen, rng = distributed.broadcast_object(
                    (gen, self.gen_rng.get_state()), src=src, group=st.group(dim)
                )
                self.gen_rng.set_state(rng)
        return gen

    def _decode(self, prompts: list[str], step: int) -> Generation:
        cfg, tok = self.cfg, self.tok
        p_ids, p_mask = left_pad_prompts(tok, prompts, cfg.data.max_prompt_tokens, self.device)
        self.r_policy.eval()
        common = dict(
            max_new_tokens=cfg.rollout.max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=self.T,
        )
        if self.vllm_engine is not None:  # GPU-only path (not exercised in CI)
            self.vllm_engine.sync_weights(self.policy)
            return self.vllm_engine.generate(p_ids, p_mask, **common, seed=cfg.seed + step)
        return generate(
            self.r_policy,
            p_ids,
            p_mask,
            **common,
            generator=self.gen_rng,
            return_logprobs=self.engine_logprobs,
            return_hidden=self.from_rollout
            and self.r_value is not None
            and self.r_value.shares_policy_trunk,
            compile_steps=cfg.rollout.compile,
            packed_weights=cfg.rollout.packed_weights,
            prompt_group_size=self.G,
        )

    @torch.no_grad()
    def _policy_passes(self, gen: Generation, ids, mask, P: int):
        """Old log-probs and values (the rollout's, or one scoring pass), reference log-probs."""
        r_value = self.r_value
        shared = r_value is not None and r_value.shares_policy_trunk
        old_values = None  # critic-free estimators
        if self.from_rollout:  # old log-probs (and values) from the rollout
            old_logprobs = gen.logprobs_BR
            if r_value is not None:
                old_values = r_value.values(ids, mask, P, hidden_BRD=gen.hidden_BRD)
        else:  # a scoring pass (vLLM rollouts, non-HF models, ppo.logprobs_from_rollout=false)
            out = response_logprobs(
                self.r_policy, ids, mask, P, self.T, value_head=r_value if shared else None
            )
            old_logprobs = out["logprobs"]
            if shared:
                old_values = out["values"]
            elif r_value is not None:
                old_values = r_value.values(ids, mask, P)
        full_ref = self.cfg.ppo.kl_loss_coef > 0  # the reference's whole distribution, too
        if self.use_lora:
            with adapter_disabled(self.r_policy):
                ref_out = response_logprobs(
                    self.r_policy, ids, mask, P, self.T, return_log_softmax=full_ref
                )
        else:
            ref_out = response_logprobs(self.ref, ids, mask, P, self.T, return_log_softmax=full_ref)
        return old_logprobs, old_values, ref_out["logprobs"], ref_out.get("log_softmax")

    def make_experience(self, prompts: list[str], step: int) -> Experience:
        """Steps 1-4 for this rank's ``prompts``: rollout, policy / reference / value passes,
        reward and its shaping, KL-shaped token rewards, advantages."""
        pcfg = self.cfg.ppo
        gen = self._generate(prompts, step)
        ids, mask = gen.full()
        P = gen.prompt_ids_BP.shape[1]
        resp_mask = gen.response_mask_BR.float()
        n_tokens = distributed.sum_stats({"n": float(mask.sum())}, self.dp_group)["n"]
        self.run.cost.add_tokens(int(n_tokens))
        completions = decode_responses(self.tok, gen)
        old_logprobs, old_values, ref_logprobs, ref_lsm = self._policy_passes(gen, ids, mask, P)
        with torch.no_grad():
            rm_out = self.reward.score(prompts, completions, ids, mask)
            raw_scores = rm_out.scores_B
            std = rm_out.spread_B if rm_out.spread_B is not None else torch.zeros_like(raw_scores)
            scores = raw_scores.clone()
            if pcfg.reward_uncertainty_coef:  # mean - coef * std over heads / members
                scores = scores - pcfg.reward_uncertainty_coef * std
            if pcfg.missing_eos_penalty:
                scores = scores - pcfg.missing_eos_penalty * (~gen.ended_B).float()
            if pcfg.reward_clip:
                scores = scores.clamp(-pcfg.reward_clip, pcfg.reward_clip)
            if pcfg.whiten_rewards:  # over the global batch (all data-parallel ranks)
                scores = _global_whiten(scores, torch.ones_like(scores), self.dp_group)
            beta = self.kl_ctl.value
            rewards, kl_BT = kl_shaped_rewards(
                scores, old_logprobs, ref_logprobs, resp_mask, beta, estimator=self.cfg.kl.estimator
            )
            advantages, returns = ADVANTAGE_ESTIMATORS[pcfg.advantage_estimator](
                rewards, old_values, resp_mask, group_size=self.G, gamma=pcfg.gamma, lam=pcfg.lam
            )
            if pcfg.whiten_advantages and pcfg.advantage_estimator != "grpo":
                advantages = (
                    _global_whiten(advantages, resp_mask, self.dp_group)
                    if self.dp > 1
                    else masked_whiten(advantages, resp_mask)
                )
        seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * resp_mask).sum(-1)
        # the engine's log-probs beside the trainer's (when the trainer recomputed them)
        rollout_logprobs = None if self.from_rollout else gen.logprobs_BR
        is_weights = None
        if pcfg.rollout_is == "token_tis":
            is_weights = truncated_is_weights(
                old_logprobs,
                rollout_logprobs,
                _known(rollout_logprobs, resp_mask),
                pcfg.rollout_is_cap,
            )
        return Experience(
            prompts=prompts,
            completions=completions,
            ids_BT=ids,
            mask_BT=mask,
            response_start=P,
            response_mask_BR=resp_mask,
            ended_B=gen.ended_B,
            old_logprobs_BR=old_logprobs,
            ref_logprobs_BR=ref_logprobs,
            ref_logsoftmax_BRV=ref_lsm,
            values_BR=old_values,
            raw_scores_B=raw_scores,
            score_std_B=std,
            scores_B=scores,
            kl_coef=beta,
            kl_BR=kl_BT,
            rewards_BR=rewards,
            seq_kl_B=seq_kl,
            advantages_BR=advantages,
            returns_BR=returns,
            rollout_logprobs_BR=rollout_logprobs,
            is_weights_BR=is_weights,
        )

    def check_experience(self, exp: Experience, step: int) -> float:
        """Before the update: stop on a non-finite score, value, reward, advantage or KL (any
        rank), and on a KL that stayed above ``kl.stop_multiple`` x ``kl.target`` for
        ``kl.stop_patience`` iterations (:class:`~rlhfstack.training.RunawayKLError`). Returns
        the global batch's mean summed KL (what the KL controller sees)."""
        m = exp.response_mask_BR
        local = {
            "reward/rm_score": float(exp.raw_scores_B.mean()),
            "reward/shaped_score": float(exp.scores_B.mean()),
            "kl/seq_k1": float(exp.seq_kl_B.mean()),
            "reward/token_mean": float(masked_mean(exp.rewards_BR, m)),
            "advantages/mean": float(masked_mean(exp.advantages_BR, m)),
        }
        if exp.values_BR is not None:
            local["values/mean"] = float(masked_mean(exp.values_BR, m))
            local["returns/mean"] = float(masked_mean(exp.returns_BR, m))
        self.guard.check(step, local, "rollout and scoring")
        mean_kl = distributed.sum_stats({"kl": float(exp.seq_kl_B.sum())}, self.dp_group)["kl"]
        mean_kl /= self.B
        kcfg = self.cfg.kl
        limit = kcfg.stop_multiple * kcfg.target
        if kcfg.stop_multiple > 0 and mean_kl > limit:
            self.kl_high_iters += 1
            log.warning(
                "step %d: mean sequence KL %.3f > kl.stop_multiple x kl.target = %.3f "
                "(%d of kl.stop_patience=%d iterations in a row)",
                step,
                mean_kl,
                limit,
                self.kl_high_iters,
                kcfg.stop_patience,
            )
            if self.kl_high_iters >= kcfg.stop_patience:
                raise self.guard.runaway(
                    step,
                    "kl/seq_k1",
                    f"runaway KL at step {step}: the mean sequence KL to the reference was above "
                    f"kl.stop_multiple x kl.target = {kcfg.stop_multiple:g} x {kcfg.target:g} = "
                    f"{limit:g} nats for {self.kl_high_iters} iterations in a row (now "
                    f"{mean_kl:.4g}, beta {self.kl_ctl.value:.4g}); kl.stop_multiple=0 disables "
                    "this guard",
                )
        else:
            self.kl_high_iters = 0
        return mean_kl

    # ------------------------------------------------------------------ step 5

    def _train_forward(self, ids, mask, start: int, entropy: bool, ref_lsm_BRV=None):
        """The policy pass with grad (log-probs, entropy, exact KL) and the value model's."""
        value = self.value
        shared = value is not None and value.shares_policy_trunk
        o = response_logprobs(
            self.policy,
            ids,
            mask,
            start,
            self.T,
            value_head=value if shared else None,
            return_entropy=entropy,
            ref_logprobs_BRV=ref_lsm_BRV,
        )
        if value is None:
            return o, None
        return o, (o["values"] if shared else value.values(ids, mask, start))

    @staticmethod
    def _rows_of(exp: Experience, sub: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors one update pass reads, for the rows ``sub``."""
        rows = {
            "ids": exp.ids_BT[sub],
            "mask": exp.mask_BT[sub],
            "response_mask": exp.response_mask_BR[sub],
            "old_logprobs": exp.old_logprobs_BR[sub],
            "advantages": exp.advantages_BR[sub],
        }
        if exp.values_BR is not None:
            rows["values"], rows["returns"] = exp.values_BR[sub], exp.returns_BR[sub]
        if exp.ref_logsoftmax_BRV is not None:
            rows["ref_lsm"] = exp.ref_logsoftmax_BRV[sub]
        if exp.is_weights_BR is not None:  # ppo.rollout_is: the truncated importance weights
            rows["is_weights"] = exp.is_weights_BR[sub]
        return rows

    def _micro_loss(self, mb: dict[str, torch.Tensor], start: int, mb_tokens: float, o, v):
        """The loss of one micro-batch from its forward's output ``o`` (and values ``v``), and
        its statistics."""
        pcfg = self.cfg.ppo
        m = mb["response_mask"]
        pg_loss, pg_stats = ppo_policy_loss(
            o["logprobs"],
            mb["old_logprobs"],
            mb["advantages"],
            m,
            pcfg.clip_eps,
            normalizer=mb_tokens,
            is_weights_BT=mb.get("is_weights"),
        )
        loss, vf_loss, vf_stats = pg_loss, None, {}
        if v is not None:
            vf_loss, vf_stats = ppo_value_loss(
                v, mb["values"], mb["returns"], m, pcfg.value_clip, normalizer=mb_tokens
            )
            loss = loss + pcfg.vf_coef * vf_loss
        stats: dict[str, float] = {}
        if pcfg.entropy_coef > 0:
            loss = loss - pcfg.entropy_coef * (o["entropy"] * m).sum() / mb_tokens
        if pcfg.kl_loss_coef > 0:  # exact KL to the reference, every token
            kl_term = (o["kl_full"] * m).sum() / mb_tokens
            loss = loss + pcfg.kl_loss_coef * kl_term
            stats["kl/full_in_loss"] = float(kl_term.detach()) / (float(m.sum()) / mb_tokens or 1.0)
        w = float(m.sum()) / mb_tokens  # this micro-batch's share of the minibatch's tokens
        stats["loss/policy"] = float(pg_loss.detach()) / w if w else 0.0
        if vf_loss is not None:
            stats["loss/value"] = float(vf_loss.detach()) / w if w else 0.0
        stats.update({f"ppo/{k}": float(v2) for k, v2 in pg_stats.items()})
        stats.update({f"ppo/{k}": float(v2) for k, v2 in vf_stats.items()})
        return loss, stats, pg_stats

    def _micro_step(self, exp: Experience, sub, mb_tokens: float, want_entropy: bool):
        """Loss and backward of one micro-batch; returns its statistics and the forward's output."""
        mb = self._rows_of(exp, sub)
        args = (mb["ids"], mb["mask"], exp.response_start, want_entropy, mb.get("ref_lsm"))
        o, v = self.dm.call(self._train_forward, *args) if self.dm else self._train_forward(*args)
        loss, stats, pg_stats = self._micro_loss(mb, exp.response_start, mb_tokens, o, v)
        loss.backward()
        return stats, pg_stats, o, mb["response_mask"]

    def _pipelined_minibatch(
        self, exp: Experience, idx: torch.Tensor, mb_tokens: float, want_entropy: bool, first: bool
    ) -> dict[str, float]:
        """Forward and backward of one minibatch through the pipeline stages (the runner splits
        it into ``trainer.micro_batch_size`` micro-batches); returns the means of the micro-batch
        statistics over the global minibatch (and, for ``first``, the first micro-batch's
        checks), the same on every rank."""
        start, done = exp.response_start, [0]
        n_global = len(idx) * self.dp  # the runner weighs micro-batch stats by rows / n_global

        def loss_fn(mb: dict[str, torch.Tensor], n_in_step: int):
            args = (mb["ids"], mb["mask"], start, want_entropy, mb.get("ref_lsm"))
            o, v = self._train_forward(*args)
            loss, stats, pg_stats = self._micro_loss(mb, start, mb_tokens, o, v)
            if first and done[0] == 0:  # undo that weighting: a mean over data-parallel ranks
                scale = n_in_step / mb["ids"].shape[0] / self.dp
                m = mb["response_mask"]
                stats["first_minibatch_ratio"] = float(pg_stats["ratio_mean"]) * scale
                stats["first_minibatch_approx_kl"] = float(pg_stats["approx_kl"]) * scale
                stats["entropy"] = float(masked_mean(o["entropy"].detach(), m)) * scale
            done[0] += 1
            return loss, stats

        _, stats = self.dm.forward_backward(self._rows_of(exp, idx), loss_fn, n_global, self.micro)
        return stats

    def ppo_update(self, exp: Experience, step: int = 0) -> dict[str, float]:
        """Step 5: ``ppo.epochs`` x ``ppo.num_minibatches`` optimizer steps, each over
        micro-batches; returns the mean of each statistic and the first micro-batch's checks.
        A non-finite loss or gradient norm stops the run before its optimizer step
        (:class:`~rlhfstack.training.NonFiniteError`, iteration ``step``)."""
        pcfg, tcfg, dm = self.cfg.ppo, self.cfg.trainer, self.dm
        release_free_heap()  # the rollout's freed tensors: no resident holes (runtime.py)
        self.policy.train()
        stats: dict[str, list[float]] = {}
        first: dict[str, float] = {}
        mb_size, resp_mask = self.mb_size, exp.response_mask_BR
        for epoch in range(pcfg.epochs):
            perm = torch.randperm(self.Bl, generator=self.gen_rng)
            for mb in range(pcfg.num_minibatches):
                idx = perm[mb * mb_size : (mb + 1) * mb_size]
                # losses are normalized by the minibatch's token count over all ranks, and FSDP2
                # sums gradients: the update is the one-process update of the global minibatch
                mb_tokens = (
                    distributed.sum_stats({"n": float(resp_mask[idx].sum())}, self.dp_group)["n"]
                    or 1.0
                )
                self.opt.zero_grad(set_to_none=True)
                mb_losses: dict[str, float] = {}
                want_entropy = pcfg.entropy_coef > 0 or (epoch == 0 and mb == 0)
                if self.pipelined:  # one entry per minibatch: the mean of its micro-batches
                    st = self._pipelined_minibatch(
                        exp, idx, mb_tokens, want_entropy, epoch == 0 and mb == 0
                    )
                    for k in ("first_minibatch_ratio", "first_minibatch_approx_kl", "entropy"):
                        if k in st:
                            first[k] = st.pop(k)
                    for k, val in st.items():
                        stats.setdefault(k, []).append(val)
                        if k.startswith(("loss/", "kl/")):
                            mb_losses[k] = val
                for j in range(0, mb_size if not self.pipelined else 0, self.micro):
                    sub = idx[j : j + self.micro]
                    st, pg_stats, o, m = self._micro_step(exp, sub, mb_tokens, want_entropy)
                    for k, val in st.items():
                        stats.setdefault(k, []).append(val)
                        if k.startswith(("loss/", "kl/")):
                            mb_losses[k] = mb_losses.get(k, 0.0) + val
                    if epoch == 0 and mb == 0 and j == 0:
                        first["first_minibatch_ratio"] = float(pg_stats["ratio_mean"])
                        first["first_minibatch_approx_kl"] = float(pg_stats["approx_kl"])
                        first["entropy"] = float(masked_mean(o["entropy"].detach(), m))
                gnorm = (
                    dm.clip_grad(tcfg.grad_clip) if dm else clip_grad(self.params, tcfg.grad_clip)
                )
                stats.setdefault("grad_norm", []).append(gnorm)
                self.guard.check(
                    step,
                    {**mb_losses, "grad_norm": gnorm},
                    f"update: epoch {epoch}, minibatch {mb}",
                )
                self.opt.step()
                self.sched.step()
        if dm is not None and not self.sharded_decode:
            dm.sync_replica(self.rollout)  # the next rollout samples from the updated policy
        return {**{k: float(np.mean(v)) for k, v in stats.items()}, **first}

    # ------------------------------------------------------------------ step 6, metrics, end

    def update_kl(self, exp: Experience, mean_kl: float | None = None) -> float:
        """Step 6: the KL controller sees the global batch's mean summed KL (``mean_kl``, from
        :meth:`check_experience`, or computed here); returns that mean."""
        if mean_kl is None:
            mean_kl = distributed.sum_stats({"kl": float(exp.seq_kl_B.sum())}, self.dp_group)["kl"]
            mean_kl /= self.B
        self.kl_ctl.update(mean_kl, self.B)
        return mean_kl

    def metrics(self, exp: Experience, stats: dict[str, float], mean_kl: float) -> dict[str, float]:
        """The logged row of one iteration (means over ranks under FSDP2)."""
        m = exp.response_mask_BR
        if self.critic_free:  # no value model: no value loss and no value diagnostics
            value_metrics = {"advantages/abs_mean": float(masked_mean(exp.advantages_BR.abs(), m))}
        else:
            value_metrics = {
                "returns/mean": float(masked_mean(exp.returns_BR, m)),
                "values/mean": float(masked_mean(exp.values_BR, m)),
                "values/explained_variance": float(
                    explained_variance(exp.values_BR, exp.returns_BR, m)
                ),
            }
        metrics = {
            "loss": stats["loss/policy"] + self.cfg.ppo.vf_coef * stats.get("loss/value", 0.0),
            **stats,  # the update's means, then its first-micro-batch checks
            "reward/rm_score": float(exp.raw_scores_B.mean()),
            "reward/rm_score_std": float(exp.score_std_B.mean()),
            "reward/shaped_score": float(exp.scores_B.mean()),
            "reward/total": float((exp.rewards_BR * m).sum(-1).mean()),
            "kl/seq_k1": mean_kl,
            "kl/token_estimator_mean": float(masked_mean(exp.kl_BR, m)),
            "kl/beta": exp.kl_coef,
            **value_metrics,
            "response/length": float(m.sum(-1).mean()),
            "response/ended_frac": float(exp.ended_B.float().mean()),
            "lr": self.sched.get_last_lr()[0],
        }
        if self.dp > 1:  # per-rank means -> means over ranks (equal rows per rank)
            summed = distributed.sum_stats(metrics, self.dp_group)
            metrics = {k: v / self.dp for k, v in summed.items()}
            metrics["kl/seq_k1"] = mean_kl
        metrics["tokens"] = distributed.sum_stats({"n": float(m.sum())}, self.dp_group)["n"]
        metrics.update(self.mismatch_metrics(exp))
        return metrics

    def mismatch_metrics(self, exp: Experience) -> dict[str, float]:
        """``mismatch/*`` of the global batch: the rollout engine's log-probs vs the trainer's old
        ones over the valid response tokens (:func:`rlhfstack.losses.mismatch_metrics`); empty
        when the old log-probs are the engine's own."""
        if exp.rollout_logprobs_BR is None:
            return {}
        pcfg = self.cfg.ppo
        sums = mismatch_sums(
            exp.old_logprobs_BR,
            exp.rollout_logprobs_BR,
            _known(exp.rollout_logprobs_BR, exp.response_mask_BR),
            pcfg.mismatch_threshold,
            cap=pcfg.rollout_is_cap if exp.is_weights_BR is not None else None,
        )
        top = sums.pop("abs_gap_max")
        sums = distributed.sum_stats(sums, self.dp_group)
        sums["abs_gap_max"] = float(
            distributed.all_reduce_max(
                torch.tensor([top], dtype=torch.float64, device=distributed.comm_device()),
                self.dp_group,
            )[0]
        )
        return mismatch_metrics(sums)

    def gold_eval(self, prompts: list[str], gold: Reward) -> dict[str, float]:
        """Sample completions of the dev prompts (a fixed seed) and score them with the hidden
        ``gold`` reward (text) and the proxy reward model (the sampled tokens, as in training)."""
        cfg = self.cfg
        s = sample_tokens(
            self.r_policy,
            self.tok,
            prompts,
            max_new_tokens=cfg.rollout.max_new_tokens,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            temperature=cfg.rollout.temperature,
            seed=cfg.seed + 12345,
            device=self.device,
        )
        gold_B = gold.score(prompts, s.texts).scores_B.double()
        proxy_B = score_samples(self.reward, prompts, s, self.tok.pad_token_id, device=self.device)
        return {
            "eval/gold_reward": float(gold_B.mean()),
            "eval/proxy_reward": float(proxy_B.mean()),
        }

    def finish(self, **done_info: Any) -> Path:
        """Rank 0 writes the policy (HF), the value model's weights (gae), the KL controller and
        ``done.json`` (with ``done_info``); the other ranks leave in ``dm.finalize``."""
        run, cfg = self.run, self.cfg
        if self.dm is not None:  # rank 0 gets the full, plain modules back
            self.dm.finalize()
            self.policy = self.trained["policy"]
            self.value = self.trained["value"] if "value" in self.trained else None
        if self.value is not None:  # gae only
            save_value_model(self.value, run.run_dir / VALUE_FILE)
        atomic_write_json(run.run_dir / "kl_controller.json", self.kl_ctl.state_dict())
        return finish_stage(
            run,
            "ppo",
            cfg.trainer.max_steps,
            model=self.policy,
            tokenizer=self.tok,
            dashboard=self.dashboard,
            **done_info,
        )


def _known(rollout_logprobs_BR: torch.Tensor, resp_mask_BR: torch.Tensor) -> torch.Tensor:
    """The response tokens the engine gave a log-prob for (vLLM may append an EOS it did not
    score: NaN there)."""
    return resp_mask_BR * torch.isfinite(rollout_logprobs_BR)


def _prompts(cfg: PPOConfig, tokenizer: Any) -> tuple[list[str], list[str], dict[str, int]]:
    """Training prompts, the dev prompts of the gold evaluation (``data.eval_path``), and how
    many of each are longer than ``data.max_prompt_tokens`` (rollouts cut those to their last
    tokens; SFT, RM and DPO drop theirs, PPO keeps them and counts them here, once)."""
    prompts, dev_prompts = load_train_eval(load_prompts, cfg, "PPO prompts")
    dev_prompts = dev_prompts[: cfg.gold_eval_prompts]
    log.info(
        "PPO: %d train prompts, %d dev prompts for the gold evaluation",
        len(prompts),
        len(dev_prompts),
    )
    k = cfg.data.max_prompt_tokens
    n_cut = {}
    for name, examples in (("train", prompts), ("dev", dev_prompts)):
        n_cut[name] = count_long_prompts(examples, tokenizer, k)
        (log.warning if n_cut[name] else log.info)(
            "PPO %s: %d of %d prompts exceed data.max_prompt_tokens=%d and are cut to their "
            "last %d tokens (the start is dropped; a BOS is kept and counts among them)",
            name, n_cut[name], len(examples), k, k,
        )  # fmt: skip
    return [p.prompt for p in prompts], [p.prompt for p in dev_prompts], n_cut


def train(cfg: PPOConfig, gold_scorer: Any | None = None) -> Path:
    """Run PPO; returns ``run_dir``. ``gold_scorer(prompts, completions) -> np.ndarray`` (optional)
    scores samples of the dev prompts with a hidden gold reward every ``gold_eval_every`` iterations."""
    validate(cfg)  # the schema's checks, also for a config built in Python
    _validate(cfg)
    run = setup_run(cfg)
    if run.dist.distributed:
        _validate_distributed(cfg, run.dist.dp, run.dist.tp, run.dist.pp)
    tcfg = cfg.trainer
    trainer = PPOTrainer(cfg, run)  # models, reward, value model, optimizer, KL controller
    train_prompts, dev_prompts, n_cut = _prompts(cfg, trainer.tok)
    G = trainer.G
    stream = PromptStream(train_prompts, cfg.seed, tcfg.batch_size // G, G)
    ckpt = Checkpointer(
        run, trainer.trained, trainer.opt, trainer.sched, save_every=tcfg.save_every
    )
    resumed = ckpt.restore()
    if resumed is not None:
        trainer.load_checkpoint_state(resumed, stream)
    start = resumed["step"] if resumed is not None else 0
    trainer.start_rollouts()
    gold = FunctionReward(gold_scorer, "gold") if gold_scorer is not None else None
    rows = slice(trainer.rank * trainer.Bl, (trainer.rank + 1) * trainer.Bl)  # this rank's rows
    # a log line (rate, ETA) every trainer.log_every iterations; a bar too on a terminal
    bar = Progress(
        tcfg.max_steps, "step", unit="it", every=tcfg.log_every, initial=start, enabled=run.is_main
    )
    with ckpt.watch(), bar:
        for step in range(start + 1, tcfg.max_steps + 1):
            # 1. the next prompts (every rank draws the global batch, keeps its rows)
            prompts = stream.next()[rows]
            # 2. rollout, scoring, shaping, advantages
            exp = trainer.make_experience(prompts, step)
            # guards: non-finite values and a runaway KL stop the run before the update
            mean_kl = trainer.check_experience(exp, step)
            # 3. PPO update
            stats = trainer.ppo_update(exp, step)
            # 4. KL controller
            trainer.update_kl(exp, mean_kl)
            # 5. log (the gold evaluation on rank 0, on the updated policy)
            metrics = trainer.metrics(exp, stats, mean_kl)
            gold_now = bool(gold is not None and dev_prompts and cfg.gold_eval_every) and (
                step % cfg.gold_eval_every == 0 or step == tcfg.max_steps or step == 1
            )
            # (the tensor-parallel ranks beside rank 0 join it: the reward model is sharded)
            if gold_now and run.dist.dp_rank == 0 and run.dist.pp_rank == 0:
                metrics.update(trainer.gold_eval(dev_prompts, gold))
            if step % tcfg.log_every == 0 or step == tcfg.max_steps or gold_now:
                run.logger.log(step, metrics)
            evaluated = gold_now or bool(tcfg.eval_every and step % tcfg.eval_every == 0)
            if evaluated and step < tcfg.max_steps:  # the last one is drawn by finish()
                refresh_dashboard(run, trainer.dashboard)
            trainer.guard.passed(step, metrics)
            bar.update(
                score=metrics["reward/rm_score"],
                kl=mean_kl,
                beta=exp.kl_coef,
                len=metrics["response/length"],
                pg=metrics["loss/policy"],
                vf=stats.get("loss/value", 0.0),
                ratio0=stats.get("first_minibatch_ratio", float("nan")),
                **{
                    k: metrics[k] for k in ("eval/gold_reward", "eval/proxy_reward") if k in metrics
                },
            )
            # 6. checkpoint (every trainer.save_every steps, and on preemption: save and exit)
            ckpt.end_of_step(step, tcfg.max_steps, lambda: trainer.checkpoint_state(stream))
    return trainer.finish(prompts_over_max_prompt_tokens=n_cut)
