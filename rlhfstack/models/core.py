"""Loading policies, references, value heads and reward models; sequence log-probs.

Every model here is an HF causal LM (or, for reward models, optionally an encoder) loaded from a
local directory (or a hub id where the hub is reachable). Dropout is switched off everywhere:
with dropout on, the rollout pass and the training pass disagree and PPO's ratio is not 1
before the first update.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from rlhfstack.losses import (
    entropy_from_logits,
    kl_full_from_logits,
    last_token_index,
    logprobs_from_logits,
)
from rlhfstack.models.paths import resolve_model_path
from rlhfstack.runtime import atomic_dir, require

log = logging.getLogger("rlhfstack.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and config attributes)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for name in (
            "attention_dropout",
            "hidden_dropout",
            "dropout",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
        ):
            if hasattr(cfg, name) and isinstance(getattr(cfg, name), float):
                setattr(cfg, name, 0.0)


def load_tokenizer(path: str, pad_token: str | None = None) -> Any:
    """Load a tokenizer and check it has a PAD token distinct from EOS.

    ``pad_token`` names an existing vocabulary entry to use as PAD for tokenizers that have none or
    reuse EOS (Llama-3: ``<|finetune_right_pad_id|>`` / a reserved special token; Qwen2:
    ``<|fim_pad|>``). It must already be in the vocabulary: the embedding is never resized here.
    """

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if pad_token is not None and (tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id):
        pad_id = tok.convert_tokens_to_ids(pad_token)
        if pad_id is None or pad_id == tok.unk_token_id or pad_id == tok.eos_token_id:
            raise ValueError(
                f"model.pad_token: {pad_token!r} is not a distinct token of the vocabulary of {path}"
            )
        tok.pad_token = pad_token
    if tok.pad_token_id is None:
        raise ValueError(
            f"{path}: tokenizer has no pad token; name an unused vocabulary entry with model.pad_token "
            "(never reuse EOS as PAD)"
        )
    if tok.pad_token_id == tok.eos_token_id:
        raise ValueError(
            f"{path}: pad_token_id == eos_token_id ({tok.pad_token_id}); masks built from ids != pad "
            "would hide real EOS tokens. Name another vocabulary entry with model.pad_token."
        )
    return tok


def load_causal_lm(
    path: str,
    *,
    dtype: str = "float32",
    lora: Any | None = None,
    activation_checkpointing: bool = False,
    device: str = "cpu",
    trainable: bool = True,
) -> nn.Module:
    """Load an HF causal LM with dropout off; wrap it with LoRA adapters when ``lora.enabled``.

    ``path``: an HF directory or hub name, or a ``pkg:`` / ``pkgparts:`` / ``pkggguf:`` / ``*.gguf``
    path (:func:`rlhfstack.models.paths.resolve_model_path`).

    With ``lora.quantize_4bit`` the frozen base is loaded in bitsandbytes NF4 (QLoRA; GPU only).
    """

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if lora is not None and getattr(lora, "quantize_4bit", False):
        if not torch.cuda.is_available():
            raise RuntimeError("model.lora.quantize_4bit (QLoRA) needs a CUDA GPU and bitsandbytes")
        require("bitsandbytes", "model.lora.quantize_4bit=true")

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype(dtype) if dtype != "float32" else torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kwargs)
    disable_dropout(model)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora is not None and getattr(lora, "enabled", False):
        peft = require("peft", "model.lora.enabled=true")
        if getattr(lora, "quantize_4bit", False):
            model = peft.prepare_model_for_kbit_training(model)
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model.to(device) if "quantization_config" not in kwargs else model


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(trunk, lm_head) of an HF causal LM, also through a peft wrapper."""
    lm = model
    if hasattr(lm, "get_base_model"):  # peft.PeftModel
        lm = lm.get_base_model()
    trunk = getattr(lm, lm.base_model_prefix)
    return trunk, lm.get_output_embeddings()


def adapter_disabled(model: nn.Module):
    """Context manager: the LoRA adapter switched off (the reference policy), or a no-op."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return nullcontext()


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    pos = attention_mask_BT.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def trunk_hidden(
    trunk: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
) -> torch.Tensor:
    """Last hidden states ``[B, T, D]`` with positions derived from the mask."""
    out = trunk(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids_from_mask(attention_mask_BT),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def response_logprobs(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
    return_entropy: bool = False,
    ref_logprobs_BRV: torch.Tensor | None = None,
    return_log_softmax: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of the response tokens ``input_ids[:, response_start:]``.

    Shapes: input ``[B, T]``; outputs ``logprobs_BR`` with ``R = T - response_start``.
    The logits at position ``t`` predict token ``t+1``, so response token ``j`` (at index
    ``response_start + j``) is scored by the logits at ``response_start + j - 1``; the value of
    the state before token ``j`` is read at the same position. Only the response slice of the
    hidden states goes through the LM head (no ``[B, T, V]`` tensor over the prompt).

    ``ref_logprobs_BRV`` (a reference's ``log_softmax`` over the vocabulary at the same
    positions) adds ``kl_full``: the exact per-token KL to it. ``return_log_softmax`` adds
    ``log_softmax`` ``[B, R, V]`` (to serve as such a reference).
    """
    trunk, lm_head = causal_lm_parts(model)
    hidden_BTD = trunk_hidden(trunk, input_ids_BT, attention_mask_BT)
    h_BRD = hidden_BTD[:, response_start - 1 : -1]
    logits_BRV = lm_head(h_BRD).float()
    labels_BR = input_ids_BT[:, response_start:]
    out = {"logprobs": logprobs_from_logits(logits_BRV, labels_BR, temperature)}
    if return_entropy:
        out["entropy"] = entropy_from_logits(logits_BRV, temperature)
    if ref_logprobs_BRV is not None:
        out["kl_full"] = kl_full_from_logits(logits_BRV, ref_logprobs_BRV, temperature)
    if return_log_softmax:
        out["log_softmax"] = torch.log_softmax(logits_BRV / temperature, dim=-1)
    if value_head is not None:
        out["values"] = value_head(h_BRD).squeeze(-1).float()
    return out


def sequence_logprob_sums(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
) -> torch.Tensor:
    """Sum of log p(token) over positions where ``loss_mask`` is 1 (right-padded sequences).

    ``loss_mask_BT[:, t] == 1`` marks token ``t`` as a scored (response) token. Returns ``[B]``.
    """
    trunk, lm_head = causal_lm_parts(model)
    hidden_BTD = trunk_hidden(trunk, input_ids_BT, attention_mask_BT)
    logits = lm_head(hidden_BTD[:, :-1]).float()
    lp_BT = logprobs_from_logits(logits, input_ids_BT[:, 1:])
    mask = loss_mask_BT[:, 1:].to(lp_BT.dtype)
    return (lp_BT * mask).sum(-1)


# ----------------------------------------------------------------------------- heads


class ScalarHead(nn.Module):
    """Linear ``d -> k`` head; std 1/sqrt(d+1) init (Stiennon et al. 2020), zero bias."""

    def __init__(self, d_model: int, k: int = 1, init_std: float | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, k)
        std = init_std if init_std is not None else 1.0 / math.sqrt(d_model + 1)
        nn.init.normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(self.linear.weight.dtype))


class RewardModel(nn.Module):
    """Backbone + scalar head(s). ``forward`` returns raw scores ``[B, k]`` at the last real token.

    ``backbone="causal_lm"``: the trunk of a causal LM, read at the last non-pad token.
    ``backbone="encoder"``: a BERT-style encoder, pooled by ``pooling``: ``mean`` (all real
    tokens), ``response_mean`` (tokens after the first ``[SEP]``: the response segment of
    ``[CLS] prompt [SEP] response [SEP]``) or ``cls``. With ``sep_token_id`` set, token type ids
    (0 = prompt, 1 = response) are derived from the first ``[SEP]``.
    ``max_length``/``max_response_tokens``/``template`` record how inputs were built in training
    (saved in ``reward_config.json``; see ``rlhfstack.models.encoders.score_texts``).
    ``gain``/``bias`` map raw scores to normalized rewards (``normalized = gain * raw + bias``),
    fitted so that SFT samples average 0 with std 1.
    """

    def __init__(
        self,
        backbone: nn.Module,
        kind: str = "causal_lm",
        k: int = 1,
        init_std: float | None = None,
        pooling: str = "mean",
        sep_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("causal_lm", "encoder"):
            raise ValueError(f"rm.backbone: unknown kind {kind!r} (causal_lm | encoder)")
        if pooling not in ("mean", "response_mean", "cls"):
            raise ValueError(
                f"rm.pooling: unknown pooling {pooling!r} (mean | response_mean | cls)"
            )
        self.kind = kind
        self.pooling = pooling
        self.sep_token_id = sep_token_id
        self.max_length: int | None = None
        self.max_response_tokens: int | None = None
        self.template: str | None = None
        self.backbone = backbone
        d = backbone.config.hidden_size
        self.head = ScalarHead(d, k, init_std)
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    def trunk(self) -> nn.Module:
        if self.kind == "causal_lm":
            return causal_lm_parts(self.backbone)[0]
        return self.backbone

    def raw_scores(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
    ) -> torch.Tensor:
        """Unnormalized head outputs ``[B, k]``."""
        if self.kind == "causal_lm":
            h_BTD = trunk_hidden(self.trunk(), input_ids_BT, attention_mask_BT)
            idx_B = last_token_index(attention_mask_BT)
            h_BD = h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), idx_B]
        else:
            att_BT = attention_mask_BT.bool()
            kw = {}
            pool_BT = att_BT
            if self.sep_token_id is not None:
                sep_BT = ((input_ids_BT == self.sep_token_id) & att_BT).long()
                seg_BT = ((sep_BT.cumsum(-1) - sep_BT) > 0) & att_BT  # after the first [SEP]
                kw["token_type_ids"] = seg_BT.long()
                if self.pooling == "response_mean":
                    has_B1 = seg_BT.any(-1, keepdim=True)
                    pool_BT = torch.where(has_B1, seg_BT, att_BT)
            out = self.backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT, **kw)
            h_BTD = out.last_hidden_state
            if self.pooling == "cls":
                h_BD = h_BTD[:, 0]
            else:
                m = pool_BT.unsqueeze(-1).to(h_BTD.dtype)
                h_BD = (h_BTD * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(h_BD).float()

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        return self.raw_scores(input_ids_BT, attention_mask_BT)

    @torch.no_grad()
    def score(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Normalized reward: ``mean`` and ``std`` over ensemble heads, each ``[B]``."""
        r_Bk = self.raw_scores(input_ids_BT, attention_mask_BT) * self.gain + self.bias
        std = r_Bk.std(-1) if r_Bk.shape[-1] > 1 else torch.zeros_like(r_Bk[:, 0])
        return {"mean": r_Bk.mean(-1), "std": std}

    @torch.no_grad()
    def sequence_classifier(self, pad_token_id: int | None) -> tuple[nn.Module, float] | None:
        """This causal-LM reward model as a standard ``*ForSequenceClassification`` model
        (``num_labels=1``) and the constant ``offset`` with ``score = logits + offset``; None when
        transformers has no sequence-classification class for the backbone's architecture or no
        ``pad_token_id`` is known.

        The ensemble mean and the normalization fold into the score head: ``mean_k(gain *
        (w_k . h + b_k) + bias) = (gain * mean_k w_k) . h + (gain * mean_k b_k + bias)``. The
        score head of transformers' decoder classifiers is ``nn.Linear(d, 1, bias=False)`` and
        the final RMS/LayerNorm rescales every hidden feature, so no feature of ``h`` is a
        constant that could carry the additive term: it is stored as ``config.reward_offset``
        (and in the model card). Differences of scores, hence preferences and Bradley-Terry
        probabilities, are exact without it. ``pad_token_id`` goes into the config so that
        transformers reads the last non-pad token, as :meth:`raw_scores` does (right padding;
        positions count from the first token)."""
        if self.kind != "causal_lm":
            return None
        pad_token_id = (
            pad_token_id if pad_token_id is not None else self.backbone.config.pad_token_id
        )
        if pad_token_id is None:  # transformers would read the last position, PAD or not
            log.warning(
                "reward model saved without a sequence-classification export: no pad_token_id "
                "given (RewardModel.save(..., pad_token_id=tokenizer.pad_token_id))"
            )
            return None
        config = copy.deepcopy(self.backbone.config)
        config.num_labels = 1
        config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
        config.problem_type = "regression"
        config.pad_token_id = int(pad_token_id)
        config.architectures = None
        weight_1D = self.head.linear.weight.float().mean(0, keepdim=True) * float(self.gain)
        offset = float(self.head.linear.bias.float().mean() * float(self.gain) + float(self.bias))
        config.reward_offset = offset
        trunk = self.trunk()
        dtype = next(trunk.parameters()).dtype
        try:
            seq = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        except ValueError:  # no *ForSequenceClassification for this model type
            return None
        score = getattr(seq, "score", None)
        if not isinstance(score, nn.Linear) or score.weight.shape != weight_1D.shape:
            return None
        getattr(seq, seq.base_model_prefix).load_state_dict(trunk.state_dict())
        score.weight.copy_(weight_1D.to(score.weight.dtype))
        return seq.eval(), offset

    def save(self, out_dir: str | os.PathLike, pad_token_id: int | None = None) -> None:
        """The backbone as an HF directory + ``reward_head.safetensors`` + ``reward_config.json``.

        A causal-LM reward model is saved as a sequence-classification model
        (:meth:`sequence_classifier`): ``AutoModelForSequenceClassification.from_pretrained``
        loads the directory and its logits plus ``config.reward_offset`` are this model's
        normalized scores (the ensemble mean). The head file keeps every ensemble head for
        :meth:`load` (the ensemble spread, the critic's initialization). Encoders are saved as
        their base model: transformers' encoder classifiers read a tanh pooler of ``[CLS]``,
        not the mean pooling these reward models use, so no standard class scores like them."""
        out = Path(out_dir)
        exported = self.sequence_classifier(pad_token_id)
        if exported is not None:
            exported[0].save_pretrained(out)
            layout = "sequence_classification"
        else:
            self.backbone.save_pretrained(out)
            layout = "base_model"
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
            str(out / "reward_head.safetensors"),
        )
        (out / "reward_config.json").write_text(
            json.dumps(
                {
                    "kind": self.kind,
                    "layout": layout,
                    "k": self.head.linear.out_features,
                    "gain": float(self.gain),
                    "bias": float(self.bias),
                    "offset": exported[1] if exported is not None else None,
                    "pooling": self.pooling,
                    "sep_token_id": self.sep_token_id,
                    "max_length": self.max_length,
                    "max_response_tokens": self.max_response_tokens,
                    "template": self.template,
                },
                indent=2,
            )
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"
    ) -> RewardModel:
        """Read a directory written by :meth:`save` (either layout)."""
        path = Path(path)
        cfg_path = path / "reward_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"{cfg_path}: not a reward model directory (reward_config.json missing)"
            )
        meta = json.loads(cfg_path.read_text())
        if meta.get("layout") == "sequence_classification":
            # the trunk is read from it; its score head (the folded mean) stays unused
            backbone = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch_dtype(dtype)
            )
            disable_dropout(backbone)
        elif meta["kind"] == "causal_lm":
            backbone = load_causal_lm(str(path), dtype=dtype, trainable=False)
        else:
            backbone = AutoModel.from_pretrained(str(path), dtype=torch_dtype(dtype))
            disable_dropout(backbone)
        rm = cls(
            backbone,
            kind=meta["kind"],
            k=int(meta["k"]),
            pooling=meta.get("pooling", "mean"),
            sep_token_id=meta.get("sep_token_id"),
        )
        rm.max_length = meta.get("max_length")
        rm.max_response_tokens = meta.get("max_response_tokens")
        rm.template = meta.get("template")
        rm.head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
        rm.gain.fill_(meta["gain"])
        rm.bias.fill_(meta["bias"])
        rm.requires_grad_(False)
        return rm.eval().to(device)


class RewardEnsemble(nn.Module):
    """Several separately trained :class:`RewardModel` s behind the same ``score()`` interface.

    ``score`` returns ``mean`` and ``std`` ``[B]`` over every head of every member (normalized
    rewards), so PPO can use the uncertainty-penalized reward ``mean - lam * std``
    (:meth:`penalized`; Coste et al. 2023). Members must read the same token ids (same kind,
    tokenizer and input layout). A directory holding ``ensemble.json`` (``{"members": [dirs]}``,
    relative to that directory) loads as an ensemble (:func:`load_reward_model`).
    """

    def __init__(self, members: list[RewardModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("RewardEnsemble needs at least one member")
        ref = members[0]
        for m in members[1:]:
            same = (m.kind, m.sep_token_id, m.backbone.config.vocab_size) == (
                ref.kind,
                ref.sep_token_id,
                ref.backbone.config.vocab_size,
            )
            if not same:
                raise ValueError(
                    "RewardEnsemble members must share kind, tokenizer and input layout"
                )
        self.members = nn.ModuleList(members)

    def __getattr__(self, name: str) -> Any:
        if name in ("kind", "backbone", "max_length", "max_response_tokens", "template", "pooling"):
            return getattr(self._modules["members"][0], name)
        return super().__getattr__(name)

    @torch.no_grad()
    def score(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``mean``/``std`` ``[B]`` over all heads of all members; ``all`` ``[B, sum_k]``."""
        r_BK = torch.cat(
            [m.raw_scores(input_ids_BT, attention_mask_BT) * m.gain + m.bias for m in self.members],
            -1,
        )
        std = r_BK.std(-1) if r_BK.shape[-1] > 1 else torch.zeros_like(r_BK[:, 0])
        return {"mean": r_BK.mean(-1), "std": std, "all": r_BK}

    def penalized(
        self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """Uncertainty-penalized reward ``mean - lam * std``, ``[B]``."""
        out = self.score(input_ids_BT, attention_mask_BT)
        return out["mean"] - lam * out["std"]

    @staticmethod
    def write_spec(out_dir: str | os.PathLike, member_dirs: list[str | os.PathLike]) -> Path:
        """Write ``out_dir/ensemble.json`` naming member directories (stored relative to it)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rel = [os.path.relpath(Path(d).resolve(), out.resolve()) for d in member_dirs]
        (out / "ensemble.json").write_text(json.dumps({"members": rel}, indent=2))
        return out / "ensemble.json"

    @classmethod
    def load(
        cls, paths: str | os.PathLike | list, dtype: str = "float32", device: str = "cpu"
    ) -> RewardEnsemble:
        """From a list of RewardModel directories, or a directory holding ``ensemble.json``."""
        if not isinstance(paths, list | tuple):
            spec = Path(paths) / "ensemble.json"
            if not spec.exists():
                raise FileNotFoundError(f"{spec}: not an ensemble directory")
            paths = [Path(paths) / p for p in json.loads(spec.read_text())["members"]]
        return cls([RewardModel.load(p, dtype=dtype, device=device) for p in paths]).eval()


def load_reward_model(
    path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"
) -> RewardModel | RewardEnsemble:
    """A :class:`RewardEnsemble` if ``path`` holds ``ensemble.json``, else a :class:`RewardModel`."""
    if (Path(path) / "ensemble.json").exists():
        return RewardEnsemble.load(path, dtype=dtype, device=device)
    return RewardModel.load(path, dtype=dtype, device=device)


class ValueHead(nn.Module):
    """Value head ``[..., D] -> [..., 1]`` on the policy trunk: weight std 1/sqrt(D+1), bias 0."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(d_model + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # contiguous: on a strided [B, R, D] slice, a one-column product picks its CPU kernel by
        # whether the weight requires grad, so a frozen rollout replica would read other values
        # (last bits) than the trained head; the contiguous product is the one a trained head runs
        return self.linear(h.to(self.linear.weight.dtype).contiguous())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_hf(
    model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, merge_lora: bool = True
) -> None:
    """Save model + tokenizer as one HF directory (LoRA merged by default), atomically."""

    with atomic_dir(out_dir) as tmp:
        m = model
        if merge_lora and hasattr(m, "merge_and_unload"):
            m = copy.deepcopy(m).merge_and_unload()
        m.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def tokenizer_for(model_cfg: Any) -> Any:
    """The tokenizer of a ``ModelConfig`` (``tokenizer_path`` or ``path``, with ``pad_token``)."""
    return load_tokenizer(
        model_cfg.tokenizer_path or model_cfg.path, getattr(model_cfg, "pad_token", None)
    )
