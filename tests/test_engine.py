"""rlhfstack.distributed without a process group: launch variables, degrees, batch sharding,
layer splits, the meta-shadow restore, and the single-process pass-through."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfstack import distributed


def _par(dp=1, tp=1, pp=1):
    return SimpleNamespace(dp_shard=dp, tp=tp, pp=pp)


def tiny_llama(tie: bool = True, seed: int = 0):
    """hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 64 (pad 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


# ----------------------------------------------------------------------------- launch env


def test_launch_env_torchrun_slurm_and_single(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed.launch_env() == (5, 8, 1)
    # torchrun (e.g. torchrun inside an sbatch script) wins over SLURM's variables
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.launch_env() == (3, 4, 3)


def test_single_task_sbatch_is_not_distributed(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.launch_env() == (0, 1, 0)


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[012-015,020],cpu3", "gpu012"), ("node7", "node7"), ("a[3,5]", "a3"), ("x1,x2", "x1")],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.launch._first_slurm_host(nodelist) == first


def test_rendezvous_env_from_slurm(monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST"):
        monkeypatch.setenv(k, "x")  # so that monkeypatch restores the original state afterwards
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[04-05]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    distributed.launch._ensure_rendezvous_env()
    import os

    assert os.environ["MASTER_ADDR"] == "gpu04"
    assert 20000 <= int(os.environ["MASTER_PORT"]) < 40000


# ----------------------------------------------------------------------------- degrees


def test_resolve_degrees():
    assert distributed.resolve_degrees(_par(), 1) == (1, 1, 1)
    assert distributed.resolve_degrees(_par(dp=2, tp=2), 4) == (2, 2, 1)
    assert distributed.resolve_degrees(_par(dp=-1, tp=2), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        distributed.resolve_degrees(_par(dp=2), 1)
    with pytest.raises(ValueError, match="product is the world size"):
        distributed.resolve_degrees(_par(dp=2), 4)
    with pytest.raises(ValueError, match=">= 1"):
        distributed.resolve_degrees(_par(tp=0), 1)


def test_init_single_process_starts_nothing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    st = distributed.init_distributed(_par(), "cpu")
    assert not st.distributed and st.is_main and st.dp_rank == 0 and st.mesh is None
    assert distributed.is_main()
    assert not torch.distributed.is_initialized()
    # collectives are no-ops
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and distributed.sum_stats({"a": 1.0}) == {"a": 1.0}


def test_setup_run_refuses_unlaunched_parallel(tmp_path, monkeypatch):
    from rlhfstack.configs import load_config, to_object
    from rlhfstack.training import setup_run

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    # the process layout is under test, not the inputs (tests/test_config_checks.py checks those)
    monkeypatch.setattr("rlhfstack.training.check_paths", lambda cfg: None)
    cfg = to_object(load_config("sft", [f"run_dir={tmp_path}/r", "parallel.dp_shard=2"]))
    with pytest.raises(ValueError, match="torchrun"):
        setup_run(cfg)
    # stages without a distributed loop (demo data generation) refuse several processes...
    cfg = to_object(load_config("demo_data", [f"run_dir={tmp_path}/p", "parallel.dp_shard=2"]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotImplementedError, match="one process"):
        setup_run(cfg)
    # ...and run in one process, ignoring parallel.*, when launched alone
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    run = setup_run(cfg)
    assert not run.dist.distributed and run.is_main and run.device == "cpu"
    run.logger.close()


# ----------------------------------------------------------------------------- batches / layers


def test_shard_batch_contiguous_slices():
    b = {
        "ids": torch.arange(12).reshape(6, 2),
        "n": torch.arange(6),
        "scalar": torch.tensor(3.0),
        "x": "keep",
    }
    s0, s1 = distributed.shard_batch(b, 0, 2), distributed.shard_batch(b, 1, 2)
    assert s0["ids"].tolist() == [[0, 1], [2, 3], [4, 5]] and s1["n"].tolist() == [3, 4, 5]
    assert s0["scalar"] is b["scalar"] and s1["x"] == "keep"
    assert distributed.shard_batch(b, 0, 1) is b
    with pytest.raises(ValueError, match="not divisible"):
        distributed.shard_batch(b, 0, 4)


def test_split_layers():
    assert [list(r) for r in distributed.split_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in distributed.split_layers(8, 4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="exceeds"):
        distributed.split_layers(2, 3)


def test_find_trunk_and_blocks():
    m = tiny_llama()
    assert distributed.find_trunk(m) is m.model
    assert len(distributed.decoder_layers(m)) == 2
    with pytest.raises(ValueError, match="Llama-style"):
        distributed.find_trunk(torch.nn.Linear(2, 2))
    enc = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    assert len(distributed.decoder_layers(enc)) == 3


# ----------------------------------------------------------------------------- shadow restore


def test_meta_copy_and_restore_plain_keep_identity_and_tying():
    m = tiny_llama(tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    shadow = distributed.meta_copy(m)
    assert shadow.lm_head.weight is shadow.model.embed_tokens.weight
    assert shadow.lm_head.weight.is_meta
    target = tiny_llama(tie=True, seed=1).state_dict()
    obj_id = id(m)
    # damage the live model as sharding would (swap a layer out)
    m.model.layers[0] = torch.nn.Identity()
    distributed.restore_plain(m, shadow, target, "cpu")
    assert id(m) == obj_id and type(m).__name__ == "LlamaForCausalLM"
    assert m.lm_head.weight is m.model.embed_tokens.weight
    for k, v in m.state_dict().items():
        assert torch.equal(v, target[k]), k
    ids = torch.randint(1, 64, (2, 5))
    assert m(ids).logits.shape == (2, 5, 64)


def test_replica_value_head_reads_the_trained_heads_bits():
    """A rollout replica is a frozen copy; its values must be the trained head's bit for bit (on
    a strided response slice, a one-column product's CPU kernel depends on requires_grad)."""
    import copy

    from rlhfstack.models.core import ValueHead

    torch.manual_seed(0)
    head = ValueHead(64)
    h_BRD = torch.randn(64, 88, 64)[:, 39:-1]  # the response slice of a [B, T, D] trunk output
    frozen = copy.deepcopy(head).requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(head(h_BRD), frozen(h_BRD))


# ----------------------------------------------------------------------------- single-process facade


def _sft_loss(model):
    from rlhfstack.models.core import causal_lm_parts, trunk_hidden

    def loss_fn(mb, n):
        trunk, head = causal_lm_parts(model)
        h = trunk_hidden(trunk, mb["input_ids"], mb["attention_mask"])
        logits = head(h[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 64),
            mb["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return nll / n, {"nll": float(nll.detach())}

    return loss_fn


def _batch(B=8, T=10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (B, T), generator=g)
    att = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        att[i, 5 + i % 5 :] = 0
    ids[att == 0] = 0
    labels = ids.masked_fill(att == 0, -100)
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def test_distributed_model_single_process_matches_plain_loop():
    b = _batch()
    m1, m2 = tiny_llama(), tiny_llama()
    loss_fn = _sft_loss(m1)
    total = 0.0
    for i in range(0, 8, 3):
        mb = {k: v[i : i + 3] for k, v in b.items()}
        loss, _ = loss_fn(mb, 8)
        loss.backward()
        total += float(loss.detach())
    dm = distributed.DistributedModel(m2, list(m2.parameters()), distributed.ParallelState())
    loss2, stats = dm.forward_backward(b, _sft_loss(m2), 8, 3)
    assert loss2 == pytest.approx(total, rel=1e-6)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)
    norm = dm.clip_grad(0.5)
    assert norm > 0.5
    assert float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m2.parameters()]))
    ) == (pytest.approx(0.5, rel=1e-4))
    dm.finalize()  # no-op in one process


def test_bf16_autocast_single_process():
    b = _batch()
    m = tiny_llama()
    ref, _ = _sft_loss(m)(b, 8)
    m.zero_grad()
    dm = distributed.DistributedModel(
        m, list(m.parameters()), distributed.ParallelState(), mixed_precision="bf16"
    )
    loss, _ = dm.forward_backward(b, _sft_loss(m), 8, 8)
    assert loss == pytest.approx(float(ref.detach()), rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(ValueError, match="mixed_precision"):
        distributed.DistributedModel(m, [], distributed.ParallelState(), mixed_precision="fp8")


def test_clip_grad_norm_plain_tensors():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert distributed.clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
