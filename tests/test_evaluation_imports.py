"""Import boundaries of rlhfstack.evaluation: the pure modules load no models, the config layer
imports no evaluation code, and only evaluation.jobs reaches models / rollout."""

import subprocess
import sys

PURE = (
    "calibration",
    "detectors",
    "judges",
    "metrics",
    "mmlu",
    "overopt",
    "rm_eval",
    "rm_probes",
    "winrate",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_pure_evaluation_modules_import_no_models_rollout_or_stages():
    mods = ", ".join(f"rlhfstack.evaluation.{m}" for m in PURE)
    code = (
        f"import sys, {mods}; "
        "bad = sorted(m for m in sys.modules if m.startswith(("
        "'rlhfstack.models', 'rlhfstack.rollout', 'rlhfstack.stages', 'rlhfstack.evaluation.jobs'))); "
        "assert not bad, bad"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_config_imports_no_evaluation_code():
    code = (
        "import sys, rlhfstack.configs; "
        "bad = sorted(m for m in sys.modules if m.startswith('rlhfstack.evaluation')); "
        "assert not bad, bad"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_jobs_import():
    code = (
        "import rlhfstack.evaluation.jobs.judges, rlhfstack.evaluation.jobs.mmlu, "
        "rlhfstack.evaluation.jobs.overopt, rlhfstack.evaluation.jobs.plots, "
        "rlhfstack.evaluation.jobs.reward_hacking, rlhfstack.evaluation.jobs.rm_eval, "
        "rlhfstack.evaluation.jobs.winrate"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
