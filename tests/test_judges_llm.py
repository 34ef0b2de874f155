"""LLM judges against a REAL local HTTP server speaking the chat-completions protocol.

The server (``FakeChatServer``) runs in a thread on 127.0.0.1 with an ephemeral port; it gives
deterministic verdicts chosen by the requested model name, counts requests, can answer 429 a
given number of times with a ``Retry-After`` header (to exercise the client's retries) and fail with 500 after N answers (to exercise
resume). The ``openai`` client talks to it over HTTP; nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rlhfstack.evaluation.judges import (
    BUILTIN_PAIRWISE_PROMPT,
    ChatAPIError,
    ChatClient,
    JudgmentCache,
    LLMJudge,
    RateLimiter,
    load_judge_prompt,
    parse_verdict,
    verdict_outcome,
)

_ANS = re.compile(
    r"\[The Start of Assistant (A|B)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S
)


def _judge_reply(model: str, user: str) -> str:
    answers = dict(_ANS.findall(user))
    if not answers:  # not a judge prompt: behave like a chat model (generation tests)
        return f"reply from {model}: {user[:24]}"
    a, b = answers["A"], answers["B"]
    if model == "longer":  # prefers the longer answer
        v = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
    elif model == "keyword":  # prefers the answer that says "happy"
        ha, hb = "happy" in a, "happy" in b
        v = "A" if ha and not hb else "B" if hb and not ha else "C"
    elif model == "first":  # pure position bias
        v = "A"
    elif model == "garbage":
        return "I cannot decide."
    else:
        raise ValueError(model)
    return f"Assistant {v} is better because of [[A]]-style reasons.\n\nFinal verdict: [[{v}]]"


class FakeChatServer:
    """``POST /v1/chat/completions`` on 127.0.0.1:<ephemeral>; see the module docstring."""

    def __init__(
        self,
        n_429: int = 0,
        fail_after: int | None = None,
        api_key: str | None = None,
        retry_after: str = "0.01",
        reply=None,
    ):
        # reply(body) -> text or (text, logprobs content list): another model's answers (the AI
        # feedback tests' comparisons, critiques and revisions); default: the judge models above
        self.reply = reply
        self.n_requests = 0
        self.n_429 = n_429
        self.retry_after = retry_after
        self.request_times: list[float] = []
        self.fail_after = fail_after
        self.n_answered = 0
        self.api_key = api_key
        self.auth_headers: list[str] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with outer._lock:
                    outer.n_requests += 1
                    outer.request_times.append(time.monotonic())
                    outer.auth_headers.append(self.headers.get("Authorization", ""))
                    outer.bodies.append(body)
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": "not found"}})
                    if (
                        outer.api_key is not None
                        and self.headers.get("Authorization") != f"Bearer {outer.api_key}"
                    ):
                        return self._send(401, {"error": {"message": "bad key", "type": "auth"}})
                    if outer.n_429 > 0:
                        outer.n_429 -= 1
                        return self._send(
                            429,
                            {"error": {"message": "slow down", "type": "rate"}},
                            {"Retry-After": outer.retry_after},
                        )
                    if outer.fail_after is not None and outer.n_answered >= outer.fail_after:
                        return self._send(500, {"error": {"message": "boom", "type": "server"}})
                    outer.n_answered += 1
                user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                text = (
                    _judge_reply(body["model"], user) if outer.reply is None else outer.reply(body)
                )
                text, logprobs = text if isinstance(text, tuple) else (text, None)
                return self._send(
                    200,
                    {
                        "id": f"chatcmpl-{outer.n_requests}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "logprobs": None if logprobs is None else {"content": logprobs},
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge(server: FakeChatServer, model: str, cache: JudgmentCache, **kw) -> LLMJudge:
    client = ChatClient(
        model,
        base_url=server.url,
        api_key_env=kw.pop("api_key_env", None),
        requests_per_minute=0,
        max_retries=kw.pop("max_retries", 3),
        timeout_s=10,
    )
    return LLMJudge(
        model,
        client,
        BUILTIN_PAIRWISE_PROMPT,
        concurrency=kw.pop("concurrency", 2),
        cache=cache,
        **kw,
    )


PROMPTS = ["Tell me a story.", "Say hi.", "Name a color.", "Count to two."]
A = ["Once upon a time there was a long story.", "hi", "blue", "one two"]
B = ["Short.", "hello there friend", "blue", "1, 2"]
# lengths: A longer, B longer, identical, A longer  -> outcomes 1, 0, 0.5, 1


def test_parse_verdict_and_outcome():
    assert parse_verdict("blah [[A]] ... final: [[B]]") == "B"
    assert parse_verdict("Verdict: [[ C ]]") == "C"
    assert parse_verdict("no tag [A]") is None
    assert parse_verdict(None) is None
    assert verdict_outcome("A", a_first=True) == 1.0
    assert verdict_outcome("A", a_first=False) == 0.0
    assert verdict_outcome("B", a_first=False) == 1.0
    assert verdict_outcome("C", a_first=False) == 0.5
    assert verdict_outcome(None, a_first=True) is None


def test_both_orders_retry_and_cache_makes_rerun_free(tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    with FakeChatServer(n_429=1) as server:
        cache = JudgmentCache(cache_path)
        r = _judge(server, "longer", cache).judge(PROMPTS, A, B)
        np.testing.assert_array_equal(r.outcomes_N, [1.0, 0.0, 0.5, 1.0])
        # 3 non-identical pairs x 2 orders + one 429 answered by a retry
        assert server.n_requests == 3 * 2 + 1
        assert r.stats["n_requests"] == 7 and r.stats["n_retries"] == 1
        assert r.stats["n_identical_pairs"] == 1
        assert r.position_consistency == 1.0
        # both orders were really sent: A's text first in one request, second in the other
        users = [b["messages"][-1]["content"] for b in server.bodies[1:]]
        firsts = [dict(_ANS.findall(u))["A"] for u in users]
        assert A[0] in firsts and B[0] in firsts
        cache.close()

        # a rerun (new cache handle on the same file, new judge) sends nothing
        before = server.n_requests
        cache2 = JudgmentCache(cache_path)
        r2 = _judge(server, "longer", cache2).judge(PROMPTS, A, B)
        assert server.n_requests == before
        assert r2.stats["n_requests"] == 0 and r2.stats["n_cached"] == 6
        np.testing.assert_array_equal(r2.outcomes_N, r.outcomes_N)
        # another judge model is another cache identity
        _judge(server, "keyword", cache2).judge(PROMPTS[:1], A[:1], B[:1])
        assert server.n_requests == before + 2
        cache2.close()


def test_position_bias_is_measured_and_neutralised():
    with FakeChatServer() as server:
        r = _judge(server, "first", JudgmentCache(None)).judge(PROMPTS, A, B)
    # says "A" whatever the order: inconsistent on every judged pair -> ties
    assert r.position_consistency == 0.0
    np.testing.assert_array_equal(r.outcomes_N, [0.5, 0.5, 0.5, 0.5])


def test_unparsed_verdicts_count_as_ties():
    with FakeChatServer() as server:
        r = _judge(server, "garbage", JudgmentCache(None)).judge(PROMPTS[:2], A[:2], B[:2])
    assert r.stats["n_unparsed"] == 4
    np.testing.assert_array_equal(r.outcomes_N, [0.5, 0.5])


def test_interrupted_evaluation_resumes_from_cache(tmp_path):
    cache_path = tmp_path / "c.sqlite"
    with FakeChatServer(fail_after=3) as server:
        cache = JudgmentCache(cache_path)
        with pytest.raises(RuntimeError, match="rerun the same command to resume"):
            _judge(server, "longer", cache, max_retries=1, concurrency=1).judge(PROMPTS, A, B)
        assert len(cache) == 3
        server.fail_after = None  # the endpoint recovers
        before = server.n_requests
        r = _judge(server, "longer", cache).judge(PROMPTS, A, B)
        assert server.n_requests - before == 6 - 3  # only the missing judgments
        np.testing.assert_array_equal(r.outcomes_N, [1.0, 0.0, 0.5, 1.0])
        cache.close()


def test_api_key_from_env_is_sent_and_redacted(monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    with FakeChatServer(api_key=secret) as server:
        client = ChatClient(
            "longer",
            base_url=server.url,
            api_key_env="JUDGE_TEST_KEY",
            requests_per_minute=0,
            max_retries=0,
        )
        assert secret not in repr(client)
        client.complete([{"role": "user", "content": "x"}])
        assert server.auth_headers[-1] == f"Bearer {secret}"
        server.api_key = "another"
        with pytest.raises(ChatAPIError) as err:  # 401: not retried, message redacted
            client.complete([{"role": "user", "content": "x"}])
        assert secret not in str(err.value) and "AuthenticationError" in str(err.value)
    monkeypatch.delenv("JUDGE_TEST_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY"):
        ChatClient("gpt-4o", api_key_env="JUDGE_TEST_KEY")  # official API without a key


def test_rate_limiter_spaces_requests():
    lim = RateLimiter(requests_per_minute=600)  # 0.1 s apart
    t0 = time.monotonic()
    for _ in range(3):
        lim.acquire()
    assert time.monotonic() - t0 >= 0.19
    RateLimiter(0).acquire()  # disabled: returns at once


def test_judge_prompt_from_mt_bench_file(data_root, tmp_path):
    p = load_judge_prompt(data_root / "eval_prompts" / "mt_bench_judge_prompts.jsonl", "pair-v2")
    msgs = p.messages("Q?", "ans one", "ans two")
    assert msgs[0]["role"] == "system" and "[[C]]" in msgs[0]["content"]
    assert (
        "ans one" in msgs[1]["content"] and dict(_ANS.findall(msgs[1]["content"]))["B"] == "ans two"
    )
    with pytest.raises(ValueError, match="lacks"):  # multi-turn template is not single-turn
        load_judge_prompt(
            data_root / "eval_prompts" / "mt_bench_judge_prompts.jsonl", "pair-v2-multi-turn"
        )
    assert load_judge_prompt(tmp_path / "missing.jsonl") is BUILTIN_PAIRWISE_PROMPT
    # braces in user text are not format fields
    assert "{x}" in BUILTIN_PAIRWISE_PROMPT.messages("{x}", "a", "b")[1]["content"]


def _closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_reported_at_once_and_given_up_quickly(tmp_path, caplog):
    """Default settings, nothing listening: the transport's connection retries (about 1.5 s)
    end in one logged message (endpoint, error, what happens next), without the client's own
    retries on top, and the judge gives up within seconds, not after minutes of retries."""
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    client = ChatClient("judge-model", base_url=url, api_key_env=None)  # defaults otherwise
    outcome: dict = {}

    def run() -> None:  # the cache is used in the thread that opens it
        cache = JudgmentCache(tmp_path / "cache.sqlite")
        judge = LLMJudge("llm", client, BUILTIN_PAIRWISE_PROMPT, cache=cache)  # concurrency 4
        try:
            judge.judge(PROMPTS, A, B)
        except Exception as err:  # the outcome is checked below
            outcome["error"] = err
        outcome["end"] = time.monotonic()
        cache.close()

    start = time.monotonic()
    with caplog.at_level("WARNING", logger="rlhfstack"):
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=20)  # bounded even where the client would retry for minutes
    assert not worker.is_alive(), "still retrying after 20 s"
    assert outcome["end"] - start < 15
    err = outcome["error"]  # the judge's RuntimeError around the client's ChatAPIError
    assert f"cannot connect to {url} after 4 attempts" in str(err)
    assert "Connection refused" in str(err)
    first = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(first) == 1  # once per client, not once per request
    # the first warning: nothing else was tried before (the client's INFO line at construction
    # is captured too when an earlier test left the project's loggers at INFO)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert first[0] is warnings[0]
    msg = first[0].getMessage()
    assert url in msg and "ConnectError" in msg
    assert "Is the server running" in msg and "Giving up" in msg


def test_server_errors_keep_their_longer_retry_budget():
    """429/5xx are retried up to ``max_retries`` (not the shorter connection budget)."""
    with FakeChatServer(n_429=3) as server:
        client = ChatClient(
            "longer",
            base_url=server.url,
            api_key_env=None,
            requests_per_minute=0,
            max_retries=3,
            max_connection_retries=0,
        )
        assert client.complete([{"role": "user", "content": "x"}]) is not None
        assert server.n_requests == 4 and client.n_retries == 3


def test_429_waits_for_retry_after_then_succeeds():
    """The client's own retries honour the server's ``Retry-After`` (here 0.6 s, far above its
    own first backoff of at most 0.5 s), count in the stats, and stay out of the rate limit."""
    with FakeChatServer(n_429=2, retry_after="0.6") as server:
        client = ChatClient(
            "longer", base_url=server.url, api_key_env=None, requests_per_minute=0, max_retries=2
        )
        t0 = time.monotonic()
        assert client.complete([{"role": "user", "content": "x"}]).startswith("reply from longer")
        gaps = np.diff(server.request_times)
        assert server.n_requests == 3 and client.n_requests == 3 and client.n_retries == 2
        assert np.all(gaps >= 0.6) and time.monotonic() - t0 < 5
    with FakeChatServer(n_429=5) as server:  # more 429s than retries: one clear error
        client = ChatClient(
            "longer", base_url=server.url, api_key_env=None, requests_per_minute=0, max_retries=2
        )
        with pytest.raises(ChatAPIError, match=r"RateLimitError after 3 attempt\(s\)"):
            client.complete([{"role": "user", "content": "x"}])
        assert server.n_requests == 3 and client.n_retries == 2


def test_client_retries_are_the_openai_clients():
    """No retry loop of ours: the ``openai`` client is built with ``max_retries``."""
    client = ChatClient("m", base_url="http://127.0.0.1:9/v1", api_key_env=None, max_retries=5)
    assert client._client.max_retries == 5
