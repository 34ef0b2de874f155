"""EVAL_REPORT.md for the pipeline: pi_sft vs pi_dpo vs pi_ppo by metric, win-rates, RM, cost."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors import safe_open

from rlhfstack.dashboard import DASHBOARD_FILE
from rlhfstack.evaluation.overopt import GOLD_KEY, KL_KEY, PROXY_KEY, plot_gao_fits
from rlhfstack.runtime import atomic_write_text, read_jsonl, require


def _ci(d: dict) -> str:
    return f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def _wr(d: dict) -> str:
    return f"{d['rate']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] (n={d['n']})"


NOT_MEASURED = "n/a (not measured)"


def _num(value: float | None, fmt: str) -> str:
    """``value`` formatted, or :data:`NOT_MEASURED` when it is missing (never a made-up 0)."""
    return NOT_MEASURED if value is None else format(value, fmt)


def _resolved_config(run_dir: Path) -> dict[str, Any]:
    """A stage's resolved ``config.yaml`` ({} when the stage did not run)."""

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def parameter_count(model_dir: str | os.PathLike) -> int | None:
    """Parameters stored in an HF model directory's ``*.safetensors`` files (read from the file
    headers, no weights loaded); None when there are none."""

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n += int(np.prod(shape)) if shape else 1
    return n


def task_facts(art: str | os.PathLike) -> dict[str, Any]:
    """The task facts the report states, read from the run: the data stage's and the eval
    stage's resolved ``config.yaml`` and the base model's weights. A fact the run does not record
    is None."""
    art = Path(art)
    data, ev = _resolved_config(art / "data"), _resolved_config(art / "eval")
    model = data.get("model") or {}
    base = Path(model["path"]) if model.get("path") else art / "base_model"
    if not base.exists():  # a run directory moved since: its own base_model/
        base = art / base.name
    return {
        "base_model": model.get("name"),
        "base_model_parameters": parameter_count(base) if base.is_dir() else None,
        "label_flip_prob": data.get("flip_prob"),
        "temperature": ev.get("temperature"),
        "max_new_tokens": ev.get("max_new_tokens"),
    }


def _plot_gold_vs_proxy(art: Path) -> str | None:
    """PPO's periodic gold and proxy reward on the dev prompts: against the step (left), and
    against sqrt(KL) (Gao et al. 2022's axis; right) as points with the fitted RL curves
    ``R0 + d (alpha - beta log d)`` (:func:`rlhfstack.evaluation.overopt.plot_gao_fits`)."""
    mpath = art / "ppo" / "metrics.jsonl"
    if not mpath.exists():
        return None
    rows = [r for r in read_jsonl(mpath) if r.get(GOLD_KEY) is not None]
    if len(rows) < 2:
        return None
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    gold_C = np.array([r[GOLD_KEY] for r in rows], dtype=np.float64)
    proxy_C = np.array([r.get(PROXY_KEY, np.nan) for r in rows], dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(steps, gold_C, "o-", color="tab:orange", label="gold (hidden)")
    axes[0].plot(steps, proxy_C, "s-", color="tab:blue", label="proxy RM")
    axes[0].set_xlabel("PPO step")
    axes[0].set_ylabel("mean reward, dev prompts")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    kl_C = np.array([r[KL_KEY] for r in rows], dtype=np.float64)
    plot_gao_fits(axes[1], kl_C, {"gold": gold_C, "proxy": proxy_C}, form="rl")
    axes[1].set_xlabel("sqrt(KL to SFT), rollout batch")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    out = art / "plots" / "gold_vs_proxy.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".gold_vs_proxy.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return "plots/gold_vs_proxy.png"


def _winrate_table(L: list[str], winrate: dict, judge_winrate: dict) -> None:
    L.append("| pair | gold win-rate | judge-pool win-rate (noiseless annotators) |")
    L.append("|---|---|---|")
    for k, v in winrate.items():
        j = judge_winrate.get(k)
        L.append(f"| {k.replace('_vs_', ' vs ')} | {_wr(v)} | {_wr(j) if j else '-'} |")
    L.append("")


def results_table(results: dict[str, Any]) -> list[str]:
    """The headline of ``results.json`` as plain-text lines for a terminal: the test split's
    win-rates with their 95% CIs (gold judge and judge pool) and each target, met or missed."""
    n = results.get("n_prompts")
    rows = [("pair", "gold win-rate", "judge-pool win-rate")]
    for k, v in results.get("winrate", {}).items():
        j = results.get("judge_winrate", {}).get(k)
        rows.append((k.replace("_vs_", " vs "), _wr(v), _wr(j) if j else "-"))
    L = [f"Win-rates on the test split ({n} prompts; ties count half, 95% paired bootstrap CI):"]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    L += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    targets = results.get("targets", {})
    if targets:
        met = sum(bool(t.get("met")) for t in targets.values())
        L.append(f"Targets ({met} of {len(targets)} met):")
        trows = []
        for k, t in targets.items():
            value = _num(t.get("value"), ".3f")
            if t.get("ci95"):
                value += f" [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]"
            trows.append((k, value, "met" if t.get("met") else "MISSED"))
        widths = [max(len(r[i]) for r in trows) for i in range(3)]
        L += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in trows]
    return L


def render_report(art: Path, results: dict[str, Any]) -> str:
    per = results["policies"]
    names = [n for n in ("sft", "dpo", "ppo") if n in per]
    L: list[str] = []
    L.append("# Evaluation report: pi_sft vs pi_dpo vs pi_ppo (embedded demo)\n")
    L.append(f"Commit `{results['commit']}`; command: `{results['command'] or 'make demo'}`.\n")
    task = results.get("task") or task_facts(art)
    n_params = task.get("base_model_parameters")
    flip = task.get("label_flip_prob")
    L.append(
        "Task: continue a TinyStories opening positively while staying fluent (Ziegler et al. 2019), "
        f"base model {task.get('base_model') or NOT_MEASURED} "
        f"({_num(n_params, ',')} parameters), simulated annotators with "
        f"{_num(None if flip is None else 100 * flip, '.0f')}% label noise "
        "(AlpacaFarm), hidden gold reward = VADER sentiment + fluency under the frozen base model - "
        f"repetition (Gao et al. 2022 setup). {results['n_prompts']} test prompts (nothing was "
        "tuned on them), one sample per prompt and policy, temperature "
        f"{_num(task.get('temperature'), 'g')}, at most {_num(task.get('max_new_tokens'), 'd')} "
        "new tokens.\n"
    )
    L.append("## Win-rates (gold judge, ties count half, 95% paired bootstrap CI)\n")
    L.append(f"Test split ({results['n_prompts']} prompts: every number and target below):\n")
    _winrate_table(L, results["winrate"], results["judge_winrate"])
    if results.get("winrate_dev"):
        L.append(
            f"Dev split ({results.get('n_prompts_dev', NOT_MEASURED)} prompts: PPO's periodic gold "
            "evaluation and any tuning used these, so they may flatter the tuned policy):\n"
        )
        _winrate_table(L, results["winrate_dev"], results.get("judge_winrate_dev", {}))
    L.append("## Metrics by policy\n")
    L.append("| metric | " + " | ".join(f"pi_{n}" for n in names) + " |")
    L.append("|---|" + "---|" * len(names))
    rows = [
        ("gold reward (mean, 95% CI)", lambda d: _ci(d["gold_reward"])),
        ("proxy RM reward (normalized)", lambda d: _ci(d["proxy_reward"])),
        ("KL to pi_sft (nats/seq, k1)", lambda d: _ci(d["kl_to_sft"])),
        ("VADER sentiment", lambda d: f"{d['sentiment']:.3f}"),
        ("fluency (mean log-prob, base)", lambda d: f"{d['fluency']:.3f}"),
        ("length (tokens)", lambda d: f"{d['length_tokens']:.1f}"),
        ("ended with EOS", lambda d: f"{d['ended_frac']:.2f}"),
        ("distinct-1", lambda d: f"{d['distinct_1']:.3f}"),
        ("distinct-2", lambda d: f"{d['distinct_2']:.3f}"),
        ("repeated 3-grams", lambda d: f"{d['repetition_3gram']:.3f}"),
        ("held-out base-text NLL/token", lambda d: f"{d['heldout_nll_per_token']:.3f}"),
        ("alignment tax (NLL - SFT's)", lambda d: _num(d.get("alignment_tax_nll"), "+.3f")),
    ]
    for label, f in rows:
        L.append(f"| {label} | " + " | ".join(f(per[n]) for n in names) + " |")
    L.append("")
    L.append("## Targets\n")
    L.append("| target | value | met |")
    L.append("|---|---|---|")
    for k, v in results["targets"].items():
        val = v["value"]
        L.append(f"| {k} | {val:.3f} | {'yes' if v['met'] else '**missed**'} |")
    L.append("")
    rm = results["rm"]
    L.append("## Reward model\n")
    L.append(
        f"Held-out accuracy against the noisy labels: {rm['heldout_accuracy']:.3f}; against the gold "
        f"reward: {_num(rm.get('heldout_accuracy_gold'), '.3f')}; ECE {rm['heldout_ece']:.3f}. Normalization "
        f"(SFT samples as text with an EOS appended -> mean 0, std 1): gain "
        f"{rm['normalization']['gain']:.3f}, bias {rm['normalization']['bias']:.3f}. PPO and this "
        "report read the reward model at the last sampled token instead (no EOS where the length "
        "budget cut a sample), so pi_sft's proxy reward above is not 0.\n"
    )
    lab = results["labelers"]
    L.append(
        f"Simulated labelers ({lab['n_pairs']} pairs, flip rate {lab['flip_prob']}): agreement with gold "
        + ", ".join(f"{k} {v:.3f}" for k, v in lab["agreement_with_gold"].items())
        + f"; overall {lab['overall_agreement']:.3f}.\n"
    )
    L.append("![RM calibration](rm/calibration.png)\n")
    L.append("## Cost\n")
    L.append("| stage | CPU seconds | wall seconds | tokens processed |")
    L.append("|---|---|---|---|")
    for st, c in results["cost"].items():
        L.append(f"| {st} | {c['cpu_seconds']:.1f} | {c['wall_seconds']:.1f} | {c['tokens']:,} |")
    tot = sum(c["cpu_seconds"] for c in results["cost"].values())
    L.append(f"| total | {tot:.1f} | | |")
    L.append("")
    gp = _plot_gold_vs_proxy(art)
    L.append("## PPO diagnostics\n")
    if gp:
        L.append(f"![gold vs proxy]({gp})\n")
    if (art / "ppo" / DASHBOARD_FILE).exists():
        L.append(f"![PPO dashboard](ppo/{DASHBOARD_FILE})")
    L.append("")
    L.append("## Samples (first 5 test prompts)\n")
    samples = {n: read_jsonl(art / "samples" / f"{n}.jsonl") for n in names}
    for i in range(min(5, len(samples[names[0]]))):
        L.append(f"**Prompt:** {samples[names[0]][i]['prompt']}\n")
        for n in names:
            L.append(f"- pi_{n}: {samples[n][i]['completion']}")
        L.append("")
    return "\n".join(L) + "\n"


def write_eval_report(art: str | os.PathLike, results: dict[str, Any]) -> Path:
    art = Path(art)
    path = art / "EVAL_REPORT.md"
    atomic_write_text(path, render_report(art, results))
    return path


def render_rlaif_section(res: dict[str, Any]) -> str:
    """The "RLHF vs RLAIF" section from ``runs/demo_rlaif/results.json`` (``rlaif_eval`` stage)."""
    w, lab, cost = res["winrate"], res["ai_labeler"], res.get("cost", {})
    L = ["## RLHF vs RLAIF\n"]
    L.append(
        "RLAIF / Constitutional AI with zero human labels (`make demo-rlaif`, "
        "docs/algorithms/rlaif.md): SL-CAI, AI-labeled pairs, RM and PPO; gold win-rates on the "
        f"same {res.get('n_prompts')} test prompts as above (ties count half, 95% bootstrap CI).\n"
    )
    L.append(
        "| policy | its preference labels | labels' agreement with gold | gold win-rate vs SFT [95% CI] |"
    )
    L.append("|---|---|---|---|")
    L.append(
        f"| RLHF (demo PPO) | simulated humans | {_num(lab.get('humans_agreement_gold'), '.3f')} | "
        f"{_wr(w['rlhf_vs_sft']) if 'rlhf_vs_sft' in w else NOT_MEASURED} |"
    )
    L.append(
        f"| RLAIF (PPO) | AI: `{lab.get('model')}` ({lab.get('principles')} over principles) | "
        f"{_num(lab.get('agreement_gold'), '.3f')} | {_wr(w['rlaif_vs_sft'])} |"
    )
    if "sl_cai_vs_sft" in w:
        L.append(f"| SL-CAI (before PPO) | AI (revisions) | | {_wr(w['sl_cai_vs_sft'])} |")
    L.append("")
    L.append(f"RLAIF vs RLHF head to head (gold): {_wr(w['rlaif_vs_rlhf'])}.\n")
    L.append(
        "| AI labeler, one principle alone | agreement with gold | with the simulated humans |"
    )
    L.append("|---|---|---|")
    for name, m in (lab.get("per_principle") or {}).items():
        L.append(
            f"| `{name}` | {_num(m.get('agreement_gold'), '.3f')} | "
            f"{_num(m.get('agreement_human'), '.3f')} |"
        )
    L.append("")
    L.append(
        f"AI labeler: agreement with the simulated humans {_num(lab.get('agreement_human'), '.3f')}, "
        f"order disagreement {_num(lab.get('order_disagreement'), '.3f')} "
        f"({lab.get('n_labeled_pairs')} pairs labeled, {lab.get('n_measured')} measured). "
        "CPU seconds: "
        + ", ".join(f"{k} {v['cpu_seconds']:.0f}" for k, v in cost.items() if "cpu_seconds" in v)
        + ".\n"
    )
    return "\n".join(L) + "\n"


def publish_report(
    art: str | os.PathLike,
    dest_md: str | os.PathLike,
    assets_dir: str | os.PathLike,
    rlaif_results: str | os.PathLike | None = None,
    online_dpo_results: str | os.PathLike | None = None,
) -> None:
    """Copy ``art/EVAL_REPORT.md`` to ``dest_md`` with its images copied under ``assets_dir``;
    each of ``rlaif_results`` (``results.json`` of ``+experiment=demo_rlaif``: the "RLHF vs
    RLAIF" section) and ``online_dpo_results`` (of ``+experiment=demo_online_dpo``) that exists
    adds its section."""

    art, dest_md, assets_dir = Path(art), Path(dest_md), Path(assets_dir)
    text = (art / "EVAL_REPORT.md").read_text()
    for results, render in (
        (rlaif_results, render_rlaif_section),
        (online_dpo_results, render_online_dpo_section),
    ):
        if results is not None and Path(results).is_file():
            text = text.rstrip("\n") + "\n\n" + render(json.loads(Path(results).read_text()))
    assets_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(assets_dir, dest_md.parent)

    def repl(m):
        src = art / m.group(2)
        name = m.group(2).replace("/", "_")
        if src.exists():
            shutil.copyfile(src, assets_dir / name)
        return f"![{m.group(1)}]({rel}/{name})"

    atomic_write_text(dest_md, re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", repl, text))


def render_online_dpo_section(results: dict[str, Any]) -> str:
    """The "Offline vs online DPO" section from ``runs/demo_online_dpo/results.json``
    (``rlhfstack.evaluation.jobs.online_dpo``): gold win-rate against SFT, KL to SFT, labels,
    steps and cost per arm, the arms head to head, and the online arm's rounds."""
    per, rates = results["policies"], results["winrate"]
    arms = [a for a in per if a != "sft"]
    L = ["## Offline vs iterative online DPO at equal labels\n"]
    L.append(
        f"Commit `{results['commit']}`; command: `{results['command'] or 'make demo-online-dpo'}`; "
        f"the demo's {results['n_prompts']} test prompts, sampled as the demo's evaluation samples "
        "them (pi_sft's samples are the demo's own). Gold win-rate against pi_sft, ties count "
        "half, 95% paired bootstrap CI; KL to pi_sft in nats per sequence (k1, on the policy's "
        "own samples); cost is the arm's training (sampling and labeling included).\n"
    )
    L.append("| arm | gold win-rate vs SFT | gold reward | KL to SFT | labels | steps | CPU s |")
    L.append("|---|---|---|---|---|---|---|")
    for a in arms:
        d = per[a]
        L.append(
            f"| {a} | {_wr(rates[f'{a}_vs_sft'])} | {_ci(d['gold_reward'])} | "
            f"{_ci(d['kl_to_sft'])} | {_num(d.get('labels'), ',')} | {_num(d.get('steps'), 'd')} "
            f"| {_num(d.get('cost', {}).get('cpu_seconds'), '.1f')} |"
        )
    L.append(f"| sft | - | {_ci(per['sft']['gold_reward'])} | 0 | - | - | - |")
    L.append("")
    for k, v in rates.items():
        if not k.endswith("_vs_sft"):
            L.append(f"Head to head, {k.replace('_vs_', ' vs ')}: {_wr(v)}.\n")
    for a in arms:
        rounds = per[a].get("rounds")
        if not rounds:
            continue
        L.append(f"Rounds of {a} (statistics of the pairs each round sampled from its policy):\n")
        L.append(
            "| round | labels | steps | samples' gold | labels agreeing with gold | KL to SFT |"
        )
        L.append("|---|---|---|---|---|---|")
        for r in rounds:
            L.append(
                f"| {r['round']} | {r['labels']:,} | {r['steps']} | "
                f"{_num(r.get('online/samples_gold'), '.3f')} | "
                f"{_num(r.get('online/label_gold_agreement'), '.3f')} | "
                f"{_num(r.get('online/samples_kl_to_start'), '.2f')} |"
            )
        L.append("")
    return "\n".join(L) + "\n"
