"""MMLU through lm-evaluation-harness on the local CSVs, few-shot fitting, alignment tax."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhfstack.evaluation.mmlu import (
    FewshotChoice,
    accuracy_summary,
    alignment_tax,
    choose_num_fewshot,
    list_subjects,
    read_mmlu_csv,
    wilson_ci,
    write_task_yamls,
)

SUBJECTS = ["anatomy", "high_school_geography"]


@pytest.fixture(scope="module")
def mmlu_dir(data_root):
    path = data_root / "benchmarks" / "mmlu"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def test_read_csv_keeps_every_cell_a_string(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"Q, with comma?",None,0.50,NA,007,2\n'
    )
    rows = read_mmlu_csv(path)
    assert rows == [
        {"question": "Q, with comma?", "choices": ["None", "0.50", "NA", "007"], "answer": 2}
    ]
    path.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n")
    with pytest.raises(ValueError, match="0-based"):
        read_mmlu_csv(path)
    path.write_text("q,a,b,c,d,answer\n")
    with pytest.raises(ValueError, match="header"):
        read_mmlu_csv(path)


def test_subjects_are_discovered(mmlu_dir):
    subjects = list_subjects(mmlu_dir)
    assert len(subjects) == 57
    assert "anatomy" in subjects and "high_school_geography" in subjects


def test_local_task_yaml_renders_the_standard_prompt(mmlu_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    names = write_task_yamls(mmlu_dir, ["anatomy"], tmp_path, num_fewshot=5)
    assert names == {"anatomy": "rlhf_mmlu_anatomy"}
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = tm.load(["rlhf_mmlu_anatomy"])["tasks"]["rlhf_mmlu_anatomy"]
    task.set_fewshot_seed(0)
    docs = list(task.eval_docs)
    assert len(docs) == len(read_mmlu_csv(mmlu_dir / "test" / "anatomy_test.csv"))
    dev = read_mmlu_csv(mmlu_dir / "dev" / "anatomy_dev.csv")
    ctx = task.fewshot_context(docs[0], 1)
    letter = "ABCD"[dev[0]["answer"]]
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        f"{dev[0]['question'].strip()}\nA. {dev[0]['choices'][0]}"
    )
    assert f"Answer: {letter}\n\n" in ctx
    assert ctx.endswith(f"D. {docs[0]['choices'][3]}\nAnswer:")
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
    assert (tmp_path / "_rlhf_mmlu_group.yaml").exists()


def test_choose_num_fewshot_reduces_shots_to_fit():
    # each shot adds 100 "tokens"; the question itself 50..149
    questions = [50 + i for i in range(100)]

    def contexts_for(k):
        return ["x" * (100 * k + q) for q in questions]

    n_tokens = len
    assert choose_num_fewshot(contexts_for, n_tokens, 5, 10_000) == FewshotChoice(5, 1.0, 0)
    # 512 positions: 4 shots = 450..549 (+2 for " A") -> only 61% fit; 3 shots always fits
    assert choose_num_fewshot(contexts_for, n_tokens, 5, 512).num_fewshot == 3
    # nothing fits even at 0 shots -> 0 shots, all truncated
    ch = choose_num_fewshot(contexts_for, n_tokens, 5, 10)
    assert ch == FewshotChoice(0, 0.0, 100)
    # a relaxed fit fraction keeps more shots
    assert choose_num_fewshot(contexts_for, n_tokens, 5, 512, min_fit_fraction=0.5).num_fewshot == 4


def test_wilson_and_accuracy_summary():
    lo, hi = wilson_ci(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.192, abs=0.005)
    assert wilson_ci(0, 10)[0] == 0.0
    s = accuracy_summary([1, 0, 1, 1])
    assert s["accuracy"] == 0.75 and s["n"] == 4


def test_alignment_tax_paired_and_unpaired():
    rng = np.random.default_rng(0)
    ids = [f"s/{i}" for i in range(400)]
    base = {k: float(v) for k, v in zip(ids, rng.random(400) < 0.6, strict=True)}
    same = alignment_tax(dict(base), base)
    assert same["alignment_tax"] == 0.0 and same["ci95"] == [0.0, 0.0]
    # the policy forgets 60 of the baseline's correct answers: tax = 0.15, CI excludes 0
    policy = dict(base)
    for k in [k for k, v in base.items() if v == 1.0][:60]:
        policy[k] = 0.0
    tax = alignment_tax(policy, base, n_boot=1000)
    assert tax["method"] == "paired_bootstrap" and tax["n"] == 400
    assert tax["alignment_tax"] == pytest.approx(0.15)
    assert 0.0 < tax["ci95"][0] < 0.15 < tax["ci95"][1]
    assert tax["ci95_normal"][0] > 0.0
    # disjoint ids -> unpaired normal approximation
    other = {f"t/{i}": v for i, v in enumerate(policy.values())}
    unp = alignment_tax(other, base)
    assert unp["method"] == "unpaired_normal"
    assert unp["alignment_tax"] == pytest.approx(0.15)
    assert unp["ci95"][1] - unp["ci95"][0] > tax["ci95"][1] - tax["ci95"][0]


def test_config_composes():
    from rlhfstack.configs import MMLUEvalConfig, load_config, to_object

    cfg = to_object(load_config("mmlu", ["model_path=/m", "subjects=[anatomy]", "limit=3"]))
    assert isinstance(cfg, MMLUEvalConfig)
    assert cfg.subjects == ["anatomy"] and cfg.limit == 3 and cfg.num_fewshot == 5
    with pytest.raises(Exception, match="num_fewshots"):
        load_config("mmlu", ["model_path=/m", "num_fewshots=3"])


def test_mmlu_end_to_end_on_tiny_model(stories_hf, mmlu_dir, tmp_path):
    """2 subjects x 3 questions through HFLM on the converted stories260K (512 positions), with
    an earlier run's results as the baseline."""
    pytest.importorskip("lm_eval")
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.evaluation.mmlu import run_mmlu

    # a fabricated earlier baseline run that got every question right
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    ids = [f"{s}/{i}" for s in SUBJECTS for i in range(3)]
    (base_dir / "mmlu.json").write_text(json.dumps({"accuracy": 1.0, "n": 6}))
    (base_dir / "mmlu_items.json").write_text(json.dumps({"policy": dict.fromkeys(ids, 1.0)}))

    out = tmp_path / "out"
    cfg = to_object(
        load_config(
            "mmlu",
            [
                f"model_path={stories_hf}",
                f"output_dir={out}",
                f"subjects=[{','.join(SUBJECTS)}]",
                "limit=3",
                f"baseline_results={base_dir}",
                "batch_size=16",
            ],
        )
    )
    res = run_mmlu(cfg)
    written = json.loads((out / "mmlu.json").read_text())
    assert written["accuracy"] == res["accuracy"]
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n"] == 6
    assert set(res["per_subject"]) == set(SUBJECTS)
    for sub in res["per_subject"].values():
        assert sub["n"] == 3
        assert sub["num_fewshot"] < 5  # 5-shot prompts do not fit in 512 positions
    assert res["max_length"] == 512
    assert any("5-shot prompts exceed" in w for w in res["warnings"])
    items = json.loads((out / "mmlu_items.json").read_text())["policy"]
    assert sorted(items) == sorted(ids)
    tax = res["alignment_tax"]
    assert tax["method"] == "paired_bootstrap" and tax["n"] == 6
    assert tax["alignment_tax"] == pytest.approx(1.0 - res["accuracy"])
    assert (out / "lm_eval_tasks" / "rlhf_mmlu_anatomy.yaml").exists()
    assert (out / "config.yaml").exists()


@pytest.mark.slow
def test_mmlu_cli_with_baseline_model(stories_hf, mmlu_dir, tmp_path):
    """The CLI, 2 subjects x 5 questions, the same model as policy and baseline: tax 0."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "eval" / "mmlu.py"),
            f"model_path={stories_hf}",
            f"baseline_path={stories_hf}",
            f"output_dir={out}",
            f"subjects=[{','.join(SUBJECTS)}]",
            "limit=5",
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "mmlu.json").read_text())
    assert res["n"] == 10
    assert res["alignment_tax"]["alignment_tax"] == 0.0
    assert res["baseline"]["accuracy"] == res["accuracy"]
