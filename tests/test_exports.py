"""Exports that load anywhere: the RM as a standard sequence-classification directory, value
heads in safetensors, model cards with Hugging Face metadata and no absolute paths."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhfstack.models.card import render_card
from rlhfstack.models.core import RewardModel, load_causal_lm, load_tokenizer
from rlhfstack.models.encoders import encode_for_reward, score_texts

PROMPTS = ["Once upon a time", "Lily had a cat.", "Tom", "The sun was hot and"]
RESPONSES = [
    " there was a big dog. It was happy.",
    " It liked to play.",
    " ran to the park with his mom and saw a bird in a tree.",
    " they went to swim.",
]
ATOL = 1e-5  # float32: folding gain into the weights changes the rounding only


def _tiny_rm(stories_hf, k: int = 2) -> RewardModel:
    torch.manual_seed(0)
    rm = RewardModel(load_causal_lm(str(stories_hf), trainable=False), kind="causal_lm", k=k)
    with torch.no_grad():  # a trained-looking head: nonzero biases, a normalization
        rm.head.linear.bias.copy_(torch.tensor([0.3, -0.7][:k]))
        rm.gain.fill_(2.5)
        rm.bias.fill_(-0.4)
    rm.max_length = 64
    return rm.eval()


def test_rm_export_loads_with_plain_transformers_and_scores_like_the_project(stories_hf, tmp_path):
    tok = load_tokenizer(str(stories_hf))
    rm = _tiny_rm(stories_hf)
    rm.save(tmp_path / "rm", pad_token_id=tok.pad_token_id)
    meta = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert meta["layout"] == "sequence_classification"

    ours = score_texts(rm, tok, PROMPTS, RESPONSES, max_len=64)["mean"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    # the project's input layout ([BOS] prompt response EOS), right-padded into one batch
    ids = [e[0] for e in encode_for_reward(tok, "causal_lm", PROMPTS, RESPONSES, 64)]
    assert len({len(x) for x in ids}) > 1  # the batch really holds padding
    T = max(len(x) for x in ids)
    ids_BT = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])
    with torch.no_grad():
        logits_B = hf(input_ids=ids_BT, attention_mask=(ids_BT != tok.pad_token_id)).logits[:, 0]
    offset = hf.config.reward_offset
    # the constant: mean head bias times gain plus the normalization bias
    assert offset == pytest.approx(2.5 * (0.3 - 0.7) / 2 - 0.4, abs=1e-6)
    assert (logits_B + offset).tolist() == pytest.approx(ours.tolist(), abs=ATOL)
    # one at a time (no padding) gives the same numbers
    for i, x in enumerate(ids):
        with torch.no_grad():
            one = hf(input_ids=torch.tensor([x])).logits[0, 0] + offset
        assert float(one) == pytest.approx(float(ours[i]), abs=ATOL)

    # the project's own loader reads the new layout: same scores, ensemble spread kept
    back = RewardModel.load(tmp_path / "rm")
    again = score_texts(back, tok, PROMPTS, RESPONSES, max_len=64)
    assert again["mean"].tolist() == pytest.approx(ours.tolist(), abs=ATOL)
    assert again["std"].tolist() == pytest.approx(
        score_texts(rm, tok, PROMPTS, RESPONSES, max_len=64)["std"].tolist(), abs=ATOL
    )
    assert back.max_length == 64


def test_rm_saved_without_pad_id_keeps_the_base_layout(stories_hf, tmp_path):
    rm = _tiny_rm(stories_hf, k=1)
    rm.backbone.config.pad_token_id = None
    rm.save(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert meta["layout"] == "base_model" and meta["offset"] is None
    tok = load_tokenizer(str(stories_hf))
    back = RewardModel.load(tmp_path / "rm")
    a = score_texts(rm, tok, PROMPTS, RESPONSES, max_len=64)["mean"]
    b = score_texts(back, tok, PROMPTS, RESPONSES, max_len=64)["mean"]
    assert b.tolist() == pytest.approx(a.tolist(), abs=ATOL)


def test_card_metadata_and_relative_paths(tmp_path):
    out = tmp_path / "run" / "sft" / "model"
    data = tmp_path / "run" / "data" / "sft_train.jsonl"
    text = render_card(
        title="SFT",
        description="d",
        base_model=str(tmp_path / "base_model"),
        datasets=[str(data), "Anthropic/hh-rlhf"],
        tags=["sft"],
        license="mit",
        sections={"Training": {"lr": 1e-4, "data": str(data)}},
        out_dir=out,
    )
    head, _, body = text.partition("\n---\n")
    assert head.startswith("---\n")
    assert 'library_name: "transformers"' in head and 'license: "mit"' in head
    assert '- "Anthropic/hh-rlhf"' in head and "base_model" not in head  # a local path: body only
    assert str(tmp_path) not in text
    assert "../../base_model" in body and "../../data/sft_train.jsonl" in body
    # a hub id is metadata
    assert 'base_model: "meta-llama/Llama-3.1-8B"' in render_card(
        title="t", base_model="meta-llama/Llama-3.1-8B", out_dir=out
    )


def _front_matter(card: str) -> str:
    assert card.startswith("---\n"), card[:200]
    return card.split("\n---\n", 1)[0]


def test_pipeline_exports_cards_an_hf_reward_model_and_a_safetensors_critic(smoke):
    """The demo_smoke pipeline: every model directory has a README.md card with metadata and no
    absolute path; the RM loads with plain transformers and scores as the project's loader;
    PPO's critic (value_model=separate) is safetensors that loads back into a fresh critic."""
    from safetensors.torch import load_file

    from rlhfstack.models.value import VALUE_FILE, build_value_model, load_value_model

    for stage in ("sft", "rm", "ppo", "dpo"):
        card = (smoke / stage / "model" / "README.md").read_text()
        meta = _front_matter(card)
        assert 'library_name: "transformers"' in meta and '- "rlhfstack"' in meta, stage
        assert str(smoke) not in card and "/tmp" not in card, stage
        assert "## Training" in card, stage
    rm_card = (smoke / "rm" / "model" / "README.md").read_text()
    assert 'pipeline_tag: "text-classification"' in rm_card
    for word in ("Length", "Flattery", "Sanity", "reward_offset"):
        assert word in rm_card
    assert not (smoke / "rm" / "model" / "MODEL_CARD.md").exists()

    rm_dir = smoke / "rm" / "model"
    tok = load_tokenizer(str(rm_dir))
    ours = score_texts(RewardModel.load(rm_dir), tok, PROMPTS, RESPONSES)["mean"]
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    ids = [e[0] for e in encode_for_reward(tok, "causal_lm", PROMPTS, RESPONSES, 128)]
    T = max(len(x) for x in ids)
    ids_BT = torch.tensor([x + [tok.pad_token_id] * (T - len(x)) for x in ids])
    with torch.no_grad():
        logits_B = hf(input_ids=ids_BT, attention_mask=(ids_BT != tok.pad_token_id)).logits[:, 0]
    assert (logits_B + hf.config.reward_offset).tolist() == pytest.approx(ours.tolist(), abs=ATOL)

    value_file = smoke / "ppo" / VALUE_FILE
    assert not list((smoke / "ppo").glob("*.pt"))
    saved = load_file(str(value_file))
    assert "head.linear.weight" in saved
    critic = build_value_model(
        "separate", policy_hidden_size=0, reward_model=RewardModel.load(rm_dir)
    )
    load_value_model(critic, value_file)
    assert torch.equal(critic.head.linear.weight, saved["head.linear.weight"])


def test_critic_from_an_exported_rm_trains_only_what_it_runs(stories_hf, tmp_path):
    """Every trainable weight of a critic built from the exported RM gets a gradient: the
    classifier's ``score`` head, which the critic never runs, is frozen (a trainable weight
    without gradient has no optimizer state, and a checkpoint could not be restored)."""
    from rlhfstack.models.value import build_value_model

    tok = load_tokenizer(str(stories_hf))
    _tiny_rm(stories_hf).save(tmp_path / "rm", pad_token_id=tok.pad_token_id)
    critic = build_value_model(
        "separate", policy_hidden_size=0, reward_model=RewardModel.load(tmp_path / "rm")
    )
    ids_BT = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 6, 10, 14, 18, 22]])
    critic.values(ids_BT, torch.ones_like(ids_BT), start=3).sum().backward()
    trainable = {n: p for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and not any("score" in n for n in trainable)
    assert [n for n, p in trainable.items() if p.grad is None] == []
