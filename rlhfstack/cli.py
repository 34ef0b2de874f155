"""The ``rlhf`` command: one subcommand per stage, the pipeline, each evaluation job, export, list.

    rlhf list                                          experiments, their stage and what they are
    rlhf sft +experiment=demo trainer.max_steps=20     a stage (also rm, ppo, dpo, data)
    rlhf pipeline +experiment=demo_smoke run_dir=DIR   data -> sft -> rm -> ppo -> dpo -> eval
    rlhf dpo -m dpo.beta=0.05,0.2 +experiment=demo     a Hydra sweep: one run_dir per job
    rlhf winrate a=A.jsonl b=B.jsonl judge=gold        an evaluation job (see ``rlhf --help``)
    rlhf export --model runs/demo/ppo/model --out DIR  one servable HF directory
    rlhf ppo --help                                    the fields, their defaults and meaning

Every subcommand but ``list`` and ``export`` takes Hydra overrides, exactly as the entry points
under ``recipes/`` and ``eval/`` do (they call :func:`run_command` too). Before Hydra creates any
directory, :func:`precheck` composes the config and checks it: an experiment meant for another
stage, a value outside a field's allowed ones, a missing input model or data file end the command
with one message and exit status 2. A stage whose ``run_dir`` holds ``done.json`` is finished: it
is not trained again unless ``overwrite=true``.

The stages, torch and the evaluation jobs are imported when a command runs, not with this module:
``rlhf list`` and ``--help`` answer without loading them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhfstack.configs import (
    CONF_DIR,
    EVAL_ENTRY_SCHEMAS,
    EVAL_SUITE_SCHEMAS,
    RENAMED_KEYS,
    STAGE_SCHEMAS,
    PipelineConfig,
    RMEvalConfig,
    load_config,
    to_object,
)
from rlhfstack.configs.checks import CHECK

EXIT_USAGE = 2
"""Exit status of a command stopped by :func:`precheck` (as argparse's usage errors)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its primary config in ``conf/``, the function it runs and one line of help."""

    config: str
    """Primary config name (``conf/<config>.yaml``)."""
    target: str
    """``module:function`` called with the typed config."""
    about: str
    """One line for ``rlhf --help``."""
    stage: str | None = None
    """The training stage it runs (``run_dir``, ``done.json``, experiments of that stage)."""
    entry: str = ""
    """The equivalent entry point in the repository."""


COMMANDS: dict[str, Command] = {
    "data": Command(
        "demo_data",
        "rlhfstack.stages.demo_data:train",
        "the embedded task's data: prompts, base samples, simulated preference labels",
        "data",
        "recipes/make_demo_data.py",
    ),
    "sft": Command(
        "sft", "rlhfstack.stages.sft:train", "supervised fine-tuning", "sft", "recipes/train_sft.py"
    ),
    "rm": Command(
        "rm",
        "rlhfstack.stages.reward_model:train",
        "reward model (Bradley-Terry)",
        "rm",
        "recipes/train_rm.py",
    ),
    "ppo": Command(
        "ppo",
        "rlhfstack.cli:_train_ppo",
        "PPO / GRPO / RLOO against a reward model, KL to the SFT model",
        "ppo",
        "recipes/train_ppo.py",
    ),
    "dpo": Command(
        "dpo",
        "rlhfstack.stages.dpo:train",
        "DPO / IPO / KTO from the SFT model",
        "dpo",
        "recipes/train_dpo.py",
    ),
    "cai-sl": Command(
        "cai_sl",
        "rlhfstack.cli:_train_cai_sl",
        "SL-CAI: critiques and revisions of the policy's responses, then SFT on the revisions",
        None,
        "recipes/train_cai_sl.py",
    ),
    "ai-labels": Command(
        "ai_labels",
        "rlhfstack.stages.ai_labels:train",
        "RL-CAI labels: preference pairs soft-labeled by the AI feedback model",
        None,
        "recipes/pipeline.py +experiment=demo_rlaif",
    ),
    "pipeline": Command(
        "pipeline",
        "rlhfstack.cli:_run_pipeline",
        "every stage in order: data -> sft -> rm -> ppo -> dpo -> eval",
        None,
        "recipes/pipeline.py",
    ),
    "evaluate": Command(
        "evaluate",
        "rlhfstack.cli:_run_demo_eval",
        "the demo's evaluation suite: win-rates, RM checks, report",
        None,
        "eval/evaluate_demo.py",
    ),
    "winrate": Command(
        "winrate",
        "rlhfstack.evaluation.jobs.winrate:run_winrate",
        "win-rate of samples A over B (gold, reward model or LLM judges)",
        None,
        "eval/winrate.py",
    ),
    "generate": Command(
        "generate_samples",
        "rlhfstack.evaluation.jobs.winrate:run_generate_samples",
        "one completion per prompt from a model directory or an OpenAI-compatible endpoint",
        None,
        "eval/generate_samples.py",
    ),
    "hh-eval": Command(
        "hh_eval",
        "rlhfstack.evaluation.jobs.winrate:run_hh_eval",
        "helpful/harmless win-rates judged by an LLM",
        None,
        "eval/hh_eval.py",
    ),
    "rm-eval": Command(
        "rm_eval",
        "rlhfstack.evaluation.jobs.rm_eval:run_rm_eval",
        "score a trained reward model on a preference file",
        None,
        "eval/rm_eval.py",
    ),
    "mmlu": Command(
        "mmlu", "rlhfstack.evaluation.jobs.mmlu:run_mmlu", "MMLU accuracy", None, "eval/mmlu.py"
    ),
    "overoptimization": Command(
        "overoptimization",
        "rlhfstack.evaluation.jobs.overopt:run_overoptimization",
        "gold vs proxy reward against KL (Gao et al. 2022 fits)",
        None,
        "eval/overoptimization.py",
    ),
    "reward-hacking": Command(
        "reward_hacking",
        "rlhfstack.evaluation.jobs.reward_hacking:run_reward_hacking",
        "reward-hacking detectors on a PPO run",
        None,
        "eval/reward_hacking.py",
    ),
}

OTHER_COMMANDS = {
    "list": "experiments (conf/experiment/) with their stage and a one-line description",
    "export": "one servable HF directory (safetensors, LoRA merged, one dtype); --help for flags",
}

#: ``(command, key) -> key``: ``rlhf generate model=URL`` names a path or URL, not a conf/model
#: choice; the pipeline's output directory is ``artifacts_dir`` (each stage in ``<it>/<stage>``)
_ALIASES = {("generate", "model"): "model_path", ("pipeline", "run_dir"): "artifacts_dir"}


def _alias(name: str, arg: str) -> str:
    key, eq, value = arg.partition("=")
    return f"{_ALIASES[(name, key)]}={value}" if eq and (name, key) in _ALIASES else arg


# Hydra flags that ask for something else than a run: no precheck before them
_HYDRA_INFO_FLAGS = {
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--hydra-help",
    "--shell-completion",
    "-sc",
    "--resolve",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
_MULTIRUN_FLAGS = {"-m", "--multirun"}


class CommandError(Exception):
    """A command that cannot run as given; the message says why and what to run instead."""


# ----------------------------------------------------------------------------- runners


def _train_ppo(cfg: Any) -> None:
    from rlhfstack.stages.ppo import train
    from rlhfstack.tasks.demo import gold_scorer_for

    gold = (
        gold_scorer_for(cfg.gold_task, cfg.artifacts_dir, cfg.cluster.device)
        if cfg.gold_eval_every
        else None
    )
    train(cfg, gold_scorer=gold)


def _train_cai_sl(cfg: Any) -> None:
    from rlhfstack.stages.cai_sl import fine_tune_overrides, train
    from rlhfstack.stages.sft import train as train_sft

    train(cfg)
    train_sft(to_object(load_config("sft", fine_tune_overrides(cfg))))


def _run_pipeline(cfg: Any) -> None:
    from rlhfstack.pipeline import run_pipeline

    run_pipeline(cfg, command=command_line())


def _run_demo_eval(cfg: Any) -> None:
    from rlhfstack.evaluation.jobs.demo import run_demo_eval

    run_demo_eval(cfg, command=command_line())


_invocation: list[str] = []


def command_line() -> str:
    """The command as typed (``rlhf pipeline ...`` or ``python recipes/pipeline.py ...``)."""
    if _invocation:
        return " ".join(_invocation)
    return "python " + " ".join(sys.argv)


def _target(command: Command) -> Callable[[Any], Any]:
    module, name = command.target.split(":")
    return getattr(importlib.import_module(module), name)


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_command(name: str, cfg: DictConfig) -> Any:
    """The body of every Hydra entry point (``recipes/*.py``, ``rlhf <name>``): under ``-m`` the
    job's ``run_dir`` (the pipeline's ``artifacts_dir``) becomes its own sweep directory
    (``hydra.sweep.subdir``: ``<run_dir>/<job.num>_<overrides>``); a stage whose ``run_dir`` holds
    ``done.json`` says so in one line and returns (``overwrite=true`` trains it again,
    ``resume=force`` goes on from its newest checkpoint); else the typed config goes to the
    command's function. A diverged run exits with status 3."""
    # training imports torch: loaded when a command runs, so that `rlhf list` / `--help` are fast
    from rlhfstack.training import exit_on_divergence, finished_run

    command = COMMANDS[name]
    if _multirun():
        key = "artifacts_dir" if name == "pipeline" else "run_dir"
        if key in cfg:
            cfg[key] = HydraConfig.get().runtime.output_dir
    obj = to_object(cfg)
    if command.stage is not None and finished_run(obj):
        print(
            f"{obj.run_dir} holds a finished {command.stage} run (done.json): nothing to "
            "do (overwrite=true trains it again)",
            flush=True,
        )
        return None
    with exit_on_divergence():  # a diverged run: one error paragraph, exit status 3
        result = _target(command)(obj)
    if isinstance(result, dict) and command.stage is None and name != "pipeline":
        # an evaluation's headline numbers (its files hold the rest: per-pair scores, ...)
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool)}
        print(json.dumps(scalars, indent=2))
    return result


# ----------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Experiment:
    name: str
    stage: str
    """``sft`` | ``rm`` | ``ppo`` | ``dpo`` | ``pipeline`` | ``any`` (every stage and the pipeline)."""
    about: str
    """The first sentence of the file's header comment."""


_ABOUT_MAX = 100


def experiments(conf_dir: Path = CONF_DIR) -> list[Experiment]:
    """``conf/experiment/*.yaml`` read from their header comments: ``# stage: <stage>`` and the
    first sentence of the comment lines after it."""
    out = []
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        stage, words = "", []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            if text.startswith("stage:"):
                stage = text.split(":", 1)[1].strip()
                continue
            words.append(text)
        about = " ".join(words)
        end = about.find(". ")
        about = about[: end + 1] if end >= 0 else about
        if len(about) > _ABOUT_MAX:
            about = about[: about.rfind(" ", 0, _ABOUT_MAX - 1)] + " ..."
        out.append(Experiment(path.stem, stage, about))
    return out


def _experiment_override(overrides: list[str]) -> str | None:
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "experiment" and value:
            return value
    return None


def _stage_of(name: str) -> str:
    command = COMMANDS[name]
    return command.stage or name


def check_experiment(name: str, overrides: list[str]) -> None:
    """Raise :class:`CommandError` when ``+experiment=X`` is meant for another stage than the
    command's, naming X's stage and the command that runs it."""
    chosen = _experiment_override(overrides)
    if chosen is None or name not in COMMANDS:
        return
    known = {e.name: e for e in experiments()}
    exp = known.get(chosen)
    if exp is None:
        raise CommandError(
            f"experiment {chosen!r} does not exist; `rlhf list` shows them: "
            + ", ".join(sorted(known))
        )
    mine = _stage_of(name)
    if exp.stage in ("", "any", mine) or (exp.stage == "pipeline" and mine == "pipeline"):
        return
    right = [n for n in COMMANDS if _stage_of(n) == exp.stage]
    fix = f"rlhf {right[0]} +experiment={chosen}" if right else "rlhf list"
    entry = COMMANDS[right[0]].entry if right else ""
    raise CommandError(
        f"experiment {chosen!r} is meant for the {exp.stage} stage, not {mine}; run: {fix}"
        + (f"  (or python {entry} +experiment={chosen})" if entry else "")
    )


# ----------------------------------------------------------------------------- precheck


def precheck(name: str, args: list[str]) -> None:
    """Check a command's config before Hydra creates any directory: the experiment's stage, the
    composition (unknown keys, types, each field's allowed values) and, for a training stage, its
    input models and data files (``training.check_paths``). Raises :class:`CommandError`. Skipped
    for Hydra's information flags (``--cfg``, ``--info``, ...); under ``-m`` only the experiment
    is checked (each job checks its own config)."""
    if any(a.split("=")[0] in _HYDRA_INFO_FLAGS for a in args):
        return
    overrides = [a for a in args if not a.startswith("-")]
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        if key in RENAMED_KEYS:
            raise CommandError(f"{key} is now spelled {RENAMED_KEYS[key]}")
    check_experiment(name, overrides)
    if any(a in _MULTIRUN_FLAGS for a in args):
        return
    command = COMMANDS[name]
    try:
        obj = to_object(load_config(command.config, overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise CommandError(str(err)) from None
    url = getattr(obj, "model_path", None) if name == "generate" else None
    if url and str(url).startswith(("http://", "https://")):
        raise CommandError(
            f"an endpoint is spelled generation.base_url={url} generation.model=NAME "
            "(model= / model_path= name a local model directory)"
        )
    if command.stage in ("sft", "rm", "ppo", "dpo"):
        from rlhfstack.training import check_paths

        try:
            check_paths(obj)
        except FileNotFoundError as err:
            raise CommandError(f"{err}\nNothing was written (run_dir={obj.run_dir}).") from None


def precheck_or_exit(name: str, args: list[str] | None = None, prog: str | None = None) -> None:
    """:func:`precheck` for an entry point: on a problem, print it (``prog: error: ...``) and exit
    with status 2. ``--help`` / ``-h`` print :func:`command_help` (Hydra's own help lists the
    schemas' internal names; ``--hydra-help`` still shows it) and exit 0."""
    args = sys.argv[1:] if args is None else args
    if "-h" in args or "--help" in args:
        print(command_help(name))
        raise SystemExit(0)
    from rlhfstack.runtime import exit_on_missing_package, require_launcher  # imports torch

    with exit_on_missing_package():  # hydra/launcher=slurm without its plugin: the install hint
        require_launcher(args)
    try:
        precheck(name, args)
    except CommandError as err:
        print(f"{prog or Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


# ----------------------------------------------------------------------------- help


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases: the string literal under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _schema_of(command: Command) -> type | None:
    by_config = {
        "demo_data": STAGE_SCHEMAS["data"],
        "sft": STAGE_SCHEMAS["sft"],
        "rm": STAGE_SCHEMAS["rm"],
        "ppo": STAGE_SCHEMAS["ppo"],
        "dpo": STAGE_SCHEMAS["dpo"],
        "evaluate": STAGE_SCHEMAS["eval"],
        "pipeline": PipelineConfig,
        "rm_eval": RMEvalConfig,
        **EVAL_ENTRY_SCHEMAS,
        **EVAL_SUITE_SCHEMAS,
    }
    return by_config.get(command.config)


def field_lines(cls: type, values: Any, prefix: str = "") -> list[str]:
    """``key = value`` and the field's docstring (with its allowed values, for choices) for every
    field of ``cls``, nested dataclasses as dotted keys; ``values`` is the composed config
    (interpolations shown unresolved) or None."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        value = values.get(f.name) if isinstance(values, DictConfig) else None
        hint = hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            lines.extend(field_lines(hint, value, key + "."))
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=False)
        elif value is None and values is None:
            value = f.default if f.default is not dataclasses.MISSING else None
        check = f.metadata.get(CHECK)
        doc = docs.get(f.name, "")
        lines.append(f"  {key} = {json.dumps(value, default=str)}")
        lines.extend("      " + w for w in textwrap.wrap(doc, 92))
        if check is not None and check.allowed.startswith("one of"):
            lines.append(f"      [{check.allowed}]")
    return lines


def _groups(stage: str) -> list[str]:
    out = []
    for group in ("model", "data", "cluster"):
        options = sorted(
            p.stem
            for p in (CONF_DIR / group).glob("*.yaml")
            if not p.stem.endswith("_schema")  # the typed schemas are internal
        )
        if options:
            out.append(f"  {group}={' | '.join(options)}")
    exps = [e.name for e in experiments() if e.stage in (stage, "any")]
    if exps:
        out.append(f"  +experiment={' | '.join(exps)}")
    return out


def command_help(name: str) -> str:
    """``rlhf <name> --help``: usage, config choices, every field with its default and docstring."""
    command = COMMANDS[name]
    lines = [
        f"usage: rlhf {name} [-m] [KEY=VALUE ...]   (Hydra overrides; also python {command.entry})",
        "",
        command.about + ".",
        "",
    ]
    groups = _groups(_stage_of(name)) if command.stage or name == "pipeline" else []
    if groups:
        lines += ["config choices:", *groups, ""]
    schema = _schema_of(command)
    if schema is not None:
        try:
            values = load_config(command.config, [])
        except Exception:  # a config that needs required values (MISSING) still shows its docs
            values = None
        lines += [f"fields (conf/{command.config}.yaml):", *field_lines(schema, values), ""]
    lines += [
        "Hydra: -m sweeps (each job in <run_dir>/<job.num>_<overrides>), --cfg job prints the "
        "composed config, --hydra-help Hydra's own flags.",
    ]
    return "\n".join(lines)


def main_help() -> str:
    width = max(map(len, [*COMMANDS, *OTHER_COMMANDS]))
    lines = ["usage: rlhf COMMAND [KEY=VALUE ...]   (rlhf COMMAND --help: its fields)", ""]
    lines += ["commands:"]
    for name, command in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {command.about}")
    for name, about in OTHER_COMMANDS.items():
        lines.append(f"  {name:<{width}}  {about}")
    return "\n".join(lines)


def list_text() -> str:
    exps = experiments()
    width = max(len(e.name) for e in exps)
    lines = [f"{'experiment':<{width}}  {'stage':<8}  description"]
    for e in exps:
        lines.append(f"{e.name:<{width}}  {e.stage:<8}  {e.about}")
    lines.append("")
    lines.append("run: rlhf <stage> +experiment=NAME   (stage any: every stage and the pipeline)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export


def export_main(argv: list[str] | None = None) -> int:
    """``rlhf export`` (and ``tools/export_hf.py``): one servable HF directory."""
    from rlhfstack.models.convert import export_hf

    ap = argparse.ArgumentParser(
        description="Export one servable HF directory (safetensors + config + tokenizer), LoRA "
        "merged, in one dtype. It loads with AutoModelForCausalLM.from_pretrained and serves "
        "with vLLM.",
    )
    ap.add_argument(
        "--model",
        type=Path,
        required=True,
        help="HF model directory (or a peft adapter directory: its base is read from it)",
    )
    ap.add_argument("--lora-adapter", type=Path, default=None, help="peft adapter to merge")
    ap.add_argument("--out", type=Path, required=True, help="output HF directory")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")
    out = export_hf(args.model, args.out, lora_adapter=args.lora_adapter, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- main


def hydra_entry(name: str) -> Callable[[], Any]:
    """The Hydra main function of a command (``conf/<config>.yaml``, :func:`run_command`)."""
    command = COMMANDS[name]

    def task(cfg: DictConfig) -> None:
        run_command(name, cfg)

    return hydra.main(config_path=str(CONF_DIR), config_name=command.config, version_base="1.3")(
        task
    )


def main(argv: list[str] | None = None) -> int:
    """The ``rlhf`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    name, args = argv[0], argv[1:]
    if name == "list":
        try:
            print(list_text())
        except BrokenPipeError:  # rlhf list | head
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no second error at exit
        return 0
    if name == "export":
        return export_main(args)
    if name not in COMMANDS:
        print(f"rlhf: error: unknown command {name!r}\n\n{main_help()}", file=sys.stderr)
        return EXIT_USAGE
    if "-h" in args or "--help" in args:
        print(command_help(name))
        return 0
    args = [_alias(name, a) for a in args]
    precheck_or_exit(name, args, prog=f"rlhf {name}")
    _invocation[:] = ["rlhf", name, *args]
    # Hydra reads sys.argv; its job name (the log file's name) is the command's
    sys.argv = [f"rlhf-{name}", *args, f"hydra.job.name={name}"]
    hydra_entry(name)()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
