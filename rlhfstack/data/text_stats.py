"""Word n-gram statistics of a text (whitespace words, case-sensitive): shared by the evaluation
metrics and detectors and by the demo task's gold reward, which penalizes repetition."""

from __future__ import annotations

from collections.abc import Sequence


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of a word list (empty if fewer than n words)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of the n-grams in ``text`` that repeat an earlier n-gram: 1 - unique/total.

    In [0, 1): 0 for no repetition (or fewer than n words); a k-fold loop of a phrase tends to
    1 - 1/k. Whitespace words, case-sensitive (normalise the text first if needed).
    """
    grams = ngrams(text.split(), n)
    if not grams:
        return 0.0
    return float(1.0 - len(set(grams)) / len(grams))
