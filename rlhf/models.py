"""The one loader of checkpoints for the stages: every model runs `rlhf.attention`; LoRA adapters on top.

Model files themselves (the source model, precision, tokenizers, saving) are `rlhf.checkpoints`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf.attention import ATTENTION


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A checkpoint written by `save_checkpoint` (or any local Hugging Face causal LM folder)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no model checkpoint at {path} (config.json is missing). Run the stage that writes it "
            "(`dvc repro prepare` for models/base, `dvc repro sft` for models/sft)."
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION)


def load_scalar_model(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    """A checkpoint with a scalar head (`AutoModelForSequenceClassification`): the reward model, PPO's value model,
    or the SFT checkpoint given a fresh head (`num_labels=1` in kwargs)."""
    return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION, **kwargs)


def add_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float,
             task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """LoRA adapters on every linear layer (SEQ_CLS also trains the score head in full), trainable weights in fp32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type=task_type)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:  # a SEQ_CLS head comes in the model's dtype; bf16 weights would swallow small updates
            p.data = p.data.float()
    return model


def adapter_inputs_uncast(model: torch.nn.Module, device_type: str):
    """A context in which peft leaves adapter inputs in their dtype, when autocast is on.

    peft casts each adapter's input to the adapter's fp32; under autocast the adapter's linear casts it straight
    back to bf16, so the cast only copies every activation twice: the SFT LoRA step runs 1.22× as fast without
    it (benchmarks/training_efficiency.py, sft_lora_cast), a PPO iteration no faster. Outside autocast the cast
    is needed, and stays.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=torch.is_autocast_enabled(device_type))


def without_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (with its adapters still in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no autograd inside; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
