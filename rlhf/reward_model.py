"""Stage `reward_model`: a scalar reward R(prompt, response) learned from judged pairs.

The model is the policy's architecture with a one-output head (`AutoModelForSequenceClassification`,
`num_labels=1`), initialised from models/sft. A (prompt, response) is rendered with the chat template
exactly as the policy sees it, and the reward is the head's output at the last non-padding token.
The chosen and rejected responses of a batch are stacked into one forward pass; the loss is
−log σ(R₊ − R₋) (Bradley–Terry).

Ties: a pair labelled 'tie' says neither response is better, which −log σ(R₊ − R₋) cannot express
(it has no direction), so tied pairs are left out of the loss and of the accuracy. They are counted
(`rm/ties_excluded`), not dropped silently.

Held out (`rm/heldout_*`): the validation and test splits' pairs together, with the Wilson interval and the "longer
reply wins" baseline beside it; validation alone is also watched during training (`rm/val_*`).

After training, the mean and standard deviation of the reward over every training response are
stored in the checkpoint's config.json as `reward_normalization`, so PPO scores in RM std units.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from rlhf import tracking
from rlhf.chat import prompt_and_reply_ids
from rlhf.checkpoints import count_parameters, load_tokenizer, resolve_precision, save_checkpoint
from rlhf.comparisons import Pair, preference_pairs, read_comparisons
from rlhf.models import add_lora, load_scalar_model, without_peft
from rlhf.parallel import process_share
from rlhf.params import ParamError, RewardModelParams, load_params
from rlhf.paths import REWARD_DIR as OUT_DIR, SFT_DIR, TEST_COMPARISONS, TRAIN_COMPARISONS, VAL_COMPARISONS
from rlhf.rewards import NORMALIZATION_KEY, TokenScorer, pad_right, reward_at_last_token, rewards
from rlhf.stage import log_step, run_stage
from rlhf.stats import wilson_interval

METRICS = "metrics/reward_model.json"
PLOT = "plots/reward_model.csv"
STATS_PAIRS = 1000  # training pairs scored for the reward normalisation


# ------------------------------------------------------------------------------------------------
# The equation
# ------------------------------------------------------------------------------------------------

def preference_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    # L = −log σ(R₊ − R₋), mean over pairs
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


# ------------------------------------------------------------------------------------------------
# Data: comparisons -> pairs -> token ids
# ------------------------------------------------------------------------------------------------

def load_pairs(path: str | Path) -> tuple[list[Pair], int]:
    """(chosen, rejected) pairs of a comparisons file, and how many ties were left out."""
    return preference_pairs(read_comparisons(path), str(path))


def encode(tokenizer, prompt: str, response: str, max_seq_len: int) -> list[int]:
    """Token ids of the prompt and response in the chat template, at most `max_seq_len` long.

    A long prompt loses its beginning (the end of a conversation matters most) and a long response
    its end; when both are long, each keeps half.
    """
    prompt_ids, response_ids = prompt_and_reply_ids(tokenizer, prompt, response)
    keep_prompt = min(len(prompt_ids), max(max_seq_len - len(response_ids), max_seq_len // 2))
    keep_response = min(len(response_ids), max_seq_len - keep_prompt)
    return prompt_ids[len(prompt_ids) - keep_prompt:] + response_ids[:keep_response]


def encode_pairs(tokenizer, pairs: list[Pair], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    return [(encode(tokenizer, p.prompt, p.chosen, max_seq_len), encode(tokenizer, p.prompt, p.rejected, max_seq_len))
            for p in pairs]


def stack_pairs(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward pass scores both. (2B, T)"""
    return pad_right([c for c, _ in encoded] + [r for _, r in encoded], pad_id)


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Index batches of similar length (less padding). Shuffled when `rng` is given, else sorted.

    Shuffled: random chunks of 16 batches are sorted by length inside, then the batches are shuffled.
    """
    order = list(range(len(lengths)))
    if rng is None:
        order.sort(key=lambda i: lengths[i])
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(order)
    chunk = 16 * batch_size
    order = [i for s in range(0, len(order), chunk) for i in sorted(order[s:s + chunk], key=lambda i: lengths[i])]
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def _score_head_model(sft_dir: str, dtype: torch.dtype, params: RewardModelParams):
    """The SFT checkpoint with a fresh scalar head; LoRA keeps the base frozen in `dtype`."""
    model = load_scalar_model(sft_dir, dtype if params.uses_lora else torch.float32, num_labels=1)
    if model.config.pad_token_id is None:
        raise ParamError(f"{sft_dir}/config.json has no pad_token_id; the reward model needs one to batch responses.")
    if not params.uses_lora:
        return model
    return add_lora(model, params.lora_r, params.lora_alpha, params.lora_dropout, task_type="SEQ_CLS")


@torch.no_grad()
def score_pairs(model, accelerator, encoded, batch_size: int, pad_id: int, progress: bool = False) -> torch.Tensor:
    """(R₊, R₋) for every pair, (N, 2), in the pairs' order."""
    model.eval()
    out = torch.empty(len(encoded), 2)
    groups = length_grouped_batches([max(len(c), len(r)) for c, r in encoded], batch_size, rng=None)
    for group in tqdm(groups, desc="rm eval", disable=not progress, leave=False):
        input_ids, attention_mask = stack_pairs([encoded[i] for i in group], pad_id)
        with accelerator.autocast():
            r = rewards(model, input_ids.to(accelerator.device), attention_mask.to(accelerator.device))
        out[group] = torch.stack(r.float().cpu().chunk(2), dim=1)
    model.train()
    return out


def pair_summary(scored: torch.Tensor) -> dict:
    """Loss, pairwise accuracy and the distribution of R₊ − R₋ for scored pairs (N, 2)."""
    margin = scored[:, 0] - scored[:, 1]
    q = torch.quantile(margin, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"loss": float(preference_loss(scored[:, 0], scored[:, 1])), "accuracy": float((margin > 0).float().mean()),
            "margin_mean": float(margin.mean()), "margin_std": float(margin.std()) if len(margin) > 1 else 0.0,
            "margin_p10": q[0], "margin_p50": q[1], "margin_p90": q[2]}


def longer_reply_wins(pair: Pair) -> float:
    # the "longer reply wins" baseline: 1 when the chosen reply is longer (in characters), ½ when equally long
    return 1.0 if len(pair.chosen) > len(pair.rejected) else 0.5 if len(pair.chosen) == len(pair.rejected) else 0.0


def heldout_quality(accuracy: float, pairs: list[Pair], confidence: float) -> dict:
    """Held-out pairwise accuracy with its Wilson interval, and the length baseline on the same pairs: an RM no
    better than "longer reply wins" has learned length, and one whose lower bound is not above 0.5 nothing the
    policy stage should optimise (it refuses to train on it unless told to)."""
    n = len(pairs)
    lower, upper = wilson_interval(accuracy * n, n, confidence)
    return {"rm/heldout_pairs": n, "rm/heldout_accuracy": round(accuracy, 4), "rm/heldout_accuracy_lower": round(lower, 4),
            "rm/heldout_accuracy_upper": round(upper, 4),
            "rm/length_baseline_accuracy": round(sum(longer_reply_wins(p) for p in pairs) / n, 4)}


def check_sizes(params: RewardModelParams, n_train: int, n_val: int, where: str) -> None:
    if n_train == 0 or n_val == 0:
        raise ParamError(
            f"{where} leaves {n_train} train and {n_val} validation pair(s) with a preference once ties are set aside; "
            "the reward model needs both. Collect more comparisons (`collect` params) and run again."
        )
    if params.batch_size > n_train:
        raise ParamError(
            f"params.yaml: reward_model.batch_size is {params.batch_size}, larger than the {n_train} training pairs, "
            f"so not one full batch can be made. Set reward_model.batch_size to at most {n_train} (or add data) and run again."
        )


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train(params: RewardModelParams, sft_dir: str, precision: str, train_pairs: list[Pair], val_pairs: list[Pair],
          out_dir: str | Path, ties_excluded: int = 0, test_pairs: Sequence[Pair] = ()) -> dict:
    """Train the reward model; save it with its reward normalisation; return metrics and curve.

    The held-out figures (`rm/heldout_*`) are on the validation and test pairs together: neither is trained on, and
    validation is only watched, never used to pick weights. The result also holds `val_scores` (N, 2): R₊ and R₋ of
    every validation pair, in order.
    """
    check_sizes(params, len(train_pairs), len(val_pairs), "the comparisons")
    set_seed(params.seed)
    dtype = resolve_precision(precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(sft_dir)
    pad_id = tokenizer.pad_token_id
    train_enc = encode_pairs(tokenizer, train_pairs, params.max_seq_len)
    val_enc = encode_pairs(tokenizer, val_pairs, params.max_seq_len)
    test_enc = encode_pairs(tokenizer, list(test_pairs), params.max_seq_len)

    model = _score_head_model(sft_dir, dtype, params)
    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=params.learning_rate, weight_decay=params.weight_decay, fused=True)
    steps_per_epoch = math.ceil(len(train_enc) / (params.batch_size * params.grad_accum_steps))
    total_steps = steps_per_epoch * params.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(params.warmup_ratio * total_steps), total_steps)
    # the scheduler stays unprepared: accelerate would step it once per process, for data loaders it shards
    scorer, optimizer = accelerator.prepare(TokenScorer(model), optimizer)
    model = accelerator.unwrap_model(scorer).model  # for scoring without gradients, and saving
    is_main = accelerator.is_main_process

    before = pair_summary(score_pairs(model, accelerator, val_enc, params.batch_size, pad_id, progress=is_main))
    curve = [{"step": 0, "train_loss": None, "train_accuracy": None,
              "val_loss": round(before["loss"], 5), "val_accuracy": round(before["accuracy"], 4)}]
    log_step({"loss/val": before["loss"], "rm/val_accuracy": before["accuracy"]}, step=0)

    rng = random.Random(params.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [max(len(c), len(r)) for c, r in train_enc]
    step, tokens_seen, train_seconds = 0, 0, 0.0
    progress = tqdm(total=total_steps, desc="reward_model", disable=not is_main)
    model.train()
    for _epoch in range(params.epochs):
        micro = length_grouped_batches(lengths, params.batch_size, rng)
        for start in range(0, len(micro), params.grad_accum_steps):
            group = micro[start:start + params.grad_accum_steps]
            n_pairs = sum(len(g) for g in group)
            tic = time.perf_counter()
            step_sums = torch.zeros(3, dtype=torch.float64)  # this process's share of (loss, correct pairs, tokens)
            for i, indices in enumerate(group):
                mine, weight = process_share(indices, rank, world)
                input_ids, attention_mask = stack_pairs([train_enc[j] for j in mine], pad_id)
                input_ids, attention_mask = input_ids.to(accelerator.device), attention_mask.to(accelerator.device)
                sync = contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(scorer)
                with sync, accelerator.autocast():
                    reward_chosen, reward_rejected = reward_at_last_token(scorer(input_ids, attention_mask),
                                                                          attention_mask).chunk(2)
                    # a mean over this process's pairs, weighted so the step's loss, summed over processes, is the
                    # mean over all its pairs; × world because DDP averages the processes' gradients
                    share = preference_loss(reward_chosen, reward_rejected) * (weight * len(mine) / n_pairs)
                accelerator.backward(share * world)
                step_sums += torch.tensor([float(share.detach()), weight * int((reward_chosen > reward_rejected).sum()),
                                           weight * int(attention_mask.sum())], dtype=torch.float64)
            step_loss, correct, step_tokens = accelerator.reduce(step_sums.to(accelerator.device), "sum").tolist()
            step_correct, step_tokens = round(correct), round(step_tokens)
            grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - tic
            train_seconds += elapsed
            tokens_seen += step_tokens
            row = {"loss/train": step_loss, "rm/train_accuracy": step_correct / n_pairs, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "perf/tokens_per_s": step_tokens / elapsed}
            point = {"step": step, "train_loss": round(step_loss, 5), "train_accuracy": round(step_correct / n_pairs, 4),
                     "val_loss": None, "val_accuracy": None}
            if step % params.eval_every == 0 and step != total_steps:
                val = pair_summary(score_pairs(model, accelerator, val_enc, params.batch_size, pad_id))
                row.update({"loss/val": val["loss"], "rm/val_accuracy": val["accuracy"]})
                point.update(val_loss=round(val["loss"], 5), val_accuracy=round(val["accuracy"], 4))
            curve.append(point)
            log_step(row, step=step)
            progress.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_correct / n_pairs:.2f}",
                                 tok_s=f"{step_tokens / elapsed:.0f}")
            progress.update(1)
    progress.close()

    val_scores = score_pairs(model, accelerator, val_enc, params.batch_size, pad_id, progress=is_main)
    val = pair_summary(val_scores)
    heldout = pair_summary(torch.cat([val_scores, score_pairs(model, accelerator, test_enc, params.batch_size, pad_id)])
                           if test_enc else val_scores)
    curve[-1].update(val_loss=round(val["loss"], 5), val_accuracy=round(val["accuracy"], 4))
    log_step({"loss/val": val["loss"], "rm/val_accuracy": val["accuracy"]}, step=step)
    # normalisation statistics over the training responses, chosen and rejected alike; a seeded sample
    # of STATS_PAIRS pairs pins mean and std to ~1% while a large import is not scored a second time
    stats_enc = (train_enc if len(train_enc) <= STATS_PAIRS
                 else random.Random(params.seed).sample(train_enc, STATS_PAIRS))
    train_scores = score_pairs(model, accelerator, stats_enc, params.batch_size, pad_id, progress=is_main)
    train_summary = pair_summary(train_scores)
    reward_mean, reward_std = float(train_scores.mean()), float(train_scores.std())

    metrics = {
        "rm/train_pairs": len(train_pairs),
        "rm/val_pairs": len(val_pairs),
        "rm/ties_excluded": ties_excluded,
        "rm/steps": step,
        "rm/trainable_parameters": trainable,
        "rm/total_parameters": total,
        "rm/val_loss_before": round(before["loss"], 5),
        "rm/val_accuracy_before": round(before["accuracy"], 4),
        "rm/val_loss": round(val["loss"], 5),
        "rm/val_accuracy": round(val["accuracy"], 4),
        "rm/train_loss": round(train_summary["loss"], 5),
        "rm/train_accuracy": round(train_summary["accuracy"], 4),
        "rm/reward_mean": round(reward_mean, 5),
        "rm/reward_std": round(reward_std, 5),
        **{f"rm/val_{k}": round(v, 5) for k, v in val.items() if k.startswith("margin")},
        **heldout_quality(heldout["accuracy"], list(val_pairs) + list(test_pairs), params.quality_confidence),
        "perf/train_tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "perf/train_seconds": round(train_seconds, 1),
    }
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        setattr(without_peft(unwrapped).config, NORMALIZATION_KEY,
                {"mean": reward_mean, "std": reward_std, "responses": 2 * len(stats_enc)})
        save_checkpoint(unwrapped, tokenizer, out_dir, dtype)
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "curve": curve, "val_scores": val_scores}


def main() -> int:
    params = load_params()
    train_pairs, train_ties = load_pairs(TRAIN_COMPARISONS)
    val_pairs, val_ties = load_pairs(VAL_COMPARISONS)
    test_pairs, test_ties = load_pairs(TEST_COMPARISONS)
    with tracking.stage_run("reward_model", {"reward_model": params.section("reward_model"),
                                             "model.precision": params.model.precision}):
        result = train(params.reward_model, SFT_DIR, params.model.precision, train_pairs, val_pairs, OUT_DIR,
                       ties_excluded=train_ties + val_ties + test_ties, test_pairs=test_pairs)
        if not PartialState().is_main_process:
            return 0  # under `accelerate launch` one process records and writes the outputs
        tracking.log_outputs("reward_model", {"reward_model": OUT_DIR})
        tracking.write_plot(PLOT, result["curve"])
        tracking.write_metrics(METRICS, result["metrics"])
        import mlflow

        if mlflow.active_run() is not None:  # the whole distribution of R₊ − R₋, beside its quantiles
            margins = result["val_scores"][:, 0] - result["val_scores"][:, 1]
            mlflow.log_dict({"val_margin": [round(float(x), 5) for x in margins]}, "rm_val_margins.json")
    m = result["metrics"]
    print(f"reward_model: val accuracy {m['rm/val_accuracy_before']:.3f} -> {m['rm/val_accuracy']:.3f}, "
          f"val loss {m['rm/val_loss_before']:.3f} -> {m['rm/val_loss']:.3f} on {m['rm/val_pairs']} pairs "
          f"({m['rm/ties_excluded']} ties left out); wrote {OUT_DIR}")
    return 0


if __name__ == "__main__":
    run_stage(main)
