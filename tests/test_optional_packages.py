"""Optional packages: one helper (``runtime.require``) turns a missing one into a one-line error
with its install command; W&B logging works offline and logs what ``metrics.jsonl`` holds."""

from __future__ import annotations

import glob
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfstack.configs import load_config, to_object
from rlhfstack.runtime import OPTIONAL_PACKAGES, MissingPackage, RunLogger, read_jsonl, require

REPO = Path(__file__).resolve().parent.parent


def test_require_names_the_feature_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it now raises ImportError
    with pytest.raises(MissingPackage) as err:
        RunLogger("unused", tensorboard=False, wandb=True, enabled=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("logging.wandb=true needs the 'wandb' package")
    assert "pip install 'rlhfstack[wandb]'" in msg
    # a dependency of every install: the hint says the install is incomplete
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPackage, match="pip install matplotlib .*incomplete"):
        require("matplotlib", "plots")


def test_every_extra_named_in_the_registry_exists_in_pyproject():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, (dist, extra) in OPTIONAL_PACKAGES.items():
        if extra is not None:
            assert extra in extras, module
            assert any(req.split("=")[0].split("[")[0] == dist for req in extras[extra]), module
    assert any(r.startswith("wandb==") for r in extras["wandb"])  # pinned
    assert any(r.startswith("wandb==") for r in extras["dev"])  # so the tests below run


def _has_submitit_launcher() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


@pytest.mark.skipif(_has_submitit_launcher(), reason="the submitit launcher is installed")
def test_slurm_launcher_without_its_plugin_is_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "recipes" / "train_dpo.py"),
            "-m",
            "hydra/launcher=slurm",
            "+experiment=demo",
            f"run_dir={tmp_path / 'dpo'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == [lines[0]] and "pip install 'rlhfstack[slurm]'" in lines[0], res.stderr
    assert not (tmp_path / "dpo").exists()


def _wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """History rows of an offline W&B run, read from its ``.wandb`` transaction log: LevelDB-log
    framing (32 KiB blocks of records with a 7-byte header: crc32, length, type) after a 7-byte
    file header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(i.nested_key) or i.key: i.value_json for i in rec.history.item}
                )
    return rows


def test_sft_logs_to_wandb_offline(arts, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rlhfstack.stages import sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "sft"
    cfg = to_object(
        load_config(
            "sft",
            [
                "+experiment=demo",
                f"artifacts_dir={arts}",
                f"run_dir={run_dir}",
                "trainer.max_steps=3",
                "trainer.batch_size=4",
                "trainer.micro_batch_size=4",
                "trainer.eval_every=0",
                "logging.wandb=true",
                "logging.tensorboard=false",
                "logging.plots=false",
            ],
        )
    )
    sft.train(cfg)
    ours = read_jsonl(run_dir / "metrics.jsonl")
    theirs = _wandb_history(run_dir)
    assert ours and len(theirs) == len(ours)
    for a, b in zip(ours, theirs, strict=True):
        assert int(b["_step"]) == a["step"]
        logged = {k for k, v in a.items() if v is not None and k != "nonfinite"}
        assert logged <= set(b), logged - set(b)
        assert "loss" in logged and float(b["loss"]) == pytest.approx(a["loss"])
