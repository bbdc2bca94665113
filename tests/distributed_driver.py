"""Runs a few optimiser steps of the SFT and reward-model stages' own `train()`, and of the policy stage's for each
online algorithm (ppo, grpo, rloo, reinforce_pp), and records what they log.

    python tests/distributed_driver.py WORKDIR MODEL_DIR REWARD_DIR                      # one process
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_driver.py ...      # two (gloo on CPU
                                                                                         # with ACCELERATE_USE_CPU=1)
For each run, rank 0 writes WORKDIR/<name>.json: the metrics rows the stage logged per step (exact floats,
caught at the stage's `log_step`) and its saved checkpoint under WORKDIR/<name>/. tests/test_distributed.py
compares a two-process run with a one-process run of the same global batch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from rlhf import policy, reward_model, sft
from rlhf.params import PolicyParams, RewardModelParams, SftParams
from tests.conftest import TINY_DEMONSTRATIONS, TINY_PAIRS

# fp32, no dropout (its masks would depend on how the batch is split), small uneven batches so that some
# micro-batch leaves a process with nothing (29 SFT and 10 RM training examples)
SFT = dict(epochs=1, batch_size=4, grad_accum_steps=2, max_seq_len=128, eval_every=100, learning_rate=3e-3,
           lora_r=0, val_fraction=0.1, warmup_ratio=0.0)
RM = dict(epochs=2, batch_size=3, grad_accum_steps=2, max_seq_len=64, eval_every=100, learning_rate=3e-3,
          lora_r=4, lora_alpha=8, lora_dropout=0.0, warmup_ratio=0.0)
POLICY = dict(iterations=2, batch_size=4, minibatch_size=2, update_epochs=2, max_new_tokens=6, max_prompt_len=64,
              checkpoint_every=100, eval_responses=2, lora_r=4, lora_alpha=8)
ALGORITHMS = {"ppo": {}, "grpo": {"group_size": 2}, "rloo": {"group_size": 2}, "reinforce_pp": {}}


def record(module, rows: list) -> None:
    """Catch the stage's metrics rows, on rank 0 only (the rows of other ranks are the same all-reduced values)."""
    module.log_step = lambda metrics, step: rows.append({"step": step, **metrics}) if state.is_main_process else None


def run_sft(work: Path, model_dir: str) -> list:
    rows: list = []
    record(sft, rows)
    data = work / "demonstrations.jsonl"
    if state.is_main_process:
        data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in TINY_DEMONSTRATIONS))
    state.wait_for_everyone()
    sft.train(SftParams(data=str(data), **SFT), model_dir, "fp32", str(work / "sft"))
    return rows


def run_reward_model(work: Path, model_dir: str) -> list:
    rows: list = []
    record(reward_model, rows)
    pairs = [reward_model.Pair(*p) for p in TINY_PAIRS]
    reward_model.train(RewardModelParams(**RM), model_dir, "fp32", pairs[:10], pairs[10:], work / "reward_model")
    return rows


def run_policy(work: Path, model_dir: str, reward_dir: str, algorithm: str) -> list:
    rows: list = []
    record(policy, rows)
    prompts = [q for q, _, _ in TINY_PAIRS]
    params = PolicyParams(**POLICY, algorithm=algorithm, **ALGORITHMS[algorithm])
    policy.train(params, "fp32", model_dir, reward_dir, prompts[:8], prompts[8:], work / algorithm,
                 work / f"{algorithm}-checkpoints")
    return rows


if __name__ == "__main__":
    work, model_dir, reward_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    state = Accelerator()  # the same process group the stages' own Accelerator() will find
    for name, run in (("sft", lambda: run_sft(work, model_dir)),
                      ("reward_model", lambda: run_reward_model(work, model_dir)),
                      *((name, lambda name=name: run_policy(work, model_dir, reward_dir, name)) for name in ALGORITHMS)):
        rows = run()
        if state.is_main_process:
            (work / f"{name}.json").write_text(json.dumps({"processes": state.num_processes, "rows": rows}))
