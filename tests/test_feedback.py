"""The constitution loader (errors name file, line and field) and the AI feedback models'
both-order debiasing."""

from __future__ import annotations

import numpy as np
import pytest

from rlhfstack.data.schemas import DataError
from rlhfstack.feedback import (
    Comparison,
    FeedbackModel,
    compare_principles,
    debias,
    load_constitution,
    parse_choice,
)

GOOD = """\
name: t
principles:
  - name: happy
    critique_request: Say what is sad.
    revision_request: Make it happy.
    comparison_question: Which is happier?
    positive: [A happy day.]
    negative: [A sad day.]
"""


def test_shipped_constitutions_load():
    stories = load_constitution("stories")
    assert stories.names == ["happiness", "kindness", "fluency", "on_story"]
    assert load_constitution("hh").names == ["harmless", "helpful", "honest"]
    for p in stories.principles:
        assert p.critique_request and p.revision_request and p.comparison_question
        assert p.positive and p.negative


@pytest.mark.parametrize(
    "edit, line, field",
    [
        # a missing field: the principle's first line
        (lambda s: s.replace("    revision_request: Make it happy.\n", ""), 3,
         "principles[0].revision_request"),
        # an empty text: its own line
        (lambda s: s.replace("Which is happier?", "''"), 6, "principles[0].comparison_question"),
        # a list that is not one
        (lambda s: s.replace("[A sad day.]", "A sad day."), 8, "principles[0].negative"),
        # a typo in a key
        (lambda s: s.replace("critique_request", "critque_request"), 4,
         "principles[0].critque_request"),
    ],
)  # fmt: skip
def test_malformed_entry_names_file_line_and_field(tmp_path, edit, line, field):
    path = tmp_path / "c.yaml"
    path.write_text(edit(GOOD))
    with pytest.raises(DataError) as err:
        load_constitution(path)
    assert err.value.path == str(path) and err.value.line == line and err.value.field == field
    assert f"{path}:{line}: field '{field}'" in str(err.value)


def test_duplicate_principle_names_and_bad_yaml(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text(GOOD + GOOD.split("principles:\n")[1])
    with pytest.raises(DataError, match=r"dup.yaml:9: field 'principles\[1\].name'"):
        load_constitution(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_constitution(bad)
    with pytest.raises(DataError, match="not found"):
        load_constitution(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------- debiasing


class AlwaysFirst(FeedbackModel):
    """Pure position bias: always sure the first option is better."""

    def prefer_first(self, prompts, first, second, principle):
        return np.ones(len(prompts))


def _happiness(text: str) -> float:
    return text.count("happy") - text.count("sad")


class PrefersHappier(FeedbackModel):
    """P(first) = sigmoid(happiness difference) plus a position bias of +0.1 for the first."""

    def prefer_first(self, prompts, first, second, principle):
        d = np.array([_happiness(f) - _happiness(s) for f, s in zip(first, second)])
        return 1 / (1 + np.exp(-d)) + 0.1  # stays in [0, 1] for |d| <= 2


def test_always_first_gives_one_half_and_always_disagrees():
    p = load_constitution("stories").principle("happiness")
    cmp = AlwaysFirst().compare(["x", "y"], ["a", "b"], ["c", "d"], p)
    np.testing.assert_allclose(cmp.p_a_N, [0.5, 0.5])
    assert cmp.order_disagreement == 1.0


def test_happier_text_gets_the_right_soft_label():
    p = load_constitution("stories").principle("happiness")
    a = ["a happy day", "a sad day", "a day"]
    b = ["a sad day", "a happy day", "a day"]
    fb = PrefersHappier()
    cmp = fb.compare(["x"] * 3, a, b, p)
    # debiased: ((sigmoid(d) + 0.1) + 1 - (sigmoid(-d) + 0.1)) / 2 = sigmoid(d); the bias cancels
    sig = lambda d: 1 / (1 + np.exp(-d))  # noqa: E731
    np.testing.assert_allclose(cmp.p_a_N, [sig(2), sig(-2), 0.5])
    # the biased model's two orders disagree exactly where d = 0 (0.6 vs 0.4)
    np.testing.assert_array_equal(cmp.disagree_N, [False, False, True])
    # swapping A and B gives 1 - p
    np.testing.assert_allclose(fb.compare(["x"] * 3, b, a, p).p_a_N, 1 - cmp.p_a_N)
    assert fb.n_queries == 12
    assert fb.best_of(["x"], [["a sad day", "a day", "happy happy", "happy"]], p) == [2]


def test_debias_and_ensemble():
    c = debias(np.array([0.9, 0.2]), np.array([0.3, 0.4]))
    np.testing.assert_allclose(c.p_a_N, [0.8, 0.4])
    np.testing.assert_allclose(c.p_a_second_N, [0.7, 0.6])
    assert isinstance(c, Comparison) and c.order_disagreement == 0.5
    cons = load_constitution("stories").principles[:2]
    ens, per = compare_principles(PrefersHappier(), ["x"], ["happy"], ["sad"], cons)
    assert set(per) == {"happiness", "kindness"}
    np.testing.assert_allclose(ens.p_a_N, per["happiness"].p_a_N)


def test_parse_choice():
    assert parse_choice("A") == 1.0 and parse_choice(" (B) because") == 0.0
    assert parse_choice("Option B is better") == 0.0
    assert parse_choice("neither") is None and parse_choice("") is None


def test_embedding_labeler_prefers_the_happy_story():
    from rlhfstack.feedback import EmbeddingFeedback

    fb = EmbeddingFeedback()
    p = load_constitution("stories").principle("happiness")
    a = ["Lily laughed and hugged her mom. They had a happy, wonderful day."]
    b = ["Lily cried because her dog was lost and she was very sad and scared."]
    cmp = fb.compare(["Once upon a time,"], a, b, p)
    assert cmp.p_a_N[0] > 0.8
    assert cmp.order_disagreement == 0.0  # pointwise scores: the order cannot matter
    assert fb.cpu_seconds > 0


def test_causal_lm_labeler_is_debiased(stories_hf):
    from rlhfstack.feedback import CausalLMFeedback

    fb = CausalLMFeedback(str(stories_hf))
    p = load_constitution("stories").principle("fluency")
    a, b = ["The cat sat on the mat.", "ok"], ["mat the on sat", "A fine day."]
    ab, ba = fb.compare(["x", "y"], a, b, p), fb.compare(["x", "y"], b, a, p)
    assert np.all((ab.p_a_N > 0) & (ab.p_a_N < 1))
    np.testing.assert_allclose(ab.p_a_N, 1 - ba.p_a_N, atol=1e-9)


def test_soft_labels_travel_from_the_file_to_the_batch(tmp_path, stories_hf):
    import json

    from rlhfstack.data.collate import collate_preference, tokenize_preference
    from rlhfstack.data.loading import load_preferences
    from rlhfstack.models.core import load_tokenizer
    from rlhfstack.stages.reward_model import trim_padding

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Once", "chosen": "a happy day.", "rejected": "a sad day.", "p_chosen": 0.75},
        {"prompt": "Then", "chosen": "fun.", "rejected": "mud."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex, _ = load_preferences(path, adapter="plain", template="plain")
    assert [e.p_chosen for e in ex] == [0.75, 1.0]
    batch = collate_preference(tokenize_preference(ex, load_tokenizer(str(stories_hf)), 32), 0)
    assert batch["p_chosen"].tolist() == [0.75, 1.0]
    assert trim_padding(batch)["p_chosen"].tolist() == [0.75, 1.0]
    path.write_text(json.dumps({**rows[0], "p_chosen": 1.5}) + "\n")
    with pytest.raises(DataError, match="p_chosen"):
        load_preferences(path, adapter="plain", template="plain")


def test_an_order_that_answers_a_tie_disagrees_with_nothing():
    cmp = debias(np.array([0.9, 0.5, 0.9, 0.5]), np.array([0.9, 0.9, 0.1, 0.5]))
    # each ask: P(the option shown first is better). Pair 0 prefers whichever is shown first
    # (disagrees); pair 2 prefers A in both orders; pairs 1 and 3 hold a tie: no disagreement
    assert cmp.disagree_N.tolist() == [True, False, False, False]
