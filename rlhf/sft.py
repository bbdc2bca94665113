"""Stage `sft`: supervised fine-tuning of the policy on demonstrations.

Each demonstration is rendered with the model's chat template; only the response tokens carry
loss (the prompt is context, not a target). A held-out split measures perplexity before and after.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from rlhf import tracking
from rlhf.chat import prompt_and_reply_ids
from rlhf.checkpoints import count_parameters, load_tokenizer, resolve_precision, save_checkpoint
from rlhf.models import adapter_inputs_uncast, add_lora, load_causal_lm, without_peft
from rlhf.parallel import process_share
from rlhf.params import EMBEDDED_DEMONSTRATIONS, ParamError, SftParams, load_params
from rlhf.paths import BASE_DIR, SFT_DIR as OUT_DIR
from rlhf.stage import log_step, run_stage

METRICS = "metrics/sft.json"
PLOT = "plots/sft_loss.csv"
IGNORE = -100  # label of tokens that carry no loss
LOSS_CHUNK_TOKENS = 512  # tokens whose logits exist at once in the fused LM-head loss


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str


def load_demonstrations(params: SftParams) -> list[Demonstration]:
    """Read `sft.data`: the embedded set, a local JSONL/Parquet file, or a hub dataset id."""
    records, where = _read_records(params)
    demonstrations = []
    for i, record in enumerate(records):
        for key in (params.prompt_field, params.response_field):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                found = ", ".join(sorted(record)) or "nothing"
                raise ParamError(
                    f"{where}, row {i + 1}: `{key}` is {value!r}, but every demonstration needs a non-empty text "
                    f"there (the row has: {found}). Fix the row, or map the right columns with "
                    f"sft.prompt_field / sft.response_field."
                )
        demonstrations.append(Demonstration(record[params.prompt_field], record[params.response_field]))
    if len(demonstrations) < 2:
        raise ParamError(f"{where} holds {len(demonstrations)} demonstration(s); SFT needs at least 2 (one to train, one to validate).")
    return demonstrations


def _read_records(params: SftParams) -> tuple[list[dict], str]:
    source = params.data
    if source == EMBEDDED_DEMONSTRATIONS:
        text = resources.files("rlhf.data").joinpath("demonstrations.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()], "the embedded demonstrations"
    path = Path(source)
    if path.exists():
        if path.suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records"), str(path)
        if path.suffix in (".jsonl", ".json"):
            records = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ParamError(f"{path}, line {n}: not valid JSON ({error}). Fix or remove the line.") from None
            return records, str(path)
        raise ParamError(f"sft.data is '{source}': a {path.suffix or 'suffix-less'} file. Use a .jsonl or .parquet file.")
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise ParamError(f"sft.data is '{source}', but no file is there. Fix the path, or use '{EMBEDDED_DEMONSTRATIONS}'.")
    try:
        import datasets

        return list(datasets.load_dataset(source, split=params.data_split)), f"hub dataset {source}"
    except Exception as error:  # the hub client raises many kinds; all mean the same to the user
        raise ParamError(
            f"sft.data is '{source}', taken as a Hugging Face hub dataset id, and loading split "
            f"'{params.data_split}' failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Offline, export the data set to a local .jsonl or .parquet file and point sft.data at it."
        ) from None


def split_demonstrations(demos: list[Demonstration], val_fraction: float, seed: int):
    """Deterministic shuffle, then the last `val_fraction` (at least one) is held out."""
    order = list(range(len(demos)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(demos) * val_fraction))
    return [demos[i] for i in order[n_val:]], [demos[i] for i in order[:n_val]]


def tokenize_demonstration(tokenizer, demo: Demonstration, max_seq_len: int) -> dict:
    """input_ids and labels; prompt tokens get label IGNORE so only the response is learned."""
    prompt_ids, response_ids = prompt_and_reply_ids(tokenizer, demo.prompt, demo.response)
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over response tokens, and their count.

    L = −Σ_t log p(y_t | y_<t), over t whose label is not IGNORE.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((shift_labels != IGNORE).sum())


class LinearCrossEntropy(torch.autograd.Function):
    """`response_nll` of the logits h·Wᵀ, `chunk` tokens at a time, for hidden states h (T, H) and labels (T,)
    already shifted. Each chunk's logits, fp32 log-softmax and gradient (softmax − onehot on response tokens)
    are made and used up in forward, so the (T, V) logits are never held (fp32: 400 MB per 2,048 tokens with
    a 49,152 vocabulary) and backward only scales the stored ∂L/∂h and ∂L/∂W."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):
        w = weight.to(hidden.dtype)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.size(0), chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            logp = (h @ w.T).float().log_softmax(dim=-1)
            response = y != IGNORE
            rows, targets = response.nonzero().squeeze(1), y[response]
            total -= logp[rows, targets].sum()
            if want_hidden or want_weight:
                g = logp.exp_()
                g[rows, targets] -= 1
                g[~response] = 0
                g = g.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[s:s + chunk] = g @ w
                if want_weight:
                    grad_weight += (g.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return gh, gw, None, None


class ResponseNll(torch.nn.Module):
    """A causal LM whose forward returns `response_nll`'s sum: the backbone, then `LinearCrossEntropy` on the
    LM head's weight. A module, so DDP reduces the gradients of passes through it (as reward_model.TokenScorer)."""

    def __init__(self, model, chunk: int = LOSS_CHUNK_TOKENS):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids, attention_mask, labels):
        inner = without_peft(self.model)
        backbone = getattr(inner, inner.base_model_prefix)
        with adapter_inputs_uncast(self.model, input_ids.device.type):
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.size(-1))
        with torch.autocast(h.device.type, enabled=False):
            return LinearCrossEntropy.apply(h, inner.get_output_embeddings().weight, labels[:, 1:].reshape(-1), self.chunk)


def batches(examples: list[dict], batch_size: int, rng: random.Random | None):
    """Micro-batches of similar length (less padding): shuffle, sort within pools of 8 batches, shuffle the batches."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    pool = batch_size * 8
    groups = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: len(examples[i]["input_ids"]))
        groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    for group in groups:
        yield [examples[i] for i in group]


@torch.no_grad()
def validation_loss(loss_model: ResponseNll, accelerator, examples: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean response-token NLL over the held-out split."""
    loss_model.eval()
    total, count = 0.0, 0
    for group in batches(examples, batch_size, rng=None):
        batch = {k: v.to(accelerator.device) for k, v in collate(group, pad_id).items()}
        with accelerator.autocast():
            nll = loss_model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + float(nll), count + int((batch["labels"][:, 1:] != IGNORE).sum())
    loss_model.train()
    return total / max(count, 1)


def check_sizes(params: SftParams, n_train: int, examples: list[dict]) -> None:
    if params.batch_size > n_train:
        raise ParamError(
            f"params.yaml: sft.batch_size is {params.batch_size}, larger than the {n_train} training demonstrations, "
            f"so not one full batch can be made. Set sft.batch_size to at most {n_train} (or add data) and run again."
        )
    empty = sum(1 for e in examples if all(label == IGNORE for label in e["labels"]))
    if empty:
        raise ParamError(
            f"params.yaml: sft.max_seq_len is {params.max_seq_len}, which leaves {empty} demonstration(s) with no "
            "response token after truncation (their prompts alone fill it), so they cannot teach anything. "
            "Raise sft.max_seq_len or shorten those prompts."
        )


def lr_scheduler(optimizer, params: SftParams, total_steps: int):
    warmup = int(params.warmup_ratio * total_steps)
    if params.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def train(params: SftParams, base_dir: str, precision: str, out_dir: str) -> dict:
    """Fine-tune the model in `base_dir` on the demonstrations; return the stage's metrics."""
    set_seed(params.seed)
    dtype = resolve_precision(precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(base_dir)
    train_demos, val_demos = split_demonstrations(load_demonstrations(params), params.val_fraction, params.seed)
    train_examples = [tokenize_demonstration(tokenizer, d, params.max_seq_len) for d in train_demos]
    val_examples = [tokenize_demonstration(tokenizer, d, params.max_seq_len) for d in val_demos]
    check_sizes(params, len(train_examples), train_examples + val_examples)

    # LoRA keeps the frozen base in the compute dtype; full fine-tuning keeps fp32 master weights.
    model = load_causal_lm(base_dir, dtype=dtype if params.uses_lora else torch.float32)
    if params.uses_lora:
        model = add_lora(model, params.lora_r, params.lora_alpha, params.lora_dropout)
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=params.learning_rate, weight_decay=params.weight_decay, fused=True)
    steps_per_epoch = math.ceil(len(train_examples) / (params.batch_size * params.grad_accum_steps))
    total_steps = steps_per_epoch * params.epochs
    scheduler = lr_scheduler(optimizer, params, total_steps)
    # the scheduler stays unprepared: accelerate would step it once per process, for data loaders it shards
    loss_model, optimizer = accelerator.prepare(ResponseNll(model), optimizer)
    pad_id = tokenizer.pad_token_id

    val_before = validation_loss(loss_model, accelerator, val_examples, params.batch_size, pad_id)
    curve = [{"step": 0, "train_loss": None, "val_loss": round(val_before, 5)}]
    tracking_metrics = {"loss/val": val_before}
    if accelerator.is_main_process:
        log_step(tracking_metrics, step=0)

    rng = random.Random(params.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    step, tokens_seen, train_seconds = 0, 0, 0.0
    progress = tqdm(total=total_steps, desc="sft", disable=not accelerator.is_main_process)
    loss_model.train()
    for _epoch in range(params.epochs):
        micro_batches = list(batches(train_examples, params.batch_size, rng))
        for start in range(0, len(micro_batches), params.grad_accum_steps):
            group = micro_batches[start:start + params.grad_accum_steps]
            group_tokens = sum(label != IGNORE for mb in group for e in mb for label in e["labels"][1:])
            tic = time.perf_counter()
            step_sums = torch.zeros(2, dtype=torch.float64)  # this process's share of (loss, tokens)
            for i, examples in enumerate(group):
                mine, weight = process_share(examples, rank, world)
                batch = {k: v.to(accelerator.device) for k, v in collate(mine, pad_id).items()}
                sync = contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(loss_model)
                with sync, accelerator.autocast():
                    nll = loss_model(batch["input_ids"], batch["attention_mask"], batch["labels"])
                    # mean over every response token of the optimiser step, on all processes together;
                    # × world because DDP averages the processes' gradients
                    loss = nll * (weight * world / group_tokens)
                accelerator.backward(loss)
                n_tokens = float(batch["attention_mask"].sum())
                step_sums += torch.tensor([float(nll.detach()) / group_tokens, n_tokens]) * weight
            step_loss, step_tokens = accelerator.reduce(step_sums.to(accelerator.device), "sum").tolist()
            tokens_seen += int(step_tokens)
            accelerator.clip_grad_norm_(loss_model.parameters(), params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - tic
            train_seconds += elapsed
            row = {"loss/train": step_loss, "lr": scheduler.get_last_lr()[0], "perf/tokens_per_s": step_tokens / elapsed}
            point = {"step": step, "train_loss": round(step_loss, 5), "val_loss": None}
            if step % params.eval_every == 0 or step == total_steps:
                row["loss/val"] = validation_loss(loss_model, accelerator, val_examples, params.batch_size, pad_id)
                point["val_loss"] = round(row["loss/val"], 5)
            curve.append(point)
            if accelerator.is_main_process:
                log_step(row, step=step)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / elapsed:.0f}")
            progress.update(1)
    progress.close()

    val_after = curve[-1]["val_loss"]
    metrics = {
        "sft/train_examples": len(train_examples),
        "sft/val_examples": len(val_examples),
        "sft/steps": step,
        "sft/trainable_parameters": trainable,
        "sft/total_parameters": total,
        "sft/val_loss_before": round(val_before, 5),
        "sft/val_loss_after": val_after,
        "sft/val_perplexity_before": round(math.exp(val_before), 4),
        "sft/val_perplexity_after": round(math.exp(val_after), 4),
        "perf/train_tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "perf/train_seconds": round(train_seconds, 1),
    }
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(loss_model).model, tokenizer, out_dir, dtype)
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "curve": curve}


def main() -> int:
    params = load_params()
    with tracking.stage_run("sft", {"sft": params.section("sft"), "model.precision": params.model.precision}):
        result = train(params.sft, BASE_DIR, params.model.precision, OUT_DIR)
        if not PartialState().is_main_process:
            return 0  # under `accelerate launch` one process records and writes the outputs
        tracking.log_outputs("sft", {"sft": OUT_DIR})
        tracking.write_plot(PLOT, result["curve"])
        tracking.write_metrics(METRICS, result["metrics"])
    m = result["metrics"]
    print(f"sft: val loss {m['sft/val_loss_before']:.3f} -> {m['sft/val_loss_after']:.3f}, "
          f"perplexity {m['sft/val_perplexity_before']:.2f} -> {m['sft/val_perplexity_after']:.2f}; wrote {OUT_DIR}")
    return 0


if __name__ == "__main__":
    run_stage(main)
