"""``python eval/winrate.py`` end to end with two LLM judges served by a real local HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_judges_llm import FakeChatServer

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-cli-SECRET-9876543210"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_winrate_cli_llm_judges_cache_and_secret(tmp_path, data_root):
    prompts = [f"Write about thing {i}." for i in range(8)]
    a = [("happy " if i % 2 else "") + "a" * (5 + i) for i in range(8)]
    b = ["b" * 9 for _ in range(8)]
    b[3] = a[3]  # one identical pair: a tie, no request
    fa = _write(tmp_path / "a.jsonl", [{"prompt": p, "completion": x} for p, x in zip(prompts, a)])
    # B in another order: pairing is by prompt
    fb = _write(
        tmp_path / "b.jsonl",
        [{"prompt": p, "completion": x} for p, x in reversed(list(zip(prompts, b)))],
    )
    out, cache = tmp_path / "out", tmp_path / "cache" / "judge.sqlite"
    with FakeChatServer(n_429=1, api_key=SECRET) as server:
        overrides = [
            f"a={fa}",
            f"b={fb}",
            "judges=[llm,kw]",
            f"output_dir={out}",
            f"cache_path={cache}",
            "llm.model=longer",
            f"llm.base_url={server.url}",
            "llm.api_key_env=JUDGE_TEST_KEY",
            "llm.requests_per_minute=0",
            "+llm_judges.kw.model=keyword",
            "n_bootstrap=200",
            "lc_n_bootstrap=20",
        ]
        env = {**os.environ, "JUDGE_TEST_KEY": SECRET, "RLHF_DATA_ROOT": str(data_root)}
        proc = subprocess.run(
            [sys.executable, "eval/winrate.py", *overrides],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        n_judged = 7  # 8 pairs, one identical
        assert server.n_requests == 2 * 2 * n_judged + 1  # 2 judges x 2 orders, + one 429
        assert all(h == f"Bearer {SECRET}" for h in server.auth_headers)
        # the judges saw the MT-Bench pair-v2 prompt from the shared data
        assert "impartial judge" in server.bodies[-1]["messages"][0]["content"]

        res = json.loads((out / "winrate.json").read_text())
        longer = [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]
        assert res["per_judge"]["llm"]["rate"] == sum(longer) / 8
        assert res["per_judge"]["llm"]["position_consistency"] == 1.0
        assert res["per_judge"]["llm"]["stats"]["n_retries"] >= 1
        assert res["n"] == 8 and res["n_identical"] == 1
        lo, hi = res["ci95"]
        assert lo <= res["rate"] <= hi
        assert res["agreement"]["method"] == "cohen"
        assert res["length_controlled_rate"] is not None
        assert set(res["length_controlled"]["coefficients"]) == {"model", "length", "instruction"}
        assert res["config"]["llm"]["api_key_env"] == "JUDGE_TEST_KEY"
        assert (out / "judgments.jsonl").exists() and (out / "config.yaml").exists()

        # the key is nowhere on disk nor in the logs
        files = [p for p in out.rglob("*") if p.is_file()] + [cache]
        for p in files:
            assert SECRET.encode() not in p.read_bytes(), p
        assert SECRET not in proc.stdout + proc.stderr

        # rerun (in process, same config): everything comes from the cache -> 0 requests
        from rlhfstack.configs import load_config, to_object
        from rlhfstack.evaluation.jobs.winrate import run_winrate

        os.environ["JUDGE_TEST_KEY"] = SECRET
        try:
            before = server.n_requests
            res2 = run_winrate(to_object(load_config("winrate", overrides)))
        finally:
            del os.environ["JUDGE_TEST_KEY"]
        assert server.n_requests == before
        assert res2["per_judge"]["llm"]["stats"]["n_requests"] == 0
        assert res2["rate"] == res["rate"]
