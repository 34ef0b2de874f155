"""RLAIF / Constitutional AI: the endpoint feedback model against a real local HTTP server, SL-CAI
with critiques and revisions from it, and the zero-human-label pipeline end to end at tiny sizes
(no simulated labeler is called: the calls are counted)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from rlhfstack.configs import load_config, to_object
from rlhfstack.evaluation.judges import ChatClient, JudgmentCache
from rlhfstack.feedback import EndpointFeedback, load_constitution
from rlhfstack.runtime import read_jsonl
from tests.test_judges_llm import FakeChatServer

_OPTS = re.compile(r"Option \(A\):\n(.*?)\n\nOption \(B\):\n(.*?)\n\nAnswer", re.S)


def _happy(text: str) -> int:
    return text.count("happy") - text.count("sad")


def feedback_reply(body: dict):
    """A served model: compares by happiness (with a +1 logit bias for option A), critiques and
    revises; ``logprobs`` models return the first token's top log-probs."""
    model, msgs = body["model"], body["messages"]
    user = msgs[-1]["content"]
    m = _OPTS.search(user)
    if m:
        d = _happy(m.group(1)) - _happy(m.group(2)) + 1.0  # position bias towards A
        if model == "first":
            return "A"
        if model == "happy-logprobs" and body.get("logprobs"):
            lp_a = -math.log1p(math.exp(-d))
            lp_b = -math.log1p(math.exp(d))
            top = [{"token": "A", "logprob": lp_a, "bytes": None},
                   {"token": "B", "logprob": lp_b, "bytes": None}]  # fmt: skip
            return ("A" if d > 0 else "B", [{"token": "A", "logprob": lp_a, "bytes": None,
                                             "top_logprobs": top}])  # fmt: skip
        return "A" if d > 0 else "B"  # happy-verdict: a hard verdict, no logprobs
    if user.startswith("Revision request"):
        return "They played and were happy all day."
    return "The response is sad: the dog is lost."


def _fb(server: FakeChatServer, model: str, cache=None) -> EndpointFeedback:
    client = ChatClient(
        model, base_url=server.url, api_key_env=None, requests_per_minute=0, timeout_s=10,
    )  # fmt: skip
    return EndpointFeedback(client, cache, concurrency=2)


def test_endpoint_feedback_logprobs_verdicts_and_cache(tmp_path):
    p = load_constitution("stories").principle("happiness")
    a, b = ["a happy day", "a sad day", "a day"], ["a sad day", "a happy day", "a day"]
    sig = lambda d: 1 / (1 + math.exp(-d))  # noqa: E731
    with FakeChatServer(reply=feedback_reply) as server:
        cache = JudgmentCache(tmp_path / "c.sqlite")
        fb = _fb(server, "happy-logprobs", cache)
        cmp = fb.compare(["x"] * 3, a, b, p)
        # orders: P(A first) = sig(d + 1), P(A second) = 1 - sig(-d + 1): the bias cancels
        # only in the sign; p = (sig(d+1) + sig(d-1)) / 2
        want = [(sig(d + 1) + sig(d - 1)) / 2 for d in (2, -2, 0)]
        np.testing.assert_allclose(cmp.p_a_N, want, atol=1e-6)
        assert fb.n_from_logprobs == 6 and fb.n_unparsed == 0
        np.testing.assert_array_equal(cmp.disagree_N, [False, False, True])
        n = server.n_requests
        fb2 = _fb(server, "happy-logprobs", cache)
        np.testing.assert_allclose(fb2.compare(["x"] * 3, a, b, p).p_a_N, cmp.p_a_N)
        assert server.n_requests == n  # a rerun is served by the cache
        first = _fb(server, "first").compare(["x"] * 3, a, b, p)
        np.testing.assert_allclose(first.p_a_N, 0.5)  # always "A": 0.5 after debiasing
        assert first.order_disagreement == 1.0
        verdict = _fb(server, "happy-verdict").compare(["x"] * 3, a, b, p)
        np.testing.assert_allclose(verdict.p_a_N, [1.0, 0.0, 0.5])  # no logprobs: parsed
        assert server.bodies[-1].get("logprobs") is True  # asked for them; none came back


def test_sl_cai_with_an_endpoint_writes_critiques_and_revisions(tmp_path, stories_hf):
    from rlhfstack.stages.cai_sl import train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Tom had a dog {i}."}) + "\n" for i in range(4))
    )
    with FakeChatServer(reply=feedback_reply) as server:
        cfg = to_object(
            load_config(
                "cai_sl",
                [
                    f"artifacts_dir={tmp_path / 'art'}",
                    f"model.path={stories_hf}",
                    f"data.train_path={prompts}",
                    "n_prompts=4",
                    "max_new_tokens=8",
                    "val_fraction=0.25",
                    "feedback.kind=endpoint",
                    "feedback.endpoint.model=happy-verdict",
                    f"feedback.endpoint.base_url={server.url}",
                    "feedback.endpoint.api_key_env=null",
                    "feedback.endpoint.requests_per_minute=0",
                    "cluster.num_threads=1",
                ],
            )
        )
        out = train(cfg)
        assert server.n_requests == 8  # one critique and one revision per prompt
    rows = read_jsonl(out / "revisions.jsonl")
    assert len(rows) == 4
    names = set(load_constitution("stories").names)
    for r in rows:
        assert r["principle"] in names
        assert r["critique"] == "The response is sad: the dog is lost."
        assert r["revision"] == "They played and were happy all day."
        assert r["revision_method"].startswith("critique_and_revision")
    sl = read_jsonl(out / "sl_train.jsonl") + read_jsonl(out / "sl_val.jsonl")
    assert len(sl) == 4 and {s["completion"] for s in sl} == {rows[0]["revision"]}
    done = json.loads((out / "done.json").read_text())
    assert done["feedback_model"]["name"] == "endpoint:happy-verdict"


def test_zero_human_label_pipeline_end_to_end(smoke: Path, tmp_path, monkeypatch):
    """SL-CAI -> fine-tune -> AI labels -> RM -> PPO -> eval on tiny settings, reusing the demo
    smoke run; every simulated labeler's utility is counted and must never be called."""
    from rlhfstack.pipeline import run_pipeline
    from rlhfstack.tasks import stories

    calls = {"n": 0}
    utility = stories.Labeler.utility

    def counted(self, features):
        calls["n"] += 1
        return utility(self, features)

    monkeypatch.setattr(stories.Labeler, "utility", counted)
    art = tmp_path / "rlaif"
    cfg = to_object(
        load_config("pipeline", ["+experiment=demo_rlaif_smoke", f"artifacts_dir={art}"])
    )
    cfg.stage_overrides["rlaif_data"] = [f"source_dir={smoke}"]
    cfg.stage_overrides["rlaif_eval"] = [
        f"reference_dir={smoke}",
        "max_new_tokens=8",
        "n_bootstrap=200",
    ]
    run_pipeline(cfg, command="pytest rlaif")
    assert calls["n"] == 0, "a simulated human labeler was called"
    # the counter does count: the noiseless judge pool asks each of its 4 labelers about A and B
    stories.judge_pool_noiseless(
        {k: np.zeros(1) for k in ("sentiment", "fluency_norm", "repetition", "length_words")},
        {k: np.zeros(1) for k in ("sentiment", "fluency_norm", "repetition", "length_words")},
    )
    assert calls["n"] == 8
    res = json.loads((art / "results.json").read_text())
    for k in ("rlaif_vs_sft", "rlaif_vs_rlhf"):
        w = res["winrate"][k]
        assert 0 <= w["rate"] <= 1 and len(w["ci95"]) == 2 and w["n"] == 256
    lab = res["ai_labeler"]
    assert 0 <= lab["agreement_gold"] <= 1 and lab["order_disagreement"] == 0.0
    assert set(lab["per_principle"]) == set(load_constitution("stories").names)
    for stage in ("cai_sl", "sft", "ai_labels", "rm", "ppo", "rlaif_eval"):
        assert res["cost"][stage]["cpu_seconds"] > 0, stage
    assert res["cost"]["feedback_model"]["cpu_seconds"] > 0
    samples = read_jsonl(art / "samples" / "rlaif.jsonl")
    ref = read_jsonl(smoke / "samples" / "sft.jsonl")
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in ref]
    assert set(samples[0]) == {"prompt", "completion"}
    pairs = read_jsonl(art / "ai_labels" / "prefs_train.jsonl")
    assert pairs and all(0.5 <= r["p_chosen"] <= 1 for r in pairs)
    assert (art / "cai_sl" / "policy" / "model" / "config.json").exists()
    assert read_jsonl(art / "cai_sl" / "revisions.jsonl")[0]["critique"] is None


def test_eval_report_gains_the_rlhf_vs_rlaif_section(tmp_path):
    from rlhfstack.evaluation.report import publish_report

    wr = lambda r: {"rate": r, "ci95": [r - 0.05, r + 0.05], "n": 256}  # noqa: E731
    res = {
        "n_prompts": 256,
        "winrate": {"rlaif_vs_sft": wr(0.66), "rlaif_vs_rlhf": wr(0.45), "rlhf_vs_sft": wr(0.69)},
        "ai_labeler": {
            "model": "embedding:m", "principles": "ensemble", "agreement_gold": 0.705,
            "agreement_human": 0.59, "humans_agreement_gold": 0.697, "order_disagreement": 0.0,
            "n_measured": 600, "n_labeled_pairs": 5400,
            "per_principle": {"happiness": {"agreement_gold": 0.64, "agreement_human": 0.56}},
        },
        "cost": {"ppo": {"cpu_seconds": 300.0}, "feedback_model": {"cpu_seconds": 90.0}},
    }  # fmt: skip
    art = tmp_path / "demo"
    art.mkdir()
    (art / "EVAL_REPORT.md").write_text("# Report\n")
    (tmp_path / "r.json").write_text(json.dumps(res))
    publish_report(art, tmp_path / "out.md", tmp_path / "assets")
    assert "RLAIF" not in (tmp_path / "out.md").read_text()  # no RLAIF run: no section
    publish_report(art, tmp_path / "out.md", tmp_path / "assets", tmp_path / "r.json")
    text = (tmp_path / "out.md").read_text()
    assert "## RLHF vs RLAIF" in text
    assert (
        "| RLAIF (PPO) | AI: `embedding:m` (ensemble over principles) | 0.705 | 0.660 [0.610, 0.710] (n=256) |"
        in text
    )
    assert "| RLHF (demo PPO) | simulated humans | 0.697 | 0.690" in text
    assert "RLAIF vs RLHF head to head (gold): 0.450" in text
    assert "| `happiness` | 0.640 | 0.560 |" in text and "feedback_model 90" in text


def test_sl_cai_recipe_fine_tunes_on_the_revisions_beside_them(tmp_path):
    from rlhfstack.stages.cai_sl import fine_tune_overrides

    cai = to_object(load_config("cai_sl", [f"artifacts_dir={tmp_path}"]))
    sft = to_object(load_config("sft", fine_tune_overrides(cai)))
    run_dir = Path(cai.run_dir).resolve()
    assert Path(sft.run_dir) == run_dir / "policy"
    assert Path(sft.data.train_path) == run_dir / "sl_train.jsonl"
    assert Path(sft.data.eval_path) == run_dir / "sl_val.jsonl"
    assert sft.model.path == cai.model.path  # the policy whose responses were revised
