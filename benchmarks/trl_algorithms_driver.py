"""TRL 1.12.0's GRPOTrainer, RLOOTrainer and DPOTrainer on the inputs benchmarks/algorithms.py hands them.

Run by the TRL venv's python (benchmarks/.venv-trl, which benchmarks/ppo_vs_trl.py and algorithms.py make),
never by the project's, with the repository on PYTHONPATH (the reward is the project's verifier):

    PYTHONPATH=. benchmarks/.venv-trl/bin/python benchmarks/trl_algorithms_driver.py SPEC.json

SPEC.json (written by algorithms.py) names the trainer, the SFT folder, the prompts (user messages, which TRL
renders with the tokenizer's chat template as rlhf.chat does) with each one's task record, or the preference pairs
for DPO, the settings and where to write. This script saves the trained policy (LoRA merged) as a plain
transformers folder and writes a result JSON: the training loop's wall time (a callback from `on_train_begin` to
the last `on_step_end`, so model loading and reference log-prob precomputation are outside it), the logged
completion lengths, and the process's peak RSS (VmHWM: ru_maxrss would report the parent's peak, which Linux
carries across exec).

What it adapts so that TRL sees the same problem as rlhf.policy (everything else is TRL's own code path):
- the reward is rlhf.verifiers.verifier_reward on each prompt's task record (TRL passes the dataset's `task`
  column to reward functions);
- the pad token is `<|endoftext|>`: SmolLM2's pad is its EOS `<|im_end|>`, which TRL would mask out of attention;
- with bf16, `trainer.train()` runs under CPU bf16 autocast, as rlhf.policy autocasts, and
  ACCELERATE_MIXED_PRECISION is set (TRL's Accelerator ignores `bf16=True` under transformers 5 otherwise).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

PAD_TOKEN = "<|endoftext|>"  # SmolLM2's unk token: never produced by the chat template, so safe as pad


class LoopClock(TrainerCallback):
    """Wall time from the start of TRL's training loop to the end of each optimiser step, and its logged metrics."""

    def __init__(self):
        self.start, self.ends, self.logs = None, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def seconds(self) -> float:
        return self.ends[-1] - self.start


def peak_rss_mib() -> float:
    # this process image's peak resident set size (VmHWM, kB), from /proc
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def verifier_reward_function():
    """A TRL reward function: the project's verifier on each completion, with its prompt's task record."""
    from rlhf.verifiers import verifier_reward

    def verifier(prompts, completions, task, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return verifier_reward(users, texts, [json.loads(t) for t in task])

    return verifier


def common_settings(s: dict, bf16: bool) -> dict:
    # the GPU when there is one (benchmarks/device_grpo.sh), as rlhf.policy's Accelerator picks it
    return dict(output_dir=tempfile.mkdtemp(prefix="trl-algorithms-"), report_to="none", save_strategy="no",
                logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=bf16, seed=s["seed"],
                learning_rate=s["learning_rate"],
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=s["weight_decay"],
                max_grad_norm=s["max_grad_norm"], disable_dropout=True)


def online_trainer(spec: dict, policy, tokenizer, peft_config, clock, bf16: bool):
    """GRPOTrainer or RLOOTrainer: one generation of batch_size completions (group_size per prompt) per
    iteration, update_epochs passes (μ) over it in minibatches of minibatch_size, as rlhf.policy."""
    s = spec["settings"]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in spec["prompts"]],
                              "task": [json.dumps(t) for t in spec["tasks"]]})
    steps_per_generation = s["batch_size"] // s["minibatch_size"]
    shared = dict(**common_settings(s, bf16), per_device_train_batch_size=s["minibatch_size"],
                  gradient_accumulation_steps=1, steps_per_generation=steps_per_generation,
                  num_generations=s["group_size"], num_iterations=s["update_epochs"],
                  max_steps=s["iterations"] * steps_per_generation * s["update_epochs"],
                  max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0, top_k=0,
                  beta=s["kl_coef"], epsilon=s["clip_eps"], log_completions=False)
    if spec["trainer"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**shared, loss_type="grpo", scale_rewards="group")  # GRPO's own aggregation, as ours
        trainer_class = GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(**shared, normalize_advantages=False)
        trainer_class = RLOOTrainer
    return trainer_class(model=policy, reward_funcs=[verifier_reward_function()], args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[clock], peft_config=peft_config)


def dpo_trainer(spec: dict, policy, tokenizer, peft_config, clock, bf16: bool):
    """DPOTrainer over the same verifier-judged pairs as rlhf.policy's dpo: batch_size pairs a step, in forward
    passes of minibatch_size, dpo_epochs passes, reference log-probs computed once before training (as ours)."""
    from trl import DPOConfig, DPOTrainer

    s = spec["settings"]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p["prompt"]}] for p in spec["pairs"]],
                              "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in spec["pairs"]],
                              "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in spec["pairs"]]})
    config = DPOConfig(**common_settings(s, bf16), per_device_train_batch_size=s["minibatch_size"],
                       gradient_accumulation_steps=s["batch_size"] // s["minibatch_size"],
                       num_train_epochs=s["dpo_epochs"], beta=s["dpo_beta"], loss_type=["sigmoid"],
                       max_length=s["max_prompt_len"] + s["max_new_tokens"], precompute_ref_log_probs=True)
    return DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[clock],
                      peft_config=peft_config)


def main(spec_path: str) -> None:
    import trl

    spec = json.loads(Path(spec_path).read_text())
    s = spec["settings"]
    bf16 = spec["dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if bf16:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    tic = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_dir"])
    tokenizer.pad_token = PAD_TOKEN
    lora = s["lora_r"] > 0
    # as rlhf.policy.build_policy: LoRA on the SFT weights in `dtype`; full training on fp32 weights
    policy = AutoModelForCausalLM.from_pretrained(spec["sft_dir"], dtype=dtype if lora else torch.float32)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(s["seed"])
    clock = LoopClock()
    build = dpo_trainer if spec["trainer"] == "dpo" else online_trainer
    trainer = build(spec, policy, tokenizer, peft_config, clock, bf16)
    load_seconds = time.perf_counter() - tic

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        trainer.train()

    trained = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.to(dtype).save_pretrained(spec["out_dir"])
    tokenizer.save_pretrained(spec["out_dir"])

    import accelerate
    import peft
    import transformers

    lengths = [log["completions/mean_length"] for log in clock.logs if "completions/mean_length" in log]
    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},
        "load_seconds": load_seconds,
        "train_seconds": clock.seconds(),
        "optimizer_steps": len(clock.ends),
        "completion_lengths": lengths,  # one per optimiser step (online trainers)
        "peak_rss_mib": peak_rss_mib(),
        "logs": clock.logs,
    }
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
