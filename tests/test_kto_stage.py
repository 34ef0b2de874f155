"""KTO as ``dpo.loss_type=kto``: the mismatched pairs of its KL reference point, its loss over
pairs read as unpaired examples, and the stage end to end (one process; FSDP2 in
test_distributed_recipe.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfstack.data.schemas import PreferenceExample
from rlhfstack.stages.dpo import _under_reference, derangement, kto_pair_loss, mismatched_pairs

REPO = Path(__file__).resolve().parent.parent


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 101):
        s = derangement(n, seed=0)
        assert sorted(s) == list(range(n))  # a permutation
        assert all(s[i] != i for i in range(n))  # no pair meets its own responses
    assert derangement(10, 0) == derangement(10, 0) != derangement(10, 1)
    with pytest.raises(ValueError, match="at least 2 examples"):
        derangement(1, 0)


def test_mismatched_pairs_keep_the_prompt_and_take_the_other_responses():
    pairs = [PreferenceExample(f"p{i}", f"c{i}", f"r{i}") for i in range(3)]
    out = mismatched_pairs(pairs, [2, 0, 1])
    assert [(e.prompt, e.chosen, e.rejected) for e in out] == [
        ("p0", "c2", "r2"),
        ("p1", "c0", "r0"),
        ("p2", "c1", "r1"),
    ]


def test_kto_pair_loss_at_the_reference_is_half_lambda():
    # policy == reference: r = 0 and z0 = 0, so every example costs lambda (1 - sigmoid(0)) = lambda / 2
    lp = torch.tensor([-3.0, -5.0])
    kl = torch.tensor([[-4.0, -6.0], [-2.0, -7.0]])
    losses, cr, rr, z0 = kto_pair_loss(lp, lp - 1, lp, lp - 1, kl, kl, 0.1, 1.0, 2.0)
    assert losses.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert cr.tolist() == rr.tolist() == [0.0, 0.0] and float(z0) == 0.0


def test_kto_pair_loss_arithmetic():
    pc, pr = torch.tensor([-2.0]), torch.tensor([-4.0])
    ref_c, ref_r = torch.tensor([-3.0]), torch.tensor([-3.0])
    kl_pol, kl_ref = torch.tensor([[-1.5, -2.7]]), torch.tensor([[-2.0, -3.0]])
    # r_c = -2 - (-3) = +1, r_r = -4 - (-3) = -1, z0 = mean(0.5, 0.3) = 0.4, beta = 1
    losses, cr, rr, z0 = kto_pair_loss(pc, pr, ref_c, ref_r, kl_pol, kl_ref, 1.0, 1.0, 1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(z0) == pytest.approx(0.4)
    # desirable: 1 - sigmoid(r_c - z0) = 1 - sigmoid(0.6); undesirable: 1 - sigmoid(z0 - r_r) = 1 - sigmoid(1.4)
    assert losses.tolist() == pytest.approx([1 - sig(0.6), 1 - sig(1.4)])
    assert cr.item() == pytest.approx(1.0) and rr.item() == pytest.approx(-1.0)
    # no gradient through z0: d loss_D / d pc = -sigmoid'(0.6)
    pc.requires_grad_(True)
    kl_pol.requires_grad_(True)
    losses, *_ = kto_pair_loss(pc, pr, ref_c, ref_r, kl_pol, kl_ref, 1.0, 1.0, 1.0)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-sig(0.6) * (1 - sig(0.6)))
    assert kl_pol.grad is None


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def test_kto_stage_starts_at_half_and_learns(arts, tmp_path, launch_env, story_prefs):
    prefs = story_prefs
    run = tmp_path / "kto"
    cmd = [
        sys.executable,
        "recipes/train_dpo.py",
        "+experiment=demo",
        f"model.path={arts}/base_model",
        f"data.train_path={prefs}",
        "dpo.loss_type=kto",
        "dpo.beta=0.5",
        "trainer.max_steps=8",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-3",
        f"artifacts_dir={arts}",
        f"run_dir={run}",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 9))
    # step 1 runs before any update: policy == reference, so z0 = 0 and every example costs 1/2
    assert m[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert m[0]["kto_kl_ref_raw"] == pytest.approx(0.0, abs=1e-5)
    assert m[0]["chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert m[-1]["loss"] < 0.45
    assert m[-1]["reward_margin"] > 0
    # the mismatched pairs are rescored by the trained policy every step: the raw estimate moves
    assert abs(m[-1]["kto_kl_ref_raw"]) > 1e-3
    assert m[-1]["kto_kl_ref"] == pytest.approx(max(m[-1]["kto_kl_ref_raw"], 0.0))
    assert (run / "model" / "config.json").is_file()


def test_unknown_loss_type_is_an_error_before_any_work(arts, tmp_path, launch_env):
    cmd = [
        sys.executable,
        "recipes/train_dpo.py",
        "+experiment=demo",
        f"model.path={arts}/base_model",
        "dpo.loss_type=kt0",
        f"artifacts_dir={arts}",
        f"run_dir={tmp_path / 'x'}",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "dpo.loss_type='kt0'" in p.stdout + p.stderr


# ----------------------------------------------------------------------------- unpaired data


def _unpaired(tmp_path: Path, rows: list[dict] | None = None) -> Path:
    if rows is None:
        rows = []
        for k, n in enumerate(("Tom", "Lily", "Ben", "Sue")):
            for j, t in enumerate(("ball", "dog", "cat", "cake", "bird")):
                good = (k + j) % 3 != 0  # unbalanced, and no prompt has both kinds
                text = (
                    f" {n} was happy and played with the {t}."
                    if good
                    else f" {n} was sad. The {t} ran away and {n} cried all day long."
                )
                rows.append(
                    {
                        "prompt": f"Once upon a time, {n} saw a {t}.",
                        "completion": text,
                        "label": good,
                    }
                )
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kto_unpaired_cmd(arts: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "recipes/train_dpo.py",
        "+experiment=demo",
        f"model.path={arts}/base_model",
        f"data.train_path={data}",
        "dpo.loss_type=kto",
        "dpo.kto_unpaired=true",
        f"artifacts_dir={arts}",
        f"run_dir={run}",
        "logging.tensorboard=false",
        "logging.plots=false",
        "cluster.num_threads=1",
        *extra,
    ]


def test_load_unpaired_rows_and_label_errors(tmp_path):
    from rlhfstack.data import DataError, UnpairedExample, load_unpaired

    rows = [
        {"prompt": "Hi", "completion": " there", "label": True},
        {"prompt": "Hi", "completion": [{"role": "assistant", "content": " no"}], "label": False},
    ]
    ex, rep = load_unpaired(_unpaired(tmp_path, rows), template="plain")
    assert ex == [UnpairedExample("Hi", " there", True), UnpairedExample("Hi", " no", False)]
    bad = _unpaired(tmp_path, [*rows, {"prompt": "Hi", "completion": " x", "label": "yes"}])
    with pytest.raises(DataError, match=r"unpaired.jsonl:3: field 'label': expected true or false"):
        load_unpaired(bad, template="plain")


def test_kto_unpaired_stage_starts_at_half_and_learns(arts, tmp_path, launch_env):
    data, run = _unpaired(tmp_path), tmp_path / "kto_u"
    cmd = _kto_unpaired_cmd(
        arts,
        data,
        run,
        "dpo.beta=0.5",
        "dpo.kto_desirable_weight=1.0",
        "dpo.kto_undesirable_weight=2.0",  # 13 desirable vs 7 undesirable: ratio 0.93
        "trainer.max_steps=8",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-3",
    )
    p = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "13 desirable, 7 undesirable" in out and "outside [1, 4/3]" in out
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 9))
    # step 1, policy == reference: r = z0 = 0, so the loss is the step's mean of lambda_y / 2
    frac = m[0]["desirable_fraction"]
    assert m[0]["loss"] == pytest.approx(0.5 * (frac * 1.0 + (1 - frac) * 2.0), abs=1e-6)
    assert m[0]["kto_kl_ref_raw"] == pytest.approx(0.0, abs=1e-5)
    assert m[0]["signed_reward"] == pytest.approx(0.0, abs=1e-5)
    assert m[-1]["signed_reward"] > 0.1 and m[-1]["reward_accuracy"] > 0.5
    assert m[-1]["loss"] < m[0]["loss"]
    assert abs(m[-1]["kto_kl_ref_raw"]) > 1e-3
    assert (run / "model" / "config.json").is_file()


def test_kto_unpaired_config_errors(arts, tmp_path, launch_env):
    only_good = _unpaired(
        tmp_path, [{"prompt": f"p{i}", "completion": f" c{i}", "label": True} for i in range(4)]
    )
    p = subprocess.run(
        _kto_unpaired_cmd(arts, only_good, tmp_path / "a"),
        cwd=REPO,
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "got 4 desirable and 0 undesirable" in p.stdout + p.stderr
    cmd = [
        c for c in _kto_unpaired_cmd(arts, only_good, tmp_path / "b") if c != "dpo.loss_type=kto"
    ]
    p = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=300)
    assert (
        p.returncode != 0 and "dpo.kto_unpaired=true needs dpo.loss_type=kto" in p.stdout + p.stderr
    )


def test_kto_unpaired_torchrun_dp2_matches_one_process(arts, tmp_path, launch_env):
    data = _unpaired(tmp_path)
    extra = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.micro_batch_size=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmds = [
        _kto_unpaired_cmd(arts, data, one, *extra),
        [*torchrun, *_kto_unpaired_cmd(arts, data, two, *extra)[1:], "parallel.dp_shard=2"],
    ]
    procs = [
        subprocess.Popen(
            c, cwd=REPO, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in cmds
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        for k in ("loss", "grad_norm", "signed_reward"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
        assert b["kto_kl_ref_raw"] == pytest.approx(a["kto_kl_ref_raw"], rel=1e-4, abs=1e-5)


def test_reference_scores_under_lora_are_the_adapter_free_policy():
    # under LoRA there is no reference copy: the policy with its adapter switched off is pi_ref,
    # scored without gradients; with a reference model, that model is scored
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    base = LlamaForCausalLM(cfg)
    ref = copy.deepcopy(base)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(base, lora)  # random B: the adapter changes the outputs
    ids_BT = torch.tensor([[1, 5, 7, 9]])

    def score(m):
        return m(input_ids=ids_BT).logits

    off = _under_reference(None, policy, score)
    assert not off.requires_grad
    torch.testing.assert_close(off, ref(input_ids=ids_BT).logits)
    assert not torch.allclose(off, score(policy))  # the adapter is back on afterwards
    torch.testing.assert_close(_under_reference(ref, policy, score), off)
