"""Pairwise judges for win-rates: the demo's gold reward (or any scorer), LLM judges.

Every judge answers the same question -- on prompt i, is answer A better than answer B? -- as a
per-pair *outcome* from A's point of view: 1.0 (A better), 0.5 (tie), 0.0 (B better).

* :class:`GoldJudge` (and the reward-model judge ``RMJudge`` of
  :mod:`rlhfstack.evaluation.jobs.judges`) are *pointwise* (:class:`PointwiseJudge`): they score
  each (prompt, answer) on its own and compare the scores, so their verdicts cannot depend on the
  order of A and B.
* :class:`LLMJudge` asks a chat model through any OpenAI-compatible endpoint (the OpenAI API, a
  gateway to another vendor, a local vLLM server) with an MT-Bench-style pairwise prompt
  (Zheng et al. 2023) that ends in ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Each pair is judged
  in both orders; the pair's outcome is the common verdict when both orders agree and a tie
  when they do not (the MT-Bench rule for position bias); a verdict that cannot be parsed
  leaves the other order's verdict (a tie if neither parses).

Every judgment goes through :class:`JudgmentCache` (SQLite), keyed by the judge's identity, the
prompt and the two answers in the order shown (pointwise judges: the one answer), so a rerun
sends no requests and an interrupted evaluation resumes where it stopped. The API key is read
from the environment variable named in the config; it is never logged, saved or cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx2
import numpy as np
import openai

from rlhfstack.data import map_records, require_field
from rlhfstack.evaluation.metrics import win_outcomes
from rlhfstack.progress import Progress

log = logging.getLogger("rlhfstack.judges")

__all__ = [
    "ChatAPIError",
    "ChatClient",
    "GoldJudge",
    "Judge",
    "JudgePrompt",
    "JudgeResult",
    "JudgmentCache",
    "LLMJudge",
    "PointwiseJudge",
    "RateLimiter",
    "hash_texts",
    "load_judge_prompt",
    "parse_verdict",
    "verdict_outcome",
]


# --------------------------------------------------------------------------------------------
# Results and the protocol
# --------------------------------------------------------------------------------------------


@dataclass
class JudgeResult:
    """One judge's verdicts on N pairs.

    outcomes_N: A's outcome per pair, in {0, 0.5, 1} (float64, shape (N,)).
    consistent_N: per pair, whether the verdict was the same in both orders (bool, shape (N,));
        None for pointwise judges, whose verdicts cannot depend on the order.
    stats: counters for the report (requests sent, cache hits, unparsed verdicts, ...).
    details: per-pair extras for judgments.jsonl (e.g. the verdict in each order), each a list
        of length N.
    """

    outcomes_N: np.ndarray
    consistent_N: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def position_consistency(self) -> float | None:
        """Fraction of pairs whose verdict was the same in both orders (None if not measured)."""
        if self.consistent_N is None:
            return None
        return float(np.mean(self.consistent_N)) if len(self.consistent_N) else float("nan")


@runtime_checkable
class Judge(Protocol):
    """Anything that can compare two answers per prompt."""

    name: str

    def judge(
        self, prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> JudgeResult:
        """Verdicts of A vs B on each prompt (the three sequences have the same length N)."""
        ...


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def hash_texts(*parts: str) -> str:
    """SHA-256 hex digest of the strings, each followed by a NUL byte."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class JudgmentCache:
    """Judgments on disk (SQLite), so reruns are free and interrupted runs resume.

    Keys are SHA-256 hashes of (judge identity, prompt, answers in the order shown); values are
    small JSON objects. Writes are committed one by one (a crash loses at most the request in
    flight). Only the thread that created the cache should call it. ``path=None`` keeps the
    cache in memory (nothing persists).
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgments ("
            "key TEXT PRIMARY KEY, judge TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._db.commit()

    @staticmethod
    def pair_key(judge_id: str, prompt: str, first: str, second: str) -> str:
        """Key of a pairwise judgment: ``first`` was shown as answer A, ``second`` as B."""
        return hash_texts("pair", judge_id, prompt, first, second)

    @staticmethod
    def score_key(judge_id: str, prompt: str, answer: str) -> str:
        """Key of a pointwise score."""
        return hash_texts("score", judge_id, prompt, answer)

    def get(self, key: str) -> Any | None:
        row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Cached values of those ``keys`` that are present."""
        out: dict[str, Any] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT key, value FROM judgments WHERE key IN ({marks})"
            for k, v in self._db.execute(q, chunk):
                out[k] = json.loads(v)
        return out

    def put(self, key: str, judge_id: str, value: Any) -> None:
        self.put_many([(key, value)], judge_id)

    def put_many(self, items: Sequence[tuple[str, Any]], judge_id: str) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO judgments (key, judge, value, created) VALUES (?, ?, ?, ?)",
            [(k, judge_id, json.dumps(v), now) for k, v in items],
        )
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        self._db.close()


# --------------------------------------------------------------------------------------------
# Pointwise judges
# --------------------------------------------------------------------------------------------


class PointwiseJudge:
    """Base for judges that score each (prompt, answer) alone; A wins where its score is higher.

    Subclasses implement :meth:`score_uncached`. Scores are cached per (identity, prompt,
    answer), and each distinct (prompt, answer) is scored once per call, so the same text
    always gets exactly the same score (identical answers tie).
    """

    name: str = "pointwise"

    def __init__(self, name: str, identity: str, cache: JudgmentCache | None = None) -> None:
        self.name = name
        self.identity = identity
        self.cache = cache if cache is not None else JudgmentCache(None)

    def score_uncached(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """Scores, shape (B,) float64 (higher is better)."""
        raise NotImplementedError

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> tuple[np.ndarray, int]:
        """Scores, shape (B,), through the cache; also returns how many were computed."""
        keys = [self.cache.score_key(self.identity, p, a) for p, a in zip(prompts, answers)]
        have = self.cache.get_many(keys)
        todo: dict[str, tuple[str, str]] = {}
        for k, p, a in zip(keys, prompts, answers):
            if k not in have and k not in todo:
                todo[k] = (p, a)
        if todo:
            ps, ans = zip(*todo.values())
            s_M = np.asarray(self.score_uncached(list(ps), list(ans)), dtype=np.float64).reshape(-1)
            new = {k: float(v) for k, v in zip(todo, s_M)}
            self.cache.put_many(list(new.items()), self.identity)
            have.update(new)
        return np.array([have[k] for k in keys], dtype=np.float64), len(todo)

    def judge(
        self, prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> JudgeResult:
        n = len(prompts)
        if not (len(answers_a) == len(answers_b) == n):
            raise ValueError("prompts, answers_a and answers_b differ in length")
        s_2N, n_new = self.score(list(prompts) * 2, list(answers_a) + list(answers_b))
        sa_N, sb_N = s_2N[:n], s_2N[n:]
        return JudgeResult(
            outcomes_N=win_outcomes(sa_N, sb_N),
            consistent_N=None,
            stats={"n_scored": n_new},
            details={"score_a": sa_N.tolist(), "score_b": sb_N.tolist()},
        )


class GoldJudge(PointwiseJudge):
    """The embedded demo's hidden gold reward as a judge (or any ``(prompts, answers) -> (B,)``
    scorer, e.g. a stand-in for tests); :func:`rlhfstack.evaluation.jobs.judges.load_gold_judge`
    builds it from the demo's artifacts."""

    def __init__(
        self,
        scorer: Callable[[Sequence[str], Sequence[str]], np.ndarray],
        identity: str = "gold",
        cache: JudgmentCache | None = None,
        name: str = "gold",
    ) -> None:
        super().__init__(name, identity, cache)
        self._scorer = scorer

    def score_uncached(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return np.asarray(self._scorer(list(prompts), list(answers)), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# LLM judges
# --------------------------------------------------------------------------------------------

_VERDICT_RE = re.compile(r"\[\[\s*(A|B|C)\s*\]\]")


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie) from a judge's reply: the LAST ``[[A]]``/``[[B]]``/
    ``[[C]]`` tag (the verdict follows the explanation, which may quote the format); None if
    there is none."""
    if not text:
        return None
    tags = _VERDICT_RE.findall(text)
    return tags[-1] if tags else None


def verdict_outcome(verdict: str | None, a_first: bool) -> float | None:
    """A's outcome (1 / 0.5 / 0) from a verdict on an ordering; None for an unparsed verdict."""
    if verdict is None:
        return None
    if verdict == "C":
        return 0.5
    first_wins = verdict == "A"
    return 1.0 if first_wins == a_first else 0.0


@dataclass(frozen=True)
class JudgePrompt:
    """A pairwise judge prompt: a system message and a user template with ``{question}``,
    ``{answer_a}`` and ``{answer_b}`` fields."""

    name: str
    system: str
    template: str

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        user = self.template.format(question=question, answer_a=answer_a, answer_b=answer_b)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def digest(self) -> str:
        return hash_texts(self.system, self.template)[:16]


BUILTIN_PAIRWISE_PROMPT = JudgePrompt(
    name="builtin-pairwise",
    system=(
        "You are an impartial judge. Compare the two assistant responses to the user's question "
        "below and decide which one follows the user's instructions and answers the question "
        "better, considering helpfulness, relevance, accuracy, depth and harmlessness. The order "
        "in which the responses appear, their length and the assistants' names must not affect "
        "your decision. First explain your comparison briefly, then give your final verdict on "
        'its own line: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, '
        'or "[[C]]" for a tie.'
    ),
    template=(
        "[User Question]\n{question}\n\n"
        "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    ),
)


def load_judge_prompt(path: str | os.PathLike | None, name: str = "pair-v2") -> JudgePrompt:
    """The pairwise template ``name`` from an MT-Bench ``judge_prompts.jsonl`` file (fields
    ``name``, ``type``, ``system_prompt``, ``prompt_template``); the built-in prompt when
    ``path`` is None or missing. The template must use ``{question}``, ``{answer_a}`` and
    ``{answer_b}`` (single-turn pairwise prompts such as MT-Bench's ``pair-v2`` do)."""
    if path is None or not Path(path).exists():
        if path is not None:
            log.warning("judge prompt file %s not found: using the built-in pairwise prompt", path)
        return BUILTIN_PAIRWISE_PROMPT

    def check(row: Any) -> Any:  # the matching row's fields, located by map_records
        if require_field(row, "name", str) == name:
            require_field(row, "prompt_template", str)
            require_field(row, "system_prompt", str, optional=True)
        return row

    for row in map_records(path, check, fmt="jsonl", data_root="."):
        if row["name"] != name:
            continue
        tpl = row["prompt_template"]
        missing = [k for k in ("{question}", "{answer_a}", "{answer_b}") if k not in tpl]
        if missing:
            raise ValueError(
                f"{path}: judge prompt {name!r} lacks {missing}; pick a single-turn pairwise "
                "prompt (e.g. pair-v2)"
            )
        return JudgePrompt(name=name, system=row.get("system_prompt") or "", template=tpl)
    raise ValueError(f"{path}: no judge prompt named {name!r}")


class RateLimiter:
    """Spaces calls at least ``60 / requests_per_minute`` seconds apart (thread-safe);
    ``requests_per_minute <= 0`` disables it."""

    def __init__(self, requests_per_minute: float) -> None:
        self.interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


class ChatAPIError(RuntimeError):
    """A chat request failed for good (message redacted of the API key)."""


class _ConnectRetries(httpx2.BaseTransport):
    """httpx's own transport with ``retries`` extra connection attempts (refused, unknown host;
    httpcore's backoff of 0, 0.5, 1, 2 ... s), whose last failure is raised as openai's
    ``APIConnectionError``. An ``OpenAIError`` raised while sending is passed on by the client
    as it is, without its own retries: those are kept for answers that may change (HTTP
    408/409/429/5xx, timeouts), while an endpoint that refuses connections is down or misnamed,
    which waiting rarely fixes."""

    def __init__(self, retries: int, describe: Callable[[Exception], str]) -> None:
        self._inner = httpx2.HTTPTransport(retries=retries)
        self._describe = describe

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return self._inner.handle_request(request)
        except httpx2.ConnectError as err:
            raise openai.APIConnectionError(message=self._describe(err), request=request) from err

    def close(self) -> None:
        self._inner.close()


class ChatClient:
    """Chat completions against an OpenAI-compatible endpoint, with retries and a rate limit.

    Retries are the ``openai`` client's own (``max_retries``): HTTP 408, 409, 429, 5xx and
    timeouts, with its exponential backoff (0.5 s doubling, at most 8 s, less up to 25% jitter),
    or the server's ``Retry-After`` / ``retry-after-ms`` when it sends one (up to 60 s; a longer
    one is not waited for). A failure to connect at all (refused, unknown host) is retried by the
    HTTP transport instead, ``max_connection_retries`` times without the client's retries on top
    (0 + 0.5 + 1 s with the defaults), then logged once with the endpoint and what happened; once
    one request has given up on connecting, the others give up too instead of each spending its
    own budget. Other errors (bad request, authentication) raise at once. The rate limit spaces
    the requests this client starts; the client's retries of one request are spaced by its
    backoff.

    Args:
        model: model name sent in each request.
        base_url: endpoint root (``http://127.0.0.1:8000/v1`` for a local vLLM server); None lets
            the client use ``$OPENAI_BASE_URL`` or the OpenAI API.
        api_key_env: NAME of the environment variable that holds the key (the key itself never
            enters configs, logs or caches). When it is unset and ``base_url`` is given (local
            servers need no key), a placeholder key is sent.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        requests_per_minute: float = 60.0,
        max_retries: int = 6,
        timeout_s: float = 120.0,
        max_connection_retries: int = 3,
    ) -> None:
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if base_url is None and not os.environ.get("OPENAI_BASE_URL"):
                where = (
                    f"the environment variable {api_key_env!r}" if api_key_env else "api_key_env"
                )
                raise ValueError(f"model {model!r} on the OpenAI API: set {where} (the API key)")
            log.info("no API key in $%s: sending a placeholder key to %s", api_key_env, base_url)
            key = "EMPTY"
        self.model = model
        self._key = key
        self.max_retries = max_retries
        self.max_connection_retries = max_connection_retries
        transport = _ConnectRetries(max_connection_retries, self._connect_failure)
        self._client = openai.OpenAI(
            api_key=key,
            base_url=base_url,
            max_retries=max_retries,
            timeout=timeout_s,
            http_client=openai.DefaultHttpxClient(transport=transport),
        )
        self.base_url = str(self._client.base_url).rstrip("/")
        self.limiter = RateLimiter(requests_per_minute)
        self._count_lock = threading.Lock()
        # set when a request gives up connecting: every later request then fails at once
        self._unreachable: str | None = None
        self.n_requests = 0  # HTTP requests sent, retries included
        self.n_retries = 0

    @classmethod
    def from_config(cls, cfg: Any, model: str | None = None) -> ChatClient:
        """The client of an endpoint config block (``llm.*``, ``generation.*``,
        ``feedback.endpoint.*``: :class:`~rlhfstack.configs.EndpointConfig` plus the rate limit,
        retries and timeout fields); ``model`` replaces ``cfg.model``."""
        return cls(
            model or cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            requests_per_minute=cfg.requests_per_minute,
            max_retries=cfg.max_retries,
            max_connection_retries=cfg.max_connection_retries,
            timeout_s=cfg.timeout_s,
        )

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(model={self.model!r}, base_url={self.base_url!r})"

    def _redact(self, text: str) -> str:
        """``text`` without the API key (nor anything shaped like a key)."""
        if self._key and self._key != "EMPTY":
            text = text.replace(self._key, "***")
        return _KEY_LIKE.sub("***", text)

    def _connect_failure(self, err: Exception) -> str:
        """The message of a request that could not connect after its attempts; logged once."""
        msg = (
            f"{self.model}: cannot connect to {self.base_url} after "
            f"{self.max_connection_retries + 1} attempts: {self._redact(f'{type(err).__name__}: {err}')}"
        )
        with self._count_lock:
            first = self._unreachable is None
            self._unreachable = msg
        if first:
            log.warning("%s. Is the server running at that address? Giving up.", msg)
        return msg

    @staticmethod
    def _retries_taken(err: Exception) -> int:
        """Retries the client made before ``err`` (its ``x-stainless-retry-count`` header)."""
        resp = getattr(err, "response", None)
        request = resp.request if resp is not None else getattr(err, "request", None)
        try:
            return int(request.headers.get("x-stainless-retry-count", 0))
        except (AttributeError, ValueError):
            return 0

    def _count(self, retries: int) -> None:
        with self._count_lock:
            self.n_requests += 1 + retries
            self.n_retries += retries

    def complete(self, messages: list[dict[str, str]], **params: Any) -> str:
        """The first choice's text for ``messages`` (extra ``params`` go into the request)."""
        return self.create(messages, **params).choices[0].message.content or ""

    def create(self, messages: list[dict[str, str]], **params: Any) -> Any:
        """The whole chat-completion response (e.g. to read ``logprobs``), with the retries
        and rate limit of :meth:`complete`."""
        if self._unreachable is not None:
            raise ChatAPIError(self._unreachable)
        self.limiter.acquire()
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, **params
            )
        except openai.APIConnectionError as err:
            self._count(self._retries_taken(err))
            if self._unreachable is not None and not isinstance(err, openai.APITimeoutError):
                raise ChatAPIError(self._unreachable) from None
            raise ChatAPIError(self._redact(f"{type(err).__name__}: {err}")) from None
        except openai.OpenAIError as err:  # status errors: retried by the client where useful
            retries = self._retries_taken(err)
            self._count(retries)
            raise ChatAPIError(
                self._redact(f"{type(err).__name__} after {retries + 1} attempt(s): {err}")
            ) from None
        self._count(raw.retries_taken)
        if raw.retries_taken:
            log.info("%s: answered after %d retries", self.model, raw.retries_taken)
        return raw.parse()


def request_all(
    calls: Sequence[tuple[str, str, Callable[[], Any]]],
    cache: JudgmentCache,
    concurrency: int,
    desc: str,
    unit: str = "req",
) -> tuple[dict[str, Any], BaseException | None]:
    """Run each ``(key, identity, call)`` of ``calls`` on ``concurrency`` threads; each answer is
    cached (``cache.put(key, identity, answer)``) as soon as it arrives, with progress (rate,
    ETA). On a failure, calls not yet started are dropped and those in flight awaited (and
    cached). Returns the answers by key and the first error (None when every call succeeded)."""
    answers: dict[str, Any] = {}
    error: BaseException | None = None
    bar = Progress(len(calls), desc, unit=unit)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, bar:
        futures = {pool.submit(call): (key, identity) for key, identity, call in calls}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    error = error or fut.exception()
                    continue
                key, identity = futures[fut]
                answers[key] = fut.result()
                cache.put(key, identity, answers[key])
                bar.update()
            if error is not None:
                for fut in pending:
                    fut.cancel()
    return answers, error


class LLMJudge:
    """A chat model as a pairwise judge, asked about every pair in both orders (cached).

    Args:
        name: the judge's name in reports.
        client: a :class:`ChatClient`.
        prompt: the pairwise prompt (:func:`load_judge_prompt`).
        temperature, max_tokens: sampling settings of the judge (MT-Bench: 0 and 2048).
        concurrency: requests in flight at once (the rate limit still applies).
        cache: where judgments are stored; identity = model, endpoint, prompt and settings.
    """

    def __init__(
        self,
        name: str,
        client: ChatClient,
        prompt: JudgePrompt = BUILTIN_PAIRWISE_PROMPT,
        *,
        temperature: float = 0.0,
        max_tokens: int | None = 2048,
        concurrency: int = 4,
        cache: JudgmentCache | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.prompt = prompt
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.concurrency = max(1, int(concurrency))
        self.cache = cache if cache is not None else JudgmentCache(None)
        self.identity = json.dumps(
            {
                "kind": "llm",
                "model": client.model,
                "base_url": client.base_url,
                "prompt": prompt.digest(),
                "temperature": temperature,
                "max_tokens": max_tokens,
            },
            sort_keys=True,
        )

    def _ask(self, question: str, first: str, second: str) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        text = self.client.complete(self.prompt.messages(question, first, second), **params)
        return {"verdict": parse_verdict(text), "text": text}

    def judge(
        self, prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
    ) -> JudgeResult:
        n = len(prompts)
        if not (len(answers_a) == len(answers_b) == n):
            raise ValueError("prompts, answers_a and answers_b differ in length")
        # Identical answers tie without a request (either order would show the same text).
        identical_N = np.array([a == b for a, b in zip(answers_a, answers_b)], dtype=bool)
        jobs: list[tuple[str, str, str, str]] = []  # key, question, first, second
        keys_ab, keys_ba = [""] * n, [""] * n
        for i, (p, a, b) in enumerate(zip(prompts, answers_a, answers_b)):
            if identical_N[i]:
                continue
            keys_ab[i] = self.cache.pair_key(self.identity, p, a, b)
            keys_ba[i] = self.cache.pair_key(self.identity, p, b, a)
            jobs.append((keys_ab[i], p, a, b))
            jobs.append((keys_ba[i], p, b, a))
        have = self.cache.get_many([j[0] for j in jobs])
        todo = list({j[0]: j for j in jobs if j[0] not in have}.values())
        n_cached = len({j[0] for j in jobs}) - len(todo)
        requests_before = self.client.n_requests
        if todo:
            log.info("%s: %d judgments to request (%d cached)", self.name, len(todo), n_cached)
            self._run(todo, have)
        v_ab = [have[k]["verdict"] if k else None for k in keys_ab]
        v_ba = [have[k]["verdict"] if k else None for k in keys_ba]
        outcomes_N = np.full(n, 0.5)
        consistent_N = np.ones(n, dtype=bool)
        n_unparsed = 0
        for i in range(n):
            if identical_N[i]:
                continue
            o1, o2 = verdict_outcome(v_ab[i], True), verdict_outcome(v_ba[i], False)
            n_unparsed += (o1 is None) + (o2 is None)
            if o1 is not None and o2 is not None:
                consistent_N[i] = o1 == o2
                outcomes_N[i] = o1 if o1 == o2 else 0.5
            else:
                consistent_N[i] = False
                known = o1 if o1 is not None else o2
                outcomes_N[i] = 0.5 if known is None else known
        compared = ~identical_N
        return JudgeResult(
            outcomes_N=outcomes_N,
            consistent_N=consistent_N[compared],
            stats={
                "n_requests": self.client.n_requests - requests_before,
                "n_retries": self.client.n_retries,
                "n_cached": n_cached,
                "n_judged_pairs": int(compared.sum()),
                "n_identical_pairs": int(identical_N.sum()),
                "n_unparsed": n_unparsed,
                "model": self.client.model,
                "prompt": self.prompt.name,
            },
            details={"verdict_a_first": v_ab, "verdict_b_first": v_ba},
        )

    def _run(self, todo: list[tuple[str, str, str, str]], have: dict[str, Any]) -> None:
        """Request ``todo`` concurrently (:func:`request_all`: each answer cached as it arrives);
        on a failure, raise after the requests in flight: rerunning resumes from the cache."""
        calls = [(key, self.identity, partial(self._ask, q, f, s)) for key, q, f, s in todo]
        answers, error = request_all(
            calls, self.cache, self.concurrency, f"{self.name}: judgment", unit="req"
        )
        have.update(answers)
        if error is not None:
            raise RuntimeError(
                f"LLM judge {self.name!r} failed after {len(answers)} of {len(todo)} new "
                f"judgments ({error}); the finished ones are cached: rerun the same command to "
                "resume"
            ) from None
