"""Acceptance: a non-editable install into a fresh venv works from any directory.

``python -m venv``, ``pip install -c constraints.txt .`` (torch 2.13.0 comes from local disk; the
rest from the package index), then, from a directory outside the checkout: ``rlhf list`` and
``rlhf pipeline +experiment=demo_smoke run_dir=DIR`` to the end. The config tree is the wheel's
copy (``site-packages/rlhfstack/conf``), not the checkout's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_fresh_venv_install_runs_list_and_the_smoke_pipeline_from_elsewhere(tmp_path, data_root):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    p = subprocess.run(
        [*pip, "install", "-q", "-c", str(REPO / "constraints.txt"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-4000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(RLHF_DATA_ROOT=str(data_root), HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    rlhf = str(venv / "bin" / "rlhf")

    def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout
        )

    conf = run(
        str(venv / "bin" / "python"), "-c", "import rlhfstack.configs as c; print(c.CONF_DIR)"
    )
    assert conf.returncode == 0, conf.stderr[-2000:]
    assert Path(conf.stdout.strip()) == next(venv.glob("lib/python*/site-packages/rlhfstack/conf"))

    listing = run(rlhf, "list")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "demo_smoke" in listing.stdout and "pipeline" in listing.stdout

    out = tmp_path / "smoke"
    smoke = run(rlhf, "pipeline", "+experiment=demo_smoke", f"run_dir={out}", timeout=1800)
    assert smoke.returncode == 0, (smoke.stdout + smoke.stderr)[-4000:]
    for stage in ("data", "sft", "rm", "ppo", "dpo", "eval"):
        assert (out / stage / "done.json").exists(), stage
    assert (out / "results.json").exists()
    assert not (elsewhere / "runs").exists()  # everything went to run_dir
    printed = smoke.stdout + smoke.stderr
    assert "== pipeline done" in printed and "Win-rates on the test split" in printed

    # the exported RM: plain transformers in the fresh venv scores as the project's loader
    check = tmp_path / "check_rm.py"
    check.write_text(RM_CHECK)
    scored = run(str(venv / "bin" / "python"), str(check), str(out / "rm" / "model"), timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert scored.stdout.strip().endswith("max abs diff ok"), scored.stdout[-2000:]


RM_CHECK = """
import sys

import torch
from transformers import AutoModelForSequenceClassification

from rlhfstack.models.core import RewardModel, load_tokenizer
from rlhfstack.models.encoders import encode_for_reward, score_texts

rm_dir = sys.argv[1]
prompts = ["Once upon a time", "Lily had a cat.", "Tom"]
responses = [" there was a big dog. It was happy.", " It liked to play.", " ran to the park."]
tok = load_tokenizer(rm_dir)
ours = score_texts(RewardModel.load(rm_dir), tok, prompts, responses)["mean"]
hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
ids = [e[0] for e in encode_for_reward(tok, "causal_lm", prompts, responses, 128)]
T = max(len(x) for x in ids)
ids_BT = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])
with torch.no_grad():
    logits = hf(input_ids=ids_BT, attention_mask=(ids_BT != tok.pad_token_id)).logits[:, 0]
diff = float((logits + hf.config.reward_offset - ours).abs().max())
print("scores", ours.tolist(), "diff", diff)
assert diff < 1e-5, diff
print("max abs diff ok")
"""
