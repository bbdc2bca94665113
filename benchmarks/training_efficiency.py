"""Training efficiency of the SFT and reward-model stages: tokens/s and model FLOP utilisation (MFU).

MFU = 6·N·tokens / seconds / peak, with N the parameters of the model in the forward pass
(SmolLM2-135M: 134.5M, the tied embedding counted once, as it is used once as the LM head) and peak
this machine's bf16 matmul rate, measured in the same run (best of several large torch.matmul calls).
6·N counts forward (2N) and backward (4N) per token. With LoRA the frozen weights get no gradient, so
the hardware does ~4N per token: the `hfu_lora` figure reports that too, next to the 6N MFU.

Every variant trains models/base on one fixed batch of real demonstrations (rlhf/data/demonstrations.jsonl),
tokenized with the SFT stage's own template and masking and packed into full rows of --seq-len tokens,
so no step sees padding; the first --warmup optimiser steps are not timed.

  naive        fp32 weights + bf16 autocast, plain AdamW, the model's built-in loss (a textbook loop)
  sft_lora     the sft stage's step (rlhf.sft: load_causal_lm, add_lora, the prepared `ResponseNll` whose forward
               fuses the LM head and the loss chunk by chunk so the (T, V) logits are never stored nor cast to
               fp32, the accelerate autocast, clip, fused AdamW) with LoRA as in params.yaml
  sft_full     the same step with sft.lora_r = 0 (fp32 master weights + bf16 autocast)
  sft_*_logits the stage's step before the fused loss: full logits, `response_nll`, plain AdamW (the "before")
  sft_lora_sdpa the stage's step with torch's SDPA attention (before rlhf.attention)
  sft_lora_cast the stage's step with peft casting every adapter input to fp32 (before adapter_inputs_uncast)
  rm_lora      the reward_model stage's step (rlhf.reward_model: _score_head_model, preference_loss; rlhf.rewards:
  rm_full      TokenScorer, reward_at_last_token), chosen and rejected stacked; LoRA as in params.yaml, and full
               (N leaves out the embedding: the reward model has no LM head, it only looks tokens up)

From the repository root (full run ~6-8 minutes on 2 quiet cores, estimated from 1-thread smoke runs):

    nice -n 10 .venv/bin/python benchmarks/training_efficiency.py
    nice -n 10 .venv/bin/python benchmarks/training_efficiency.py --smoke           # ~1 minute, figures meaningless
    nice -n 10 .venv/bin/python benchmarks/training_efficiency.py --profile sft_lora  # top ops of one step

writes benchmarks/results/training_efficiency.json (training_efficiency_smoke.json,
training_efficiency_profile_<variant>.json) and logs
the figures to the project's MLflow store, experiment "benchmarks".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import command, machine, save  # noqa: E402
from rlhf import attention as rlhf_attention  # noqa: E402
from rlhf import sft as rlhf_sft  # noqa: E402
from rlhf.checkpoints import load_tokenizer, resolve_precision  # noqa: E402
from rlhf.models import add_lora, load_causal_lm, without_peft  # noqa: E402
from rlhf.params import SftParams, load_params  # noqa: E402
from rlhf.paths import BASE_DIR  # noqa: E402
from rlhf.reward_model import _score_head_model, preference_loss  # noqa: E402
from rlhf.rewards import TokenScorer, reward_at_last_token  # noqa: E402
from rlhf.sft import IGNORE, LOSS_CHUNK_TOKENS, ResponseNll, load_demonstrations, response_nll, tokenize_demonstration  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BASE = REPO / BASE_DIR
VARIANTS = ("naive", "sft_lora_logits", "sft_lora_sdpa", "sft_lora_cast", "sft_lora", "sft_full_logits", "sft_full",
            "rm_lora", "rm_full")
# Variant suffix: what it puts back in place of the stage's code, inside this process only, patched in the module
# whose global the stage's code reads at call time: rlhf.attention.attention reads SCORES_PER_CHUNK, and
# rlhf.sft.ResponseNll.forward reads rlhf.sft's adapter_inputs_uncast (imported there from rlhf.models, so a
# patch in rlhf.models would not reach it).
EARLIER_CODE = {
    "_sdpa": (rlhf_attention, "SCORES_PER_CHUNK", 0),  # torch's SDPA instead of rlhf.attention
    "_cast": (rlhf_sft, "adapter_inputs_uncast", lambda model, device_type: contextlib.nullcontext()),
}
PEAK_SHAPES = ((4096, 4096, 4096), (8192, 576, 1536), (8192, 1536, 576))  # square, and the model's MLP shapes


# ------------------------------------------------------------------------------------------------
# The machine's peak and the fixed batch
# ------------------------------------------------------------------------------------------------

def bf16_matmul_peak(repeats: int) -> dict:
    """Best bf16 torch.matmul rate (FLOP/s) over a few large shapes, each the best of `repeats` calls."""
    rates = {}
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - tic)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return {"flops": max(rates.values()), "per_shape_gflops": {s: round(r / 1e9, 1) for s, r in rates.items()}}


def packed_rows(tokenizer, sft: SftParams, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """`rows` full rows of `seq_len` tokens: demonstrations in file order, rendered and masked as the sft stage
    does (prompt tokens labelled IGNORE), concatenated and cut. No padding, so every token is work."""
    ids, labels = [], []
    demos = load_demonstrations(sft)
    i = 0
    while len(ids) < rows * seq_len:
        example = tokenize_demonstration(tokenizer, demos[i % len(demos)], seq_len)
        ids += example["input_ids"]
        labels += example["labels"]
        i += 1
    input_ids = torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)
    return {"input_ids": input_ids, "labels": torch.tensor(labels[:rows * seq_len]).view(rows, seq_len),
            "attention_mask": torch.ones_like(input_ids)}


# ------------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------------

def naive_step(model, optimizer, micro_batches):
    """fp32 weights, bf16 autocast, the model's own mean loss, plain AdamW."""
    for batch in micro_batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss / len(micro_batches)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def logits_sft_step(model, optimizer, accelerator, micro_batches, max_grad_norm: float):
    """The sft stage's step before this benchmark's fixes: the model's full (T, V) logits, then `response_nll`."""
    group_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    for batch in micro_batches:
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, _ = response_nll(logits, batch["labels"])
            loss = nll / group_tokens
        accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sft_step(loss_model, optimizer, accelerator, micro_batches, max_grad_norm: float):
    """The body of rlhf.sft.train's step loop on one process (world = 1: one optimiser step over its micro-batches),
    through the prepared `rlhf.sft.ResponseNll` (LM head and loss fused, chunk by chunk)."""
    group_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    for batch in micro_batches:
        with accelerator.autocast():
            loss = loss_model(batch["input_ids"], batch["attention_mask"], batch["labels"]) / group_tokens
        accelerator.backward(loss)
    accelerator.clip_grad_norm_(loss_model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rm_step(scorer, optimizer, accelerator, micro_batches, max_grad_norm: float):
    """The body of rlhf.reward_model.train's step loop on one process: chosen rows first, rejected rows second,
    one pass through the prepared TokenScorer."""
    n_pairs = sum(b["input_ids"].size(0) // 2 for b in micro_batches)
    for batch in micro_batches:
        with accelerator.autocast():
            scores = scorer(batch["input_ids"], batch["attention_mask"])
            reward_chosen, reward_rejected = reward_at_last_token(scores, batch["attention_mask"]).chunk(2)
            loss = preference_loss(reward_chosen, reward_rejected) * reward_chosen.size(0) / n_pairs
        accelerator.backward(loss)
    accelerator.clip_grad_norm_(scorer.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build(variant: str, args, params, accelerator):
    """(model, optimizer, step function) for one variant, built as its stage builds it."""
    sft, rm = params.sft, params.reward_model
    dtype = resolve_precision(params.model.precision)
    lora = "lora" in variant
    if variant == "naive":
        model = load_causal_lm(BASE, dtype=torch.float32)
        model.set_attn_implementation("sdpa")  # transformers' default
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=sft.learning_rate)
        return model.train(), optimizer, lambda mb: naive_step(model, optimizer, mb)
    if variant.startswith("rm_"):
        model = _score_head_model(str(BASE), dtype, rm if lora else dataclasses.replace(rm, lora_r=0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rm.learning_rate)
        scorer, optimizer = accelerator.prepare(TokenScorer(model), optimizer)
        return model.train(), optimizer, lambda mb: rm_step(scorer, optimizer, accelerator, mb, rm.max_grad_norm)
    logits = variant.endswith("_logits")
    model = load_causal_lm(BASE, dtype=dtype if lora else torch.float32)
    if lora:
        model = add_lora(model, sft.lora_r, sft.lora_alpha, sft.lora_dropout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=sft.learning_rate, fused=None if logits else True)
    if logits:
        model, optimizer = accelerator.prepare(model, optimizer)
        return model.train(), optimizer, lambda mb: logits_sft_step(model, optimizer, accelerator, mb, sft.max_grad_norm)
    loss_model, optimizer = accelerator.prepare(ResponseNll(model, args.loss_chunk_tokens), optimizer)
    return model.train(), optimizer, lambda mb: sft_step(loss_model, optimizer, accelerator, mb, sft.max_grad_norm)


def forward_parameters(model) -> int:
    """Parameters whose matmuls the forward pass does: every weight once (a tied embedding/LM head counts
    once, as the LM head); a model without an LM head (the reward model) only looks the embedding up."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    inner = without_peft(model)
    if getattr(inner, "lm_head", None) is None:
        n -= inner.get_input_embeddings().weight.numel()
    return n


@contextlib.contextmanager
def earlier_code(variant: str):
    """Inside: the stage's code as it was before the change the variant's suffix names (EARLIER_CODE)."""
    patches = [patch for suffix, patch in EARLIER_CODE.items() if variant.endswith(suffix)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def measure(variant: str, args, params, accelerator, micro_batches) -> dict:
    with earlier_code(variant):
        return _measure(variant, args, params, accelerator, micro_batches)


def _measure(variant: str, args, params, accelerator, micro_batches) -> dict:
    torch.manual_seed(0)
    model, optimizer, step = build(variant, args, params, accelerator)
    n_params = forward_parameters(model)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    for _ in range(args.warmup):
        step(micro_batches)
    seconds = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        step(micro_batches)
        seconds.append(time.perf_counter() - tic)
    tokens = sum(b["input_ids"].numel() for b in micro_batches)
    mean_s = sum(seconds) / len(seconds)
    base_params = n_params - n_lora
    achieved = 6 * base_params * tokens / mean_s
    row = {"variant": variant, "forward_parameters": base_params, "lora_parameters": n_lora,
           "tokens_per_step": tokens, "step_seconds": [round(s, 3) for s in seconds],
           "tokens_per_s": round(tokens / mean_s, 1), "model_tflops_per_s": round(achieved / 1e12, 4),
           "mfu": round(achieved / args.peak_flops, 4)}
    if n_lora:  # frozen weights get no weight gradient: forward 2N + input gradients 2N
        row["hfu_lora"] = round(4 * base_params * tokens / mean_s / args.peak_flops, 4)
    print(f"{variant:14s} {row['tokens_per_s']:8.0f} tok/s  MFU {row['mfu']:.1%}  steps {row['step_seconds']}", flush=True)
    del model, optimizer, step
    return row


def profile(variant: str, args, params, accelerator, micro_batches) -> dict:
    """torch.profiler over one timed step after warm-up: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model, optimizer, step = build(variant, args, params, accelerator)
    for _ in range(max(args.warmup, 1)):
        step(micro_batches)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(micro_batches)
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    top = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count} for e in averages[:args.top]]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return {"variant": variant, "self_cpu_ms_total": round(total / 1e3, 1), "top": top}


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (rm: pairs = rows / 2)")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimiser step")
    parser.add_argument("--warmup", type=int, default=1, help="optimiser steps not timed")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps timed")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--loss-chunk-tokens", type=int, default=LOSS_CHUNK_TOKENS, help="tokens per fused LM-head/loss chunk (the stage uses rlhf.sft.LOSS_CHUNK_TOKENS)")
    parser.add_argument("--smoke", action="store_true", help="seq 128, batch 2, 1 step, naive + sft_lora_logits + sft_lora")
    parser.add_argument("--profile", choices=VARIANTS, help="profile one step of this variant instead")
    parser.add_argument("--top", type=int, default=15, help="ops listed by --profile")
    args = parser.parse_args(argv)
    if args.smoke:  # small defaults; flags given on the command line win
        smoke = {"seq_len": 128, "batch_size": 2, "grad_accum": 1, "warmup": 1, "steps": 1, "peak_repeats": 2,
                 "variants": "naive,sft_lora_logits,sft_lora"}
        for key, value in smoke.items():
            if not any(a.split("=")[0] == "--" + key.replace("_", "-") for a in argv):
                setattr(args, key, value)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: {', '.join(sorted(unknown))} unknown; choose from {', '.join(VARIANTS)}")

    from accelerate import Accelerator

    params = load_params(REPO / "params.yaml")
    dtype = resolve_precision(params.model.precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(BASE)
    rows = packed_rows(tokenizer, params.sft, args.batch_size * args.grad_accum, args.seq_len)
    micro_batches = [{k: v[i * args.batch_size:(i + 1) * args.batch_size] for k, v in rows.items()}
                     for i in range(args.grad_accum)]
    config = {"model": "models/base (SmolLM2-135M)", "seq_len": args.seq_len, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "warmup_steps": args.warmup, "timed_steps": args.steps,
              "precision": str(dtype), "sft_lora_r": params.sft.lora_r, "sft_lora_dropout": params.sft.lora_dropout,
              "rm_lora_r": params.reward_model.lora_r, "loss_chunk_tokens": args.loss_chunk_tokens,
              "response_token_share": round(float((rows["labels"] != IGNORE).float().mean()), 3)}

    if args.profile:
        args.peak_flops = 1.0
        result = profile(args.profile, args, params, accelerator, micro_batches)
        out = RESULTS / f"training_efficiency_profile_{args.profile}.json"
        save(out.stem, {"command": command(), "config": config, "machine": machine(), **result}, {}, out, params=config)
        return 0

    peak = bf16_matmul_peak(args.peak_repeats)
    args.peak_flops = peak["flops"]
    print(f"bf16 matmul peak {peak['flops'] / 1e9:.0f} GFLOP/s {peak['per_shape_gflops']}", flush=True)
    figures = {v: measure(v, args, params, accelerator, micro_batches) for v in variants}
    peak_after = bf16_matmul_peak(args.peak_repeats)  # the machine must not have changed under the run
    ratios = {}
    if "naive" in figures:
        for v in variants:
            if v != "naive":
                ratios[f"{v}_over_naive"] = round(figures[v]["tokens_per_s"] / figures["naive"]["tokens_per_s"], 3)
    for stage in ("sft_lora", "sft_full"):
        for before in (f"{stage}_logits", f"{stage}_sdpa", f"{stage}_cast"):
            if stage in figures and before in figures:
                ratios[f"{stage}_over_{before}"] = round(figures[stage]["tokens_per_s"] / figures[before]["tokens_per_s"], 3)
    report = {"command": command(), "config": config, "machine": machine(),
              "bf16_peak_gflops": round(peak["flops"] / 1e9, 1), "bf16_peak_per_shape_gflops": peak["per_shape_gflops"],
              "bf16_peak_gflops_after": round(peak_after["flops"] / 1e9, 1),
              "variants": figures, "ratios": ratios,
              "target": {"sft_mfu_at_512": 0.60, "met_by": [v for v in figures if v in ("sft_lora", "sft_full") and figures[v]["mfu"] >= 0.60]}}
    out = RESULTS / ("training_efficiency_smoke.json" if args.smoke else "training_efficiency.json")
    metrics = {f"{v}/{k}": float(r[k]) for v, r in figures.items() for k in ("tokens_per_s", "mfu")}
    metrics.update({"bf16_peak_gflops": report["bf16_peak_gflops"], **{f"ratio/{k}": float(x) for k, x in ratios.items()}})
    save(out.stem, report, metrics, out, params=config)
    mfus = "  ".join(f"{v} {r['mfu']:.1%}" for v, r in figures.items())
    print(f"MFU at seq {args.seq_len} vs measured bf16 peak {report['bf16_peak_gflops']:.0f} GFLOP/s: {mfus}; "
          + "  ".join(f"{k} {x:.2f}x" for k, x in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
