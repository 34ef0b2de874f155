"""Shared fixtures: the data root and a converted stories260K HF model (converted once per session)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("RLHF_DATA_ROOT", REPO.parent / "shared" / "data"))
STORIES = DATA_ROOT / "models" / "stories260K"


def pytest_configure(config):
    os.environ.setdefault("RLHF_DATA_ROOT", str(DATA_ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.exists():
        pytest.skip(f"data root {DATA_ROOT} not found (set RLHF_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def stories_hf(tmp_path_factory, data_root) -> Path:
    """stories260K converted to an HF directory (BOS 1, EOS 2, PAD 512)."""
    if not (STORIES / "stories260K.bin").exists():
        pytest.skip(f"{STORIES} not found")
    from rlhfstack.models.llama2c import convert

    return convert(
        STORIES / "stories260K.bin", STORIES / "tok512.bin", tmp_path_factory.mktemp("s260k") / "hf"
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Test models are tiny: intra-op threads only add contention on a 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, data_root) -> Path:
    """The whole demo pipeline at minimum sizes (``+experiment=demo_smoke``), run once per session."""
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.pipeline import run_pipeline

    art = tmp_path_factory.mktemp("smoke") / "demo_smoke"
    cfg = to_object(
        load_config("pipeline", ["+experiment=demo_smoke", f"artifacts_dir={art}", "jobs=1"])
    )
    run_pipeline(cfg, command="pytest smoke")
    return art


@pytest.fixture(scope="session")
def arts(tmp_path_factory, stories_hf) -> Path:
    """ARTS/base_model (stories260K) and ARTS/data/sft_{train,val}.jsonl (40 + 8 examples)."""
    root = tmp_path_factory.mktemp("arts")
    shutil.copytree(stories_hf, root / "base_model")
    names, things = (
        ["Tom", "Lily", "Ben", "Sue", "Max", "Mia"],
        ["a red ball", "a big dog", "a small cat", "a cake"],
    )
    rows = [
        {
            "prompt": f"Once upon a time, {names[i % 6]} saw {things[i % 4]}.",
            "completion": f" {names[i % 6]} was happy and played with {things[(i * 7) % 4]} all day.",
        }
        for i in range(48)
    ]
    (root / "data").mkdir()
    for name, part in (("sft_train", rows[:40]), ("sft_val", rows[40:])):
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


@pytest.fixture
def launch_env() -> dict[str, str]:
    """Environment for a recipe started as a subprocess (alone or under torchrun): offline, one
    thread, fixed hash seed, and none of this process's rank variables."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONHASHSEED="0"
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture
def story_prefs(tmp_path) -> Path:
    """20 preference pairs on story openings (chosen happy, rejected sad): tmp_path/prefs.jsonl."""
    path = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": f"Once upon a time, {n} saw a {t}.",
            "chosen": f" {n} was happy and played with the {t}.",
            "rejected": f" {n} was sad. The {t} ran away and {n} cried all day long.",
        }
        for n in ("Tom", "Lily", "Ben", "Sue")
        for t in ("ball", "dog", "cat", "cake", "bird")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
