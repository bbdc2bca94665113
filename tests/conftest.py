"""Fixtures: tiny randomly initialised chat models and throwaway project folders. No downloads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a reward model scores a response to a prompt",
    "explain why the sky is blue in one sentence",
    "light scatters more at short wavelengths so the sky looks blue",
    "write a short poem about rain on a window",
    "rain taps the glass and the room grows quiet",
    "what is two plus two? two plus two is four",
] * 20

TINY_DEMONSTRATIONS = [
    ("explain why the sky is blue", "light scatters more at short wavelengths so the sky looks blue"),
    ("write a short poem about rain", "rain taps the glass and the room grows quiet"),
    ("what is two plus two?", "two plus two is four"),
    ("what does a reward model do?", "a reward model scores a response to a prompt"),
] * 8

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the temporary server logs at exit, after pytest closed its streams
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a loaded machine starts it slowly


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny chat model (Llama architecture, ChatML template) in a local folder."""
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_PARAMS = {
    "model": {"policy": None, "precision": "fp32"},
    "sft": {"epochs": 1, "batch_size": 4, "grad_accum_steps": 1, "max_seq_len": 128, "eval_every": 2,
            "learning_rate": 0.003, "lora_r": 0, "val_fraction": 0.1},
    "reward_model": {"batch_size": 2, "max_seq_len": 64, "eval_every": 2, "learning_rate": 0.003, "lora_r": 0},
    "policy": {"iterations": 2, "batch_size": 2, "minibatch_size": 1, "update_epochs": 1, "max_new_tokens": 6,
               "max_prompt_len": 64, "checkpoint_every": 1, "eval_responses": 2, "lora_r": 4, "lora_alpha": 8,
               "task_prompts": 4, "gold_tasks": 2, "allow_weak_reward_model": True},  # a random tiny RM is at chance
    "collect": {"sources": ["policy", "import"], "num_prompts": 4, "max_new_tokens": 6, "batch_size": 4,
                "judge_max_chars": 200, "import_format": "pairs", "verifiable_prompts": 4, "policy": "champion"},
    "validate": {"max_tokens": 256, "val_fraction": 0.25, "test_fraction": 0.25},
    "evaluate": {"heldout_prompts": 2, "max_new_tokens": 6, "max_prompt_len": 64, "batch_size": 2,
                 "toxicity_prompt_count": 3, "toxicity_k": 2, "toxicity_max_new_tokens": 4,
                 "verifier_max_new_tokens": 4, "judge_max_chars": 200},
    "tasks": {"heldout_size": 4},
    # a random tiny policy answers no task right: every verifier verdict is a tie (win-rate 0.5), so the gate
    # here promotes any challenger that does not lose; the real default demands a lower bound above 0.5
    "promote": {"model_name": "tiny-policy", "reward_model_name": "tiny-reward", "max_kl": 1000.0,
                "max_toxicity_probability": 1.0, "min_win_rate_lower_bound": 0.0},
    "serve": {"database": "sqlite:///data/feedback/feedback.db", "scrub_max_chars": 65536},  # the refeed stage's DVC params
}

# Imported (prompt, chosen, rejected) pairs for the tiny pipeline: with validate's seed 0 and fractions
# 0.25 / 0.25 their prompts hash into 6 train, 3 validation and 3 test prompts, so every later stage has data.
TINY_PAIRS = [
    ("explain why the sky is blue", "light scatters more at short wavelengths", "the sky is a lazy dog"),
    ("write a short poem about rain", "rain taps the glass and the room grows quiet", "two plus two is four"),
    ("what is two plus two?", "two plus two is four", "rain taps the glass"),
    ("what does a reward model do?", "a reward model scores a response to a prompt", "the quick brown fox"),
    ("what is three plus three?", "three plus three is six", "the sky looks blue"),
    ("why is rain wet?", "rain is water", "a poem about rain"),
    ("name a colour", "blue", "the quick brown fox jumps"),
    ("describe the quick brown fox", "the quick brown fox jumps over the lazy dog", "two plus two"),
    ("what is a lazy dog?", "a dog that does not jump", "light scatters"),
    ("write a poem about the sky", "the sky grows quiet and blue", "a reward model scores"),
    ("why do foxes jump?", "the quick brown fox jumps over the lazy dog", "rain taps the window"),
    ("what scores a response?", "a reward model scores a response to a prompt", "the room grows quiet"),
]


def write_params(folder: Path, overrides: dict) -> None:
    params = json.loads(json.dumps(TINY_PARAMS))
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_tiny_comparisons(project: Path) -> None:
    """Judged pairs in data/comparisons/{train,validation,test}.parquet, prompts disjoint across splits."""
    import pandas as pd

    from rlhf.comparisons import write_comparisons

    answers = [a for _, a in TINY_DEMONSTRATIONS[:4]]
    splits = {"train": TINY_DEMONSTRATIONS[:4], "validation": [("what is three plus three?", "six")],
              "test": [("why is rain wet?", "rain is water"), ("name a colour", "blue")]}
    for split, demos in splits.items():
        rows = [{"pair_id": f"{split}-{i}", "prompt": q, "response_a": a, "response_b": answers[(i + 1) % 4],
                 "chosen": "a" if i % 2 == 0 else "tie", "source": "judge:tiny", "policy_version": None,
                 "votes": None, "agreement": None, "created_at": pd.Timestamp("2026-01-01", tz="UTC")}
                for i, (q, a) in enumerate(demos)]
        rows += [{**row, "pair_id": row["pair_id"] + "-swapped", "response_a": row["response_b"],
                  "response_b": row["response_a"], "chosen": {"a": "b", "tie": "tie"}[row["chosen"]]} for row in rows]
        write_comparisons(pd.DataFrame(rows), project / "data" / "comparisons" / f"{split}.parquet")


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, a tiny params.yaml) as a git + DVC repo, as cwd."""
    project = make_tiny_project(tmp_path / "project", tiny_model_dir)
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def make_tiny_project(project: Path, tiny_model_dir: Path) -> Path:
    project.mkdir()
    for name in ("rlhf", "flows", "tasks"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    demos = project / "tiny_demonstrations.jsonl"
    demos.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in TINY_DEMONSTRATIONS))
    pairs = project / "tiny_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n" for q, c, r in TINY_PAIRS))
    write_params(project, {"model": {"policy": str(tiny_model_dir)}, "sft": {"data": demos.name},
                           "collect": {"judge_model": str(tiny_model_dir), "import_data": pairs.name},
                           "evaluate": {"judge_model": str(tiny_model_dir)}})
    if "validate" not in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]:
        write_tiny_comparisons(project)  # until a stage of the pipeline writes them (issue 4)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(cmd, cwd=project, check=True, env=env, capture_output=True)
    return project
