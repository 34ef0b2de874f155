"""Large-model recipes (conf/experiment/{llama3_8b,qwen2_7b}_*.yaml) compose and fit their plan.

Each recipe is composed exactly as ``recipes/train_<stage>.py +experiment=NAME`` would, its model
is built on the meta device from ``model.arch`` (no memory, no weights), LoRA is attached where
enabled, and the engine's own parallel plan is applied on a fake process group of the recipe's
world size (``nodes * gpus_per_node``): tensor parallelism (``distributed.apply_tp``) and FSDP2
(``distributed.apply_fsdp2``). A typo in a module name, an architecture number or a parallel degree
that does not divide the model fails here instead of on a GPU cluster.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from rlhfstack.configs import CONF_DIR, load_config, to_object

RECIPES = sorted(
    p.stem
    for pat in ("llama3_8b_*.yaml", "qwen2_7b_*.yaml")
    for p in (CONF_DIR / "experiment").glob(pat)
)
# Published parameter counts (model cards: "8.03B" Llama 3 8B, "7.62B" Qwen2-7B).
EXPECTED_PARAMS = {"llama": 8_030_261_248, "qwen2": 7_615_616_512}
DOCUMENTED_SECTIONS = ("trainer", "rm", "dpo", "ppo", "kl", "rollout", "lora", "parallel")


def _stage(name: str) -> str:
    return name.split("_")[2]  # llama3_8b_<stage>[_variant]


def _compose(name: str, extra: list[str] | None = None):
    return to_object(load_config(_stage(name), [f"+experiment={name}", *(extra or [])]))


def _meta_model(arch: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _attach_lora(model, lcfg):
    """peft LoRA on the meta model; every target name must match a linear in every layer.

    peft itself only fails when NO target matches: a typo next to correct names would silently
    train fewer modules, so the names are checked first.
    """
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    for target in lcfg.target_modules:
        hits = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == target]
        if len(hits) != n_layers:
            raise ValueError(f"model.lora.target_modules: {target!r} matches {len(hits)} modules")
    with torch.device("meta"):
        model = get_peft_model(
            model,
            LoraConfig(
                r=lcfg.r,
                lora_alpha=lcfg.alpha,
                lora_dropout=lcfg.dropout,
                target_modules=list(lcfg.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(lcfg.target_modules) * n_layers
    return model


@contextlib.contextmanager
def _fake_world(size: int):
    """A fake (communication-free) process group of ``size`` ranks; this process is rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this pytest process")
    dist.init_process_group("fake", rank=0, world_size=size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_plan_shapes(model, tp: int) -> int:
    """Engine-independent check of the HF TP plan: modules exist, sharded dims divide by ``tp``.

    Returns the number of modules planned.
    """
    plan = model.config.base_model_tp_plan or {}
    assert plan, "the model class has no tensor-parallel plan"
    trunk = model.model
    n = 0
    for pattern, style in plan.items():
        if not pattern.startswith("layers.*."):
            continue
        sub = pattern[len("layers.*.") :]
        for layer in trunk.layers:
            mod = layer.get_submodule(sub)  # raises AttributeError on a wrong name
            dim = 0 if style.startswith("colwise") else 1
            assert mod.weight.shape[dim] % tp == 0, f"{sub}.weight dim {dim} % tp={tp}"
            n += 1
    for key in ("num_attention_heads", "num_key_value_heads"):
        assert getattr(model.config, key) % tp == 0, f"{key} not divisible by tp={tp}"
    return n


def _yaml_undocumented(path: Path) -> list[str]:
    """Scalar hyperparameter lines (in DOCUMENTED_SECTIONS) without a ``# source`` comment."""
    bad, stack = [], []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("-"):
            continue
        indent = len(line) - len(line.lstrip())
        m = re.match(r"^\s*([A-Za-z_][\w]*):\s*(.*)$", line)
        if not m:
            continue
        key, value = m.groups()
        stack = [(i, k) for i, k in stack if i < indent]
        if value == "":
            stack.append((indent, key))
            continue
        if any(k in DOCUMENTED_SECTIONS for _, k in stack) and "#" not in raw:
            bad.append(raw.strip())
    return bad


def test_recipes_exist():
    assert {f"{m}_{s}" for m in ("llama3_8b", "qwen2_7b") for s in ("sft", "rm", "dpo")} <= set(
        RECIPES
    )
    assert "llama3_8b_ppo_lora" in RECIPES and "qwen2_7b_ppo_lora" in RECIPES
    assert "llama3_8b_ppo_qlora" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_documents_sources(name):
    cfg = _compose(name)
    assert cfg.stage == _stage(name)
    assert cfg.model.arch, "model.arch missing (conf/model/<model>.yaml)"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.cluster.name == "slurm" and cfg.cluster.device == "cuda"
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    p = cfg.parallel
    assert p.dp_shard * p.tp * p.pp == world, f"dp_shard*tp*pp != {world} GPUs"
    tcfg = cfg.trainer
    assert tcfg.batch_size % p.dp_shard == 0, "global batch not divisible by data-parallel ranks"
    per_rank = tcfg.batch_size // p.dp_shard
    if cfg.stage == "ppo":
        assert tcfg.batch_size % cfg.ppo.num_minibatches == 0
        per_rank //= cfg.ppo.num_minibatches
        assert cfg.rollout.top_k == 0 and cfg.rollout.top_p == 1.0
        assert cfg.model.lora.enabled and cfg.model.lora.dropout == 0.0
        assert cfg.gold_task is None
    assert per_rank % tcfg.micro_batch_size == 0 or tcfg.micro_batch_size >= per_rank
    if cfg.stage != "sft":  # later stages start from this recipe's SFT output
        assert cfg.model.path == f"{cfg.artifacts_dir}/sft/model"
    try:
        from rlhfstack.distributed import resolve_degrees
    except ImportError:
        pass
    else:
        assert resolve_degrees(p, world) == (p.dp_shard, p.tp, p.pp)
    bad = _yaml_undocumented(CONF_DIR / "experiment" / f"{name}.yaml")
    assert not bad, f"hyperparameters without a source comment: {bad}"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_model_on_meta_with_parallel_plan(name):
    cfg = _compose(name)
    model = _meta_model(cfg.model.arch)
    n_params = sum(t.numel() for t in model.parameters())
    assert n_params == EXPECTED_PARAMS[cfg.model.arch["model_type"]]
    assert all(t.is_meta for t in model.parameters())
    p = cfg.parallel
    assert _check_plan_shapes(model, p.tp) == 7 * model.config.num_hidden_layers
    if cfg.model.lora.enabled:
        model = _attach_lora(model, cfg.model.lora)
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if world == 1:
        return
    distributed = pytest.importorskip("rlhfstack.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    with _fake_world(world):
        mesh = init_device_mesh(
            "cpu", (p.pp, p.dp_shard, p.tp), mesh_dim_names=("pp", "dp_shard", "tp")
        )
        if p.tp > 1:
            distributed.apply_tp(model, mesh["tp"])
            q = distributed.decoder_layers(model)[0].self_attn.q_proj.weight
            assert isinstance(q, DTensor) and q.to_local().shape[0] == q.shape[0] // p.tp
        if p.dp_shard > 1:
            root = distributed.apply_fsdp2(model, mesh["dp_shard"])
            w = distributed.decoder_layers(model)[0].mlp.down_proj
            w = getattr(w, "base_layer", w).weight
            assert isinstance(w, DTensor)
            assert w.to_local().numel() * p.dp_shard * p.tp == w.numel()
            assert root is not None
        assert all(t.is_meta for t in model.parameters())  # still no memory


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(
    "name,overrides,error",
    [
        # Qwen2-7B has 4 KV heads: 8-way TP cannot split them
        ("qwen2_7b_sft", ["parallel.tp=8", "parallel.dp_shard=1"], ValueError),
        # a typo in a LoRA target module
        ("llama3_8b_ppo_lora", ["model.lora.target_modules=[q_proj,v_projj]"], ValueError),
    ],
)
def test_plan_errors_are_caught(name, overrides, error):
    cfg = _compose(name, overrides)
    model = _meta_model(cfg.model.arch)
    with pytest.raises(error):
        if cfg.model.lora.enabled:
            _attach_lora(model, cfg.model.lora)
        else:
            distributed = pytest.importorskip("rlhfstack.distributed")
            from torch.distributed.device_mesh import init_device_mesh

            with _fake_world(8):
                mesh = init_device_mesh("cpu", (1, 1, 8), mesh_dim_names=("pp", "dp_shard", "tp"))
                distributed.apply_tp(model, mesh["tp"])


def test_arch_typo_changes_parameter_count():
    cfg = _compose("llama3_8b_sft", ["model.arch.intermediate_size=14436"])
    model = _meta_model(cfg.model.arch)
    assert sum(t.numel() for t in model.parameters()) != EXPECTED_PARAMS["llama"]
