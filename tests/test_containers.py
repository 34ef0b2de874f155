"""containers/*.Dockerfile, checked without a Docker engine.

A small Dockerfile parser (parser directives, comments, line continuations, exec/shell forms)
reads both images; the checks are what a reviewer would look for: a pinned base tag (never
``latest``), WORKDIR, the project installed without replacing NGC's torch, COPY sources that
exist, sensible ENTRYPOINT/CMD, and port 8000 for the vLLM server. The serving entrypoint is
run against a stand-in ``python3`` to check the server command it builds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = REPO_ROOT / "containers"


@dataclass
class Instruction:
    cmd: str  # upper-case keyword
    args: str  # raw argument text (continuations joined)
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form, or None for the shell form."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return None

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options (COPY/ADD/HEALTHCHECK/FROM) and the remaining words."""
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            k, _, v = words.pop(0)[2:].partition("=")
            flags[k] = v
        return flags, words


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile (escape character ``\\``; heredocs are not used here)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for i, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives (# syntax=...)
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if not buf:
            start = i
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        buf += stripped
        m = re.match(r"^([A-Za-z]+)\s*(.*)$", buf, re.S)
        assert m, f"line {start}: not an instruction: {buf!r}"
        out.append(Instruction(m.group(1).upper(), m.group(2).strip(), start))
        buf = ""
    assert not buf, "dangling line continuation at end of file"
    return out


def _load(name: str) -> list[Instruction]:
    return parse_dockerfile((CONTAINERS / name).read_text())


def _only(ins: list[Instruction], cmd: str) -> Instruction:
    found = [i for i in ins if i.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd}, found {len(found)}"
    return found[0]


def _check_from(ins: list[Instruction], image: str, tag_re: str) -> str:
    known = {
        "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
        "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
    }  # fmt: skip
    assert {i.cmd for i in ins} <= known, {i.cmd for i in ins} - known
    assert ins[0].cmd == "FROM", "FROM must be the first instruction"
    ref = _only(ins, "FROM").args.split()[0]
    assert "$" not in ref, "base image must be literal (pinned), not an ARG"
    name, _, tag = ref.rpartition(":")
    assert name == image, ref
    assert tag and tag != "latest" and re.fullmatch(tag_re, tag), f"unpinned tag {tag!r}"
    return tag


def _check_copies(ins: list[Instruction]) -> None:
    for i in ins:
        if i.cmd in ("COPY", "ADD"):
            flags, words = i.flags_and_rest()
            assert "from" not in flags
            for src in words[:-1]:
                assert (REPO_ROOT / src).exists(), f"line {i.line}: COPY source {src} missing"


def test_parser_handles_continuations_comments_and_forms():
    ins = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nFROM a/b:1.2\n# note\nRUN echo 1 \\\n  # inner\n"
        '  && echo 2\nCMD ["x", "y"]\nENTRYPOINT run.sh --flag\n'
    )
    assert [i.cmd for i in ins] == ["FROM", "RUN", "CMD", "ENTRYPOINT"]
    assert ins[1].args == "echo 1 && echo 2"
    assert ins[2].exec_form() == ["x", "y"] and ins[3].exec_form() is None
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM a:1\nRUN echo \\\n")


def test_train_image():
    ins = _load("train.Dockerfile")
    _check_from(ins, "nvcr.io/nvidia/pytorch", r"\d\d\.\d\d-py3")
    workdir = _only(ins, "WORKDIR").args
    assert workdir.startswith("/")
    _check_copies(ins)
    runs = " ; ".join(i.args for i in ins if i.cmd == "RUN")
    # NGC's torch stays: nothing installs torch, and the project goes in through the script
    assert not re.search(r"pip3? install[^;&|]*\btorch\b", runs), runs
    assert "containers/install_into_image.sh" in runs
    script = (CONTAINERS / "install_into_image.sh").read_text()
    assert "--no-deps" in script and re.search(r"pip install --no-deps .*-e \.", script)
    assert "torch changed" in script  # the build fails if torch was replaced
    subprocess.run(
        ["bash", "-n", str(CONTAINERS / "install_into_image.sh")], check=True, timeout=10
    )
    # the package is in the image before the editable install and in full afterwards
    copied = [w for i in ins if i.cmd == "COPY" for w in i.flags_and_rest()[1][:-1]]
    for needed in ("pyproject.toml", "rlhfstack/", "conf/", "recipes/"):
        assert needed in copied, needed
    cmd = _only(ins, "CMD").exec_form()
    assert cmd and cmd[0] == "python" and (REPO_ROOT / cmd[1]).exists(), cmd
    assert not [i for i in ins if i.cmd == "ENTRYPOINT"]  # NGC's entrypoint is kept
    env = " ".join(i.args for i in ins if i.cmd == "ENV")
    assert "RLHF_DATA_ROOT" in env


def test_serve_image():
    ins = _load("serve.Dockerfile")
    _check_from(ins, "vllm/vllm-openai", r"v\d+\.\d+\.\d+")
    assert _only(ins, "WORKDIR").args.startswith("/")
    _check_copies(ins)
    assert "8000" in _only(ins, "EXPOSE").args.split()
    entry = _only(ins, "ENTRYPOINT").exec_form()
    assert entry == ["/usr/local/bin/rlhfstack-serve"]
    copies = [i.flags_and_rest()[1] for i in ins if i.cmd == "COPY"]
    assert ["containers/serve_entrypoint.sh", entry[0]] in copies
    assert _only(ins, "CMD").exec_form() == []
    health = _only(ins, "HEALTHCHECK").args
    assert "8000/health" in health


def _fake_python(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\n')
    shim.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_ARGS": str(tmp_path / "args"),
    }


def test_serve_entrypoint_builds_vllm_command(tmp_path):
    """The entrypoint serves an export_hf directory on 0.0.0.0:8000 and passes extra args on."""
    model_dir = tmp_path / "policy"  # what tools/export_hf.py writes (config.json checked)
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    env = _fake_python(tmp_path)
    env["MODEL_DIR"] = str(model_dir)
    script = str(CONTAINERS / "serve_entrypoint.sh")
    subprocess.run(["bash", script, "--tensor-parallel-size", "2"], env=env, check=True, timeout=10)
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(args[2:-2:2], args[3:-2:2]))
    assert pairs["--model"] == str(model_dir)
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "8000"
    assert pairs["--served-model-name"] == "rlhfstack-policy" and pairs["--dtype"] == "bfloat16"
    assert args[-2:] == ["--tensor-parallel-size", "2"]
    env["MODEL_DIR"] = str(tmp_path / "missing")
    res = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=10)
    assert res.returncode == 2 and "export_hf.py" in res.stderr
