"""One benchmark child for TRL: times one trainer on one model size.

    .venv-bench-trl/bin/python bench/trl_side.py --algo dpo --model-dir runs/bench/models/35m
    .venv-bench-trl112/bin/python bench/trl_side.py --algo ppo --model-dir ...   # trl 1.12.0

``rm``: RewardTrainer, ``dpo``: DPOTrainer, ``grpo``: GRPOTrainer (trl 1.16.0); ``ppo``:
PPOTrainer (trl 1.12.0, the last release that has it: four models, a whole second model as the
value function). Settings mirror ``bench/ours.py``: batch 8 sequences (8 pairs for rm/dpo; 2
prompts x 4 samples for grpo), prompt 128 + completion 64 tokens, fp32, one PPO epoch of one
minibatch, constant learning rate, gradient clipping at 1.0, no logging or checkpoints, and
TRL's own defaults otherwise (gradient checkpointing on; ``--no-gradient-checkpointing`` turns
it off).
Seconds per step are the wall time between consecutive ``on_step_end`` callbacks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402


def _callback(timer: C.StepTimer):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_end(self, args, state, control, **kw):
            timer.tick()

    return Timing()


GRADIENT_CHECKPOINTING = True  # TRL's default in every trainer used here


def _common_args(out: str, steps: int) -> dict:
    return dict(
        gradient_checkpointing=GRADIENT_CHECKPOINTING,
        output_dir=out,
        per_device_train_batch_size=C.BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=C.LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=C.SEED,
        bf16=False,
        fp16=False,
    )


def bench_rm(model_dir: str, steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rows = C.preference_rows(tok, steps * C.BATCH)
    ds = Dataset.from_list(
        [
            {
                "chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
            }
            for r in rows
        ]
    )
    timer = C.StepTimer()
    args = RewardConfig(**_common_args(out, steps), max_length=C.PROMPT_LEN + C.COMPLETION_LEN)
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[_callback(timer)]
    )
    C.set_threads(NTHREADS)
    trainer.train()
    return timer.times


def bench_dpo(model_dir: str, steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = Dataset.from_list(C.preference_texts(tok, steps * C.BATCH))
    timer = C.StepTimer()
    args = DPOConfig(
        **_common_args(out, steps), max_length=C.PROMPT_LEN + C.COMPLETION_LEN, beta=0.1
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[_callback(timer)],
    )
    first = trainer.train_dataset[0]
    n = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
    assert n == (C.PROMPT_LEN, C.COMPLETION_LEN, C.COMPLETION_LEN), n
    C.set_threads(NTHREADS)
    trainer.train()
    return timer.times


def reward_fn(prompts=None, completions=None, **kw) -> list[float]:
    """Same reward as ``bench/ours.py``: distinct words / 64."""
    return [len(set(t.split())) / 64.0 for t in completions]


def bench_grpo(model_dir: str, steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = Dataset.from_dict({"prompt": C.text_prompts(tok, C.GRPO_PROMPTS * steps)})
    timer = C.StepTimer()
    args = GRPOConfig(
        **_common_args(out, steps),
        num_generations=C.GRPO_GENERATIONS,
        steps_per_generation=1,
        max_completion_length=C.COMPLETION_LEN,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        num_iterations=1,
        log_completions=False,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[_callback(timer)],
    )
    C.set_threads(NTHREADS)
    trainer.train()
    return timer.times


def bench_ppo(model_dir: str, steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_dict({"input_ids": C.prompt_rows(C.BATCH * steps)})
    timer = C.StepTimer()
    cargs = _common_args(out, steps)
    cargs.pop("max_steps")
    args = PPOConfig(
        **cargs,
        total_episodes=C.BATCH * steps,
        num_ppo_epochs=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=C.BATCH,
        response_length=C.COMPLETION_LEN,
        stop_token="eos",
        missing_eos_penalty=1.0,
        temperature=1.0,
        num_sample_generations=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=ds,
        callbacks=[_callback(timer)],
    )
    C.set_threads(NTHREADS)
    trainer.train()
    return timer.times


NTHREADS = 2


def main(argv: list[str] | None = None) -> dict:
    global NTHREADS, GRADIENT_CHECKPOINTING
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algo", required=True, choices=["rm", "dpo", "ppo", "grpo"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="turn off TRL's default gradient checkpointing (faster, more memory)",
    )
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    NTHREADS = a.threads
    GRADIENT_CHECKPOINTING = not a.no_gradient_checkpointing
    C.set_threads(a.threads)
    import torch
    import transformers
    import trl

    torch.manual_seed(C.SEED)
    n = a.warmup + a.steps
    fn = {"rm": bench_rm, "dpo": bench_dpo, "ppo": bench_ppo, "grpo": bench_grpo}[a.algo]
    with tempfile.TemporaryDirectory() as tmp:
        times = fn(a.model_dir, n, tmp)
    res = C.summarize(
        times,
        a.warmup,
        {
            "side": "trl",
            "algo": a.algo,
            "threads": a.threads,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "gradient_checkpointing": GRADIENT_CHECKPOINTING,
            "torch": torch.__version__,
        },
    )
    C.emit(res, a.out)
    return res


if __name__ == "__main__":
    main()
