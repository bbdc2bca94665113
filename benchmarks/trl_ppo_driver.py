"""TRL 1.12.0's PPO trainer (`trl.experimental.ppo`) on the inputs benchmarks/ppo_vs_trl.py hands it.

Run by the TRL venv's python (benchmarks/.venv-trl, which ppo_vs_trl.py makes), never by the project's:

    benchmarks/.venv-trl/bin/python benchmarks/trl_ppo_driver.py SPEC.json

SPEC.json (written by ppo_vs_trl.py) holds the model folders, the prompts as token ids (already in the chat
template and cut to max_prompt_len, by rlhf.chat.prompt_ids), the PPO settings under params.yaml's policy
names (`update_epochs` is TRL's num_ppo_epochs) and where to write. This script saves the trained policy (LoRA
merged) as a plain transformers folder and writes a result JSON with the training loop's wall time, per
iteration, measured by a callback from `on_train_begin` to each `on_step_end`, and the mean response length per
iteration (noted by a wrapper around TRL's `truncate_response`).

What it adapts so that TRL sees the same problem as rlhf.policy's PPO against the RM (everything else is TRL's
own code path):
- the RM's head returns (w·h − mean)/std with the RM's stored `reward_normalization`, as rlhf.policy scores
  (rlhf.reward_sources, rlhf.rewards.normalised);
- the pad token is `<|endoftext|>`: SmolLM2's pad is its EOS `<|im_end|>`, and TRL masks every pad-id token
  out of attention, which would hide the chat template's turn ends and make every response look unended;
- with bf16, `trainer.train()` runs under CPU bf16 autocast (rlhf.policy autocasts rollouts and updates alike);
  TRL's own Accelerator ignores `PPOConfig(bf16=True)` under transformers 5 unless ACCELERATE_MIXED_PRECISION
  is set, which is set too.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,  # noqa: E402
                          TrainerCallback, set_seed)

PAD_TOKEN = "<|endoftext|>"  # SmolLM2's unk token: never produced by the chat template, so safe as pad


class NormalisedScore(torch.nn.Module):
    """The RM's scalar head in RM standard deviations: (w·h − mean) / std, as rlhf.rewards.normalised puts them."""

    def __init__(self, score: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.score, self.mean, self.std = score, mean, std

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.score(hidden).float() - self.mean) / self.std


class LoopClock(TrainerCallback):
    """Wall time from the start of TRL's training loop to the end of each iteration, and its logged metrics."""

    def __init__(self):
        self.start, self.ends, self.logs = None, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def iteration_seconds(self) -> list[float]:
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


def record_response_lengths(lengths: list[float]) -> None:
    """Make TRL's `truncate_response` (called once per rollout) also note the mean response length, EOS included."""
    from trl.experimental.ppo import ppo_trainer

    truncate = ppo_trainer.truncate_response

    def truncate_and_record(stop_token_id, pad_token_id, responses):
        truncated = truncate(stop_token_id, pad_token_id, responses)
        lengths.append(float((truncated != pad_token_id).sum(dim=1).float().mean()))
        return truncated

    ppo_trainer.truncate_response = truncate_and_record


def main(spec_path: str) -> None:
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    lengths: list[float] = []
    record_response_lengths(lengths)

    spec = json.loads(Path(spec_path).read_text())
    s = spec["settings"]
    bf16 = spec["dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if bf16:
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    tic = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(spec["sft_dir"])
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id
    if any(pad_id in ids for ids in spec["prompt_ids"]):
        raise ValueError(f"a prompt contains the pad token {PAD_TOKEN} (id {pad_id}); TRL would mask it out.")

    lora = s["lora_r"] > 0
    # as rlhf.policy.build_policy: LoRA on the SFT weights in `dtype`; full training on fp32 weights and a frozen copy in `dtype`
    policy = AutoModelForCausalLM.from_pretrained(spec["sft_dir"], dtype=dtype if lora else torch.float32)
    policy.generation_config.pad_token_id = pad_id
    reference = None if lora else AutoModelForCausalLM.from_pretrained(spec["sft_dir"], dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype=dtype)
    stats = spec["reward_normalization"]
    reward_model.score = NormalisedScore(reward_model.score, stats["mean"], stats["std"])
    # TRL's value model is a whole sequence classifier (its PolicyAndValueWrapper needs a backbone and a score
    # head); initialised from the RM as TRL's examples do, and trained in full, in fp32
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")

    train = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    out_dir = Path(spec["out_dir"])
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, bf16=bf16, seed=s["seed"], num_sample_generations=0,
        # one rollout of batch_size prompts per iteration, split into batch_size/minibatch_size minibatches
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["batch_size"] // s["minibatch_size"], local_rollout_forward_batch_size=s["batch_size"],
        total_episodes=s["iterations"] * s["batch_size"], num_ppo_epochs=s["update_epochs"],
        response_length=s["max_new_tokens"], temperature=s["temperature"], stop_token="eos",
        missing_eos_penalty=s["no_eos_penalty"],
        learning_rate=s["learning_rate"], weight_decay=s["weight_decay"], lr_scheduler_type="linear", warmup_steps=0,
        kl_coef=s["kl_coef"], kl_estimator="k1", cliprange=s["clip_eps"], cliprange_value=s["value_clip"],
        vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"], whiten_rewards=False,
    )
    set_seed(s["seed"])  # TRL's PPO seeds torch but not numpy, whose permutation orders its minibatches
    clock = LoopClock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, train_dataset=train, value_model=value_model,
                         eval_dataset=train.select(range(min(4, len(train)))), callbacks=[clock],
                         peft_config=peft_config)
    load_seconds = time.perf_counter() - tic

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        trainer.train()

    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    n_trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    n_value = sum(p.numel() for p in value_model.parameters() if p.requires_grad)
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    trained.to(dtype).save_pretrained(out_dir)

    seconds = clock.iteration_seconds()
    iteration_logs = [log for log in clock.logs if "objective/scores" in log]
    import accelerate
    import peft
    import transformers

    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},
        "load_seconds": load_seconds,
        "iteration_seconds": seconds,
        "train_seconds": sum(seconds),
        "samples": s["iterations"] * s["batch_size"],
        "trainable_policy_parameters": n_trainable,
        "trainable_value_parameters": n_value,
        "curve": [{"score": log["objective/scores"], "kl": log["objective/kl"], "length": length,
                   "eos_tokens": log.get("val/num_eos_tokens")} for log, length in zip(iteration_logs, lengths)],
    }
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
