"""Rollouts through vLLM (GPU only), behind the same interface as ``generate``.

NOT exercised in CI (there is no GPU and vLLM is not installed by default; ``pip install '.[gpu]'``).
The training pass recomputes old log-probs with the training model, so the ratio == 1 invariant does
not depend on vLLM's numerics; vLLM's own log-probs of the sampled tokens (after temperature,
``logprobs_mode="processed_logprobs"``) come back in ``Generation.logprobs_BR`` so that PPO can
measure and correct the gap between the two (``mismatch/*``, ``ppo.rollout_is``). Weights are pushed from the training
policy into the vLLM engine before every rollout (``sync_weights``), LoRA merged on the fly.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from rlhfstack.rollout.generate import Generation
from rlhfstack.runtime import require

log = logging.getLogger("rlhfstack.vllm")


class VLLMRollout:
    """A vLLM engine holding a copy of the policy for sampling.

    ``gpu_memory_utilization`` bounds the engine's share of the GPU (the trainer needs the rest).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        LLM = require("vllm", "rollout.backend=vllm").LLM
        if not torch.cuda.is_available():  # pragma: no cover
            raise RuntimeError("rollout.backend=vllm needs a CUDA GPU")
        kwargs = dict(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=False,
        )
        # log-probs after temperature scaling: the distribution the tokens were drawn from
        self.processed_logprobs = True
        try:
            self.llm = LLM(**kwargs, logprobs_mode="processed_logprobs")
        except TypeError:  # older vLLM: raw log-probs, i.e. of softmax(logits) at temperature 1
            self.processed_logprobs = False
            log.warning(
                "this vLLM has no logprobs_mode: its log-probs are at temperature 1, so the "
                "mismatch/* metrics and ppo.rollout_is hold only for rollout.temperature=1"
            )
            self.llm = LLM(**kwargs)

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:  # pragma: no cover - GPU only
        """Load the current policy weights (LoRA merged) into the engine."""
        model = policy
        if hasattr(model, "merge_and_unload"):  # peft: merge into a copy, keep training the adapter
            model = copy.deepcopy(model).merge_and_unload()
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:  # older vLLM (V0 engine)
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def generate(  # pragma: no cover - GPU only
        self,
        prompt_ids_BP: torch.Tensor,
        prompt_mask_BP: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        temperature: float = 1.0,
        stop_ids: tuple[int, ...] | None = None,
        seed: int | None = None,
        **_: Any,
    ) -> Generation:
        """Same contract as ``rlhfstack.rollout.generate.generate`` (no top-k/top-p)."""
        SamplingParams = require("vllm", "rollout.backend=vllm").SamplingParams

        stops = list(stop_ids) if stop_ids is not None else [eos_id]
        params = SamplingParams(
            temperature=temperature,
            top_k=-1,
            top_p=1.0,
            max_tokens=max_new_tokens,
            stop_token_ids=stops,
            seed=seed,
            skip_special_tokens=False,
            logprobs=0,  # the sampled token's log-prob only
        )
        prompts = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(prompt_ids_BP.cpu(), prompt_mask_BP.cpu())
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs, lps, ended = [], [], []
        for o in outs:
            toks = list(o.outputs[0].token_ids)
            step_lps = o.outputs[0].logprobs or []
            lp = [float(d[t].logprob) if t in d else float("nan") for t, d in zip(toks, step_lps)]
            lp += [float("nan")] * (len(toks) - len(lp))
            fin = o.outputs[0].finish_reason == "stop"
            if fin and (not toks or toks[-1] not in stops):
                toks.append(eos_id)
                lp.append(float("nan"))  # an EOS vLLM did not return: no log-prob for it
            seqs.append(toks)
            lps.append(lp)
            ended.append(fin)
        R = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), R), dtype=torch.long)
        logprobs = torch.zeros((len(seqs), R), dtype=torch.float32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
            logprobs[i, : len(s)] = torch.tensor(lps[i], dtype=torch.float32)
        dev = prompt_ids_BP.device
        return Generation(
            prompt_ids_BP=prompt_ids_BP,
            prompt_mask_BP=prompt_mask_BP.long(),
            response_ids_BR=ids.to(dev),
            response_mask_BR=mask.to(dev),
            ended_B=torch.tensor(ended, device=dev),
            logprobs_BR=logprobs.to(dev),
        )
