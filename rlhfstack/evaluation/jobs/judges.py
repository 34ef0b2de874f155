"""Judges backed by a model: the reward-model judge and the demo's gold-reward judge.

Both are :class:`rlhfstack.evaluation.judges.PointwiseJudge` s; what makes them jobs code is that
they load a model from disk and run it. Their identity (the key of their cached judgments) holds
a fingerprint of the model files, so a changed model is never served stale scores.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhfstack.evaluation.judges import GoldJudge, JudgmentCache, PointwiseJudge, hash_texts
from rlhfstack.models.core import RewardModel, load_tokenizer
from rlhfstack.models.encoders import score_texts
from rlhfstack.tasks.demo import load_gold

__all__ = ["RMJudge", "load_gold_judge"]


def _files_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Cheap content fingerprint of a file or of a directory's top-level files: name, size and
    SHA-256 of the first and last MiB of each (hashing multi-GB weights in full is too slow)."""
    p = Path(path)
    files = (
        sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
        if p.is_dir()
        else [p]
    )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


class RMJudge(PointwiseJudge):
    """A trained reward model as a judge: each answer is scored as the RM was trained
    (``rlhfstack.models.encoders.score_texts``: causal-LM or encoder backbones, single or ensemble).

    Args:
        rm: a :class:`rlhfstack.models.core.RewardModel` (eval mode).
        tokenizer: its tokenizer.
        max_len: token cap per sequence (long prompts keep their end); also capped by the
            backbone's ``max_position_embeddings``.
        batch_size: sequences per forward pass.
    """

    def __init__(
        self,
        rm: Any,
        tokenizer: Any,
        *,
        identity: str = "rm",
        cache: JudgmentCache | None = None,
        max_len: int = 1024,
        batch_size: int = 16,
        device: str = "cpu",
        name: str = "rm",
    ) -> None:
        super().__init__(name, identity, cache)
        self.rm = rm
        self.tokenizer = tokenizer
        max_pos = getattr(getattr(rm.backbone, "config", None), "max_position_embeddings", None)
        self.max_len = int(min(max_len, max_pos) if max_pos else max_len)
        self.batch_size = batch_size
        self.device = device

    def score_uncached(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        # one scoring path for causal-LM and encoder reward models (and ensembles)
        out = score_texts(
            self.rm,
            self.tokenizer,
            list(prompts),
            list(answers),
            max_len=self.max_len,
            batch_size=self.batch_size,
            device=self.device,
        )
        return np.asarray(out["mean"], dtype=np.float64)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        cache: JudgmentCache | None = None,
        max_len: int = 1024,
        batch_size: int = 16,
    ) -> RMJudge:
        """Load a reward model saved by the RM stage (``RewardModel.load``)."""
        rm = RewardModel.load(path, dtype=dtype, device=device)
        tok = load_tokenizer(str(tokenizer_path or path))
        identity = f"rm:{_files_fingerprint(path)}:{dtype}:{max_len}"
        return cls(
            rm,
            tok,
            identity=identity,
            cache=cache,
            max_len=max_len,
            batch_size=batch_size,
            device=device,
        )


def load_gold_judge(
    artifacts_dir: str | os.PathLike,
    device: str = "cpu",
    cache: JudgmentCache | None = None,
) -> GoldJudge:
    """The demo's gold reward as a :class:`GoldJudge`, rebuilt from
    ``<artifacts_dir>/data/gold.json`` and its frozen base model (``rlhfstack.tasks.demo.load_gold``)."""
    art = Path(artifacts_dir)
    if not (art / "data" / "gold.json").exists():
        raise FileNotFoundError(
            f"judge=gold needs {art / 'data' / 'gold.json'} (run the demo's data stage, or set "
            "artifacts_dir)"
        )
    gold = load_gold(art, device)
    identity = (
        "gold:"
        + hash_texts(
            (art / "data" / "gold.json").read_text(), _files_fingerprint(art / "base_model")
        )[:16]
    )
    return GoldJudge(gold.score, identity=identity, cache=cache)
