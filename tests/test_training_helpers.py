"""The shared stage helpers of rlhfstack.training: data loading from ``cfg.data`` and the end of a
stage (model, metrics log, plots, done.json)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhfstack.data.schemas import LoadReport
from rlhfstack.runtime import CostMeter, RunLogger
from rlhfstack.training import Run, data_load_kwargs, finish_stage, load_train_eval


def _cfg(**data) -> SimpleNamespace:
    fields = dict(
        train_path="train.jsonl",
        eval_path=None,
        adapter="plain",
        template="hh",
        on_error="skip",
        max_prompt_tokens=16,
        max_response_tokens=8,
        max_examples=None,
        validation_fraction=0.25,
    )
    fields.update(data)
    return SimpleNamespace(data=SimpleNamespace(**fields), data_root="/data", seed=0)


class FakeLoader:
    """Stands in for load_sft & co: file ``path`` holds examples ``path:0 .. path:n-1``; records
    each call's keyword arguments."""

    def __init__(self, n: int = 8) -> None:
        self.n = n
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return [f"{path}:{i}" for i in range(self.n)], LoadReport(source=path)


BASE_KW = dict(adapter="plain", template="hh", on_error="skip", data_root="/data")


def test_data_load_kwargs_adds_the_length_filter_only_with_a_tokenizer():
    cfg, tok = _cfg(), object()
    assert data_load_kwargs(cfg) == BASE_KW
    assert data_load_kwargs(cfg, tok) == {
        **BASE_KW,
        "tokenizer": tok,
        "max_prompt_tokens": 16,
        "max_response_tokens": 8,
    }


def test_eval_file_is_read_without_the_length_filter_and_train_is_capped():
    loader, tok = FakeLoader(), object()
    train, held = load_train_eval(
        loader, _cfg(eval_path="val.jsonl", max_examples=3), "T", tokenizer=tok
    )
    assert train == ["train.jsonl:0", "train.jsonl:1", "train.jsonl:2"]
    assert len(held) == 8 and held[0] == "val.jsonl:0"
    assert [c[0] for c in loader.calls] == ["train.jsonl", "val.jsonl"]
    assert loader.calls[0][1]["tokenizer"] is tok
    assert loader.calls[1][1] == BASE_KW


@pytest.mark.parametrize("holdout", [False, True])
def test_without_an_eval_file_the_eval_set_is_empty_or_a_seeded_holdout(holdout):
    cfg = _cfg(max_examples=5)
    train, held = load_train_eval(FakeLoader(12), cfg, "T", holdout=holdout)
    if not holdout:
        assert held == [] and train == [f"train.jsonl:{i}" for i in range(5)]
        return
    # 25% of 12 held out before the cap, chosen by a permutation seeded with cfg.seed
    perm = [int(i) for i in np.random.default_rng(0).permutation(12)]
    assert held == [f"train.jsonl:{i}" for i in perm[:3]]
    assert train == [f"train.jsonl:{i}" for i in perm[3:8]]
    assert load_train_eval(FakeLoader(12), cfg, "T", holdout=True) == (train, held)


def test_with_eval_false_never_reads_the_eval_file():
    loader = FakeLoader()
    _, held = load_train_eval(loader, _cfg(eval_path="val.jsonl"), "T", with_eval=False)
    assert held == [] and [c[0] for c in loader.calls] == ["train.jsonl"]


class _Saved(torch.nn.Linear):
    def save_pretrained(self, out) -> None:
        assert not self.training  # finish_stage switches the model to eval mode first
        torch.save(self.state_dict(), f"{out}/weights.pt")


class _Tok:
    def save_pretrained(self, out) -> None:
        (Path(out) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("plots", [False, True])
def test_finish_stage_saves_closes_plots_and_writes_done_last(tmp_path, plots):
    cfg = SimpleNamespace(logging=SimpleNamespace(plots=plots))
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 0.5})
    run = Run(cfg=cfg, run_dir=tmp_path, logger=logger, cost=CostMeter(), device="cpu")
    model = _Saved(2, 1)
    assert finish_stage(run, "sft", 2, model=model, tokenizer=_Tok(), extra=0.5) == tmp_path
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "tokenizer.json",
        "weights.pt",
    ]
    done = json.loads((tmp_path / "done.json").read_text())
    assert list(done) == ["stage", "steps", "cost", "extra"]
    assert done["stage"] == "sft" and done["steps"] == 2 and done["extra"] == 0.5
    assert (tmp_path / "dashboard.png").exists() == plots
    assert not (tmp_path / "plots").exists()  # one image per stage, no loose per-metric PNGs


def test_finish_stage_without_a_model_writes_no_model_dir(tmp_path):
    cfg = SimpleNamespace(logging=SimpleNamespace(plots=False))
    run = Run(
        cfg=cfg,
        run_dir=tmp_path,
        logger=RunLogger(tmp_path, tensorboard=False),
        cost=CostMeter(),
        device="cpu",
    )
    finish_stage(run, "rm", 3, heldout_accuracy=0.75)
    assert not (tmp_path / "model").exists()
    assert json.loads((tmp_path / "done.json").read_text())["heldout_accuracy"] == 0.75
