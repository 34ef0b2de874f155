"""rlhfstack.losses must depend on torch and the standard library only."""

import subprocess
import sys

import rlhfstack.losses as L


def test_importing_losses_does_not_import_transformers_peft_or_datasets():
    code = (
        "import rlhfstack.losses, sys; "
        "bad = [m for m in ('transformers', 'peft', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_public_api_is_re_exported():
    for name in L.__all__:
        assert callable(getattr(L, name)) or isinstance(getattr(L, name), (dict, tuple)), name
    for name in (
        "masked_sum",
        "masked_mean",
        "masked_var",
        "masked_whiten",
        "logprobs_from_logits",
        "entropy_from_logits",
        "kl_k1",
        "kl_k2",
        "kl_k3",
        "kl_estimate",
        "AdaptiveKLController",
        "FixedKLController",
        "last_token_index",
        "kl_shaped_rewards",
        "gae",
        "group_normalized_advantages",
        "leave_one_out_advantages",
        "explained_variance",
        "ppo_policy_loss",
        "ppo_value_loss",
        "entropy_bonus",
        "bradley_terry_loss",
        "dpo_loss",
        "kto_loss",
        "sequence_logprobs",
    ):
        assert name in L.__all__, name
