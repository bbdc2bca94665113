"""Stage `policy`: optimise the SFT policy on a KL leash to the SFT model, with the algorithm `policy.algorithm`
names; its output is models/policy (rlhf.paths.POLICY_DIR) whatever the algorithm.

Online algorithms (ppo, grpo, rloo, reinforce_pp), each iteration:
  1. deal batch_size / group_size prompts and sample group_size responses to each (rlhf.rollouts);
  2. score them with `policy.reward` (rlhf.reward_sources: the RM, the verifier, reward functions, a weighted sum),
     minus `no_eos_penalty` for a response that never emitted EOS;
  3. turn the scores into per-token advantages: PPO's GAE over a value model (rlhf.ppo), or a critic-free
     estimate (rlhf.objectives: GRPO's group-relative, RLOO's leave-one-out, REINFORCE++'s batch-normalised);
  4. `update_epochs` passes of minibatch steps on the clipped-ratio loss (+ PPO's value loss, GRPO's KL term),
     − c_H·entropy, gradient-norm clipping;
  5. the adaptive controller moves β so that the KL per response approaches `kl_target`.
DPO trains on the comparisons' train split with the DPO or IPO loss (rlhf.dpo): no reward model, no sampling.

The training prompts mix the open-ended pool (`policy.prompts`) with `policy.task_prompts` verifiable tasks
(rlhf.verifiers.train_tasks), less every test-split prompt. Every `eval_every` iterations (and at the start and
the end) an over-optimisation point measures, on prompts no policy trains on: the proxy RM score and the KL to the
SFT policy of responses sampled for the test split's prompts, and the gold accuracy (greedy answers to held-out
verifiable tasks, checked by the verifier), as in Gao et al. 2022. The points are MLflow metrics (`heldout/*`)
and rows of the curves CSV (rlhf.paths.POLICY_CURVES); the first and last are the before/after figures.

When the reward includes the RM, the stage first checks the RM: if the lower bound of its held-out pairwise
accuracy's interval is not above 0.5 (chance), it stops before training (exit 2) unless
`policy.allow_weak_reward_model` forces it, and the metrics say which.

Checkpoints (checkpoints/policy, not a DVC output) hold the trainable weights, optimizer, scheduler, β, every RNG
state and the figures so far; a restarted stage resumes from the last one whose params and inputs match, and ends
with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from rlhf import tracking
from rlhf.chat import prompt_and_reply_ids, reply_suffix
from rlhf.checkpoints import count_parameters, load_tokenizer, resolve_precision, save_checkpoint
from rlhf.comparisons import Pair, preference_pairs, read_comparisons
from rlhf.dpo import dpo_loss, encode_pair, ipo_loss, logratio_margin, pair_batch, sequence_logprob
from rlhf.models import add_lora, load_causal_lm
from rlhf.objectives import grpo_loss, group_advantages, leave_one_out_advantages, per_token, reinforce_pp_advantages
from rlhf.params import ParamError, PolicyParams, TasksParams, load_params
from rlhf.paths import (POLICY_CURVES as PLOT, POLICY_DIR, REWARD_DIR, SFT_DIR, TEST_COMPARISONS, TRAIN_COMPARISONS,
                        VAL_COMPARISONS)
from rlhf.ppo import (adaptive_kl_coef, approx_kl, build_value_model, clip_fraction, clipped_policy_loss,
                      explained_variance, gae, masked_mean, token_rewards, value_forward, value_loss, whiten)
from rlhf.prompts import PromptSampler, held_out_prompts, load_train_prompts
from rlhf.resume import checkpoint_path, fingerprint, load_latest_state, restore_rng, rng_states, save_state
from rlhf.reward_sources import RM, RewardSources, part_means, scores_prompt, weighted_reward
from rlhf.rewards import load_reward_model, pad_right, rewards as reward_at_last
from rlhf.rollouts import (Rollouts, build_sampler, encode_queries, eos_ids, greedy_replies, heldout_rollouts,
                           kl_per_response, lora_merged, policy_forward, refreshed, sample_responses)
from rlhf.stage import log_step, run_stage
from rlhf.stats import wilson_interval
from rlhf.verifiers import (GoldAccuracy, Task, accuracy_difference, gold_accuracy, heldout_tasks, task_prompt,
                            train_tasks)

CHECKPOINT_DIR = "checkpoints/policy"
METRICS = "metrics/policy.json"
RM_METRICS = "metrics/reward_model.json"  # the reward_model stage's metrics: its held-out accuracy and interval
N_SAMPLES_SHOWN = 4  # before/after samples printed and logged to MLflow
CHANCE = 0.5  # pairwise accuracy of a reward model that knows nothing


# ------------------------------------------------------------------------------------------------
# The reward model's quality gate
# ------------------------------------------------------------------------------------------------

def reward_model_gate(accuracy_lower: float, allow_weak: bool) -> tuple[bool, str]:
    """(train?, why): the RM may be trained against when the lower bound of its held-out pairwise accuracy's
    interval is above chance; `allow_weak` forces it otherwise."""
    if accuracy_lower > CHANCE:
        return True, "above_chance"
    return (True, "forced") if allow_weak else (False, "not_above_chance")


@torch.no_grad()
def measured_rm_accuracy(reward_dir: str | Path, precision: str, comparisons: str | Path) -> dict:
    """The RM's pairwise accuracy on a comparisons file (ties left out), with its 95% Wilson interval."""
    pairs, ties = preference_pairs(read_comparisons(comparisons), str(comparisons))
    if not pairs:
        return {"accuracy": math.nan, "lower": 0.0, "upper": 1.0, "pairs": 0, "ties": ties}
    model, _ = load_reward_model(reward_dir, resolve_precision(precision))
    model.eval()
    tokenizer = load_tokenizer(reward_dir)
    correct = 0
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        rows = []
        for pair in chunk:  # prompt + reply in the chat template, chosen then rejected, as the RM was trained to read
            for reply in (pair.chosen, pair.rejected):
                prompt_ids, reply_ids = prompt_and_reply_ids(tokenizer, pair.prompt, reply)
                rows.append(prompt_ids + reply_ids)
        input_ids, attention_mask = pad_right(rows, tokenizer.pad_token_id)
        scores = reward_at_last(model, input_ids, attention_mask).view(-1, 2)
        correct += int((scores[:, 0] > scores[:, 1]).sum())
    lower, upper = wilson_interval(correct, len(pairs))
    return {"accuracy": correct / len(pairs), "lower": lower, "upper": upper, "pairs": len(pairs), "ties": ties}


def reward_model_quality(reward_dir: str | Path, precision: str) -> dict:
    """The RM's held-out pairwise accuracy and its interval: the reward_model stage's `rm/heldout_accuracy*` in
    metrics/reward_model.json, or, where that file does not hold them, measured here on the validation split."""
    reported = json.loads(Path(RM_METRICS).read_text()) if Path(RM_METRICS).exists() else {}
    if "rm/heldout_accuracy_lower" in reported:
        return {"accuracy": reported.get("rm/heldout_accuracy", math.nan), "lower": reported["rm/heldout_accuracy_lower"],
                "upper": reported.get("rm/heldout_accuracy_upper", math.nan),
                "pairs": reported.get("rm/heldout_pairs", math.nan), "source": RM_METRICS}
    return {**measured_rm_accuracy(reward_dir, precision, VAL_COMPARISONS), "source": VAL_COMPARISONS}


def weak_reward_model_message(quality: dict) -> str:
    return (
        f"the reward model's held-out pairwise accuracy is {quality['accuracy']:.3f} on {quality['pairs']} pairs "
        f"({quality['source']}); the lower bound of its 95% interval, {quality['lower']:.3f}, is not above {CHANCE} "
        "(chance), so the policy would be trained to chase what the RM gets wrong as much as what it gets right. "
        "Improve the reward model (more or cleaner comparisons, then `dvc repro reward_model`), train without it "
        "(`policy.reward: verifier`, a reward function, or `policy.algorithm: dpo`), or set "
        "`policy.allow_weak_reward_model: true` in params.yaml to train anyway; metrics/policy.json then records "
        "policy/rm_gate_forced = 1."
    )


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def build_policy(sft_dir: str, dtype: torch.dtype, params: PolicyParams):
    """(policy, frozen reference or None). With LoRA the reference is the policy with its adapter disabled."""
    if not params.uses_lora:
        policy = load_causal_lm(sft_dir, dtype=torch.float32)  # fp32 master weights
        reference = load_causal_lm(sft_dir, dtype=dtype).eval().requires_grad_(False)
        return policy, reference
    # no LoRA dropout: the ratio π/π_old must be exactly 1 before the first update
    return add_lora(load_causal_lm(sft_dir, dtype=dtype), params.lora_r, params.lora_alpha, 0.0), None


def reference_logprobs(accelerator, policy, reference, query, query_mask, responses, response_mask,
                       temperature: float) -> torch.Tensor:
    """log π_ref of the response tokens: the frozen copy, or the LoRA policy with its adapter disabled."""
    if reference is None:
        with accelerator.unwrap_model(policy).disable_adapter():
            return policy_forward(policy, query, query_mask, responses, response_mask, temperature)[0]
    return policy_forward(reference, query, query_mask, responses, response_mask, temperature)[0]


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@dataclass
class Models:
    """What every iteration uses: the trained policy (and PPO's value model), the frozen reference, the reward."""
    accelerator: Accelerator
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    value_model: torch.nn.Module | None  # PPO only; the critic-free algorithms and DPO have none
    rewards: RewardSources | None  # None for DPO
    tokenizer: object
    suffix: list[int]  # template tokens after an assistant reply's EOS
    stop_ids: list[int]  # tokens that end a response
    sampler: torch.nn.Module | None = None  # full fine-tuning in bf16: the rollouts' bf16 copy of the policy

    def values(self, hidden, query, query_mask, responses, response_mask) -> torch.Tensor:
        if isinstance(self.accelerator.unwrap_model(self.value_model), torch.nn.Linear):  # a head on the policy's hidden state
            return self.value_model(hidden.float()).squeeze(-1)
        return value_forward(self.value_model, query, query_mask, responses, response_mask)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def check_sizes(params: PolicyParams, n_train: int, n_eval: int) -> None:
    if params.batch_size % params.minibatch_size:
        raise ParamError(
            f"params.yaml: policy.minibatch_size is {params.minibatch_size}, which does not divide policy.batch_size "
            f"({params.batch_size}), so the last minibatch of every epoch would be short. Pick a divisor of "
            f"{params.batch_size} (for example {params.batch_size // 2 or 1})."
        )
    if params.algorithm in ("grpo", "rloo") and params.group_size < 2:
        raise ParamError(
            f"params.yaml: policy.algorithm is '{params.algorithm}' with policy.group_size {params.group_size}, but "
            f"{params.algorithm} measures each response against the other responses to its prompt, so it needs at least "
            "2 of them. Set policy.group_size to 4 (4 to 8 is usual) and policy.batch_size to a multiple of it."
        )
    if params.batch_size % params.group_size:
        raise ParamError(
            f"params.yaml: policy.group_size is {params.group_size}, which does not divide policy.batch_size "
            f"({params.batch_size}): a batch holds whole groups of responses to a prompt. Make policy.batch_size a "
            f"multiple of {params.group_size} (for example {params.group_size * max(1, params.batch_size // params.group_size)})."
        )
    prompts_per_batch = params.batch_size // params.group_size
    if prompts_per_batch > n_train:
        raise ParamError(
            f"params.yaml: policy.batch_size {params.batch_size} with group_size {params.group_size} takes "
            f"{prompts_per_batch} prompts an iteration, more than the {n_train} distinct training prompts. Lower "
            "policy.batch_size (or add prompts) and run again."
        )
    if n_eval == 0:
        raise ParamError(
            f"{TEST_COMPARISONS} holds no prompt that is not also a training prompt, so the policy has nothing held out "
            "to measure on. Check the validate stage's test split."
        )


def check_dpo_sizes(params: PolicyParams, n_pairs: int, ties: int) -> None:
    if params.batch_size % params.minibatch_size:
        raise ParamError(
            f"params.yaml: policy.minibatch_size is {params.minibatch_size}, which does not divide policy.batch_size "
            f"({params.batch_size}); with dpo a step sums the gradients of batch_size pairs, minibatch_size at a time. "
            f"Pick a divisor of {params.batch_size}."
        )
    if n_pairs == 0:
        raise ParamError(
            f"{TRAIN_COMPARISONS} holds no pair with a preferred response ({ties} ties, which DPO leaves out), so DPO has "
            "nothing to learn from. Collect comparisons (`dvc repro collect validate`) or use an online algorithm."
        )


# ------------------------------------------------------------------------------------------------
# Held-out measurement: the over-optimisation points and the before/after figures
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def rng_untouched():
    """Whatever runs inside draws its own random numbers; training's streams continue after it as if it never ran."""
    states = rng_states()
    try:
        yield
    finally:
        restore_rng(states)


@dataclass
class Point:
    """One over-optimisation point: held-out figures of the SFT policy (iteration 0) or the trained one."""
    iteration: int
    rollouts: Rollouts  # one sampled response per held-out prompt, scored, with its KL to the SFT policy
    gold: GoldAccuracy | None  # greedy answers to the gold tasks, None without them
    scored_by_rm: bool
    pairs: dict | None = None  # dpo: the held-out pairs' loss, accuracy and margin

    def row(self) -> dict:
        r = self.rollouts
        out = {"heldout/kl": r.mean("kl"), "heldout/response_length": r.mean("lengths"),
               "heldout/no_eos_fraction": 1 - r.mean("ended")}
        if self.scored_by_rm:
            out["heldout/rm_score"] = r.mean("scores")
        if self.gold is not None:
            out["heldout/gold_accuracy"] = self.gold.accuracy
        out.update({f"heldout/dpo_{k}": v for k, v in (self.pairs or {}).items()})
        return out

    def state(self) -> dict:
        return {"iteration": self.iteration, "rollouts": asdict(self.rollouts), "scored_by_rm": self.scored_by_rm,
                "gold": None if self.gold is None else asdict(self.gold), "pairs": self.pairs}

    @classmethod
    def from_state(cls, state: dict) -> Point:
        gold = None if state["gold"] is None else GoldAccuracy(**state["gold"])
        return cls(state["iteration"], Rollouts(**state["rollouts"]), gold, state["scored_by_rm"], state["pairs"])


@torch.no_grad()
def measure(models: Models, params: PolicyParams, prompts: list[str], gold: Sequence[Task], instruction: str,
            iteration: int, heldout_pairs: list | None = None) -> Point:
    """Held-out figures at `iteration`: at 0 of the SFT policy (the reference), later of the policy being trained.

    One sampled response per held-out prompt, from a stream seeded with seed + 1 whatever the iteration (so every
    point samples the same way), scored by the RM when it is part of the reward, with its KL to the SFT policy;
    greedy answers to the gold tasks, checked by the verifier; for dpo, the held-out pairs' loss and margin."""
    acc, tok = models.accelerator, models.tokenizer
    policy = acc.unwrap_model(models.policy)
    was_training = policy.training
    policy.eval()
    sft = iteration == 0
    if sft:  # the SFT policy: the frozen copy, or the LoRA policy with its adapter off
        model, context = ((models.reference, contextlib.nullcontext) if models.reference is not None
                          else (policy, policy.disable_adapter))
    else:
        model = policy if models.sampler is None else refreshed(models.sampler, policy)
        context = contextlib.nullcontext

    def sample(query, query_mask):
        with context():
            return sample_responses(model, query, query_mask, params.max_new_tokens, params.temperature,
                                    models.stop_ids, tok.pad_token_id)

    scored_by_rm = models.rewards is not None and RM in models.rewards.weights

    def score(query, query_mask, responses, mask, ended):
        if not scored_by_rm:
            return torch.zeros(responses.size(0))
        return models.rewards.rm_scores(query, query_mask, responses, mask, ended, tok.pad_token_id)

    def kl(query, query_mask, responses, mask):
        logp = policy_forward(policy, query, query_mask, responses, mask, params.temperature)[0]
        logp_ref = reference_logprobs(acc, policy, models.reference, query, query_mask, responses, mask,
                                      params.temperature)
        return kl_per_response(logp, logp_ref, mask)

    def greedy(task_prompts: list[str]) -> list[str]:
        with context():
            return greedy_replies(model, tok, task_prompts, params.max_new_tokens, params.batch_size,
                                  params.max_prompt_len, models.stop_ids, acc.device)

    with rng_untouched(), acc.autocast():
        rollouts = heldout_rollouts(prompts, tok, sample, score, None if sft else kl, params.batch_size,
                                    params.max_prompt_len, params.seed + 1, acc.device)
        accuracy = gold_accuracy(greedy, gold, instruction) if gold else None
        pairs = dpo_heldout(models, params, heldout_pairs) if heldout_pairs else None
    if was_training:
        policy.train()
    return Point(iteration, rollouts, accuracy, scored_by_rm, pairs)


def evaluation_metrics(before: Point, after: Point) -> dict:
    """The before/after figures of the first and the last over-optimisation points."""
    b, a = before.rollouts, after.rollouts
    metrics = {
        "policy/heldout_responses": len(a.scores),
        "policy/heldout_kl_per_response": round(a.mean("kl"), 4),
        "policy/heldout_response_length_before": round(b.mean("lengths"), 2),
        "policy/heldout_response_length_after": round(a.mean("lengths"), 2),
        "policy/heldout_no_eos_fraction_before": round(1 - b.mean("ended"), 4),
        "policy/heldout_no_eos_fraction_after": round(1 - a.mean("ended"), 4),
    }
    if after.scored_by_rm:
        metrics.update({"policy/heldout_rm_score_before": round(b.mean("scores"), 4),
                        "policy/heldout_rm_score_after": round(a.mean("scores"), 4),
                        "policy/heldout_rm_score_gain": round(a.mean("scores") - b.mean("scores"), 4)})
    if after.gold is not None:
        gain, lower, upper = accuracy_difference(after.gold, before.gold)
        metrics.update({"policy/gold_tasks": after.gold.n,
                        "policy/gold_accuracy_before": round(before.gold.accuracy, 4),
                        "policy/gold_accuracy_before_lower": round(before.gold.lower, 4),
                        "policy/gold_accuracy_before_upper": round(before.gold.upper, 4),
                        "policy/gold_accuracy_after": round(after.gold.accuracy, 4),
                        "policy/gold_accuracy_after_lower": round(after.gold.lower, 4),
                        "policy/gold_accuracy_after_upper": round(after.gold.upper, 4),
                        "policy/gold_accuracy_gain": round(gain, 4),
                        "policy/gold_accuracy_gain_lower": round(lower, 4),
                        "policy/gold_accuracy_gain_upper": round(upper, 4)})
    for key, value in (after.pairs or {}).items():
        metrics[f"policy/heldout_dpo_{key}_before"] = round(before.pairs[key], 4)
        metrics[f"policy/heldout_dpo_{key}_after"] = round(value, 4)
    return metrics


def samples_shown(prompts: list[str], before: Point, after: Point) -> list[dict]:
    b, a = before.rollouts, after.rollouts
    return [{"prompt": prompts[i], "before": b.texts[i], "before_score": round(b.scores[i], 3),
             "after": a.texts[i], "after_score": round(a.scores[i], 3)} for i in range(min(N_SAMPLES_SHOWN, len(prompts)))]


def peak_rss_mib() -> float:
    # this process's peak resident set size so far: /proc's VmHWM (kB). Not ru_maxrss, which Linux carries over
    # from the parent across exec (under DVC, the larger of dvc's size and ours)
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# ------------------------------------------------------------------------------------------------
# Online algorithms: ppo, grpo, rloo, reinforce_pp
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(models: Models, params: PolicyParams, prompts: list[str], tasks: Mapping[str, dict]) -> dict:
    """Sample one response per prompt (a prompt repeated group_size times gets group_size) and everything the
    update holds fixed: log π_old, log π_ref, PPO's values, each reward part's scores."""
    acc, tok = models.accelerator, models.tokenizer
    query, query_mask = encode_queries(tok, prompts, params.max_prompt_len, acc.device)
    models.policy.eval()
    tic = time.perf_counter()
    policy = acc.unwrap_model(models.policy)
    # no autocast: every weight generation touches is in the compute dtype already (LoRA merged into the
    # bf16 base, or the sampler copy), where autocast's per-step weight casts would cost ~1/3 of the time
    generator = policy if models.sampler is None else refreshed(models.sampler, policy)
    with lora_merged(policy):
        responses, mask, ended = sample_responses(generator, query, query_mask, params.max_new_tokens,
                                                  params.temperature, models.stop_ids, tok.pad_token_id)
    generation_seconds = time.perf_counter() - tic
    texts = ([tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
             if models.rewards.needs_text else None)
    with acc.autocast():
        logp, entropy, hidden = policy_forward(models.policy, query, query_mask, responses, mask, params.temperature)
        batch = {
            "query": query, "query_mask": query_mask, "responses": responses, "mask": mask, "ended": ended,
            "logp_old": logp,
            "entropy": float(masked_mean(entropy, mask)),
            "logp_ref": reference_logprobs(acc, models.policy, models.reference, query, query_mask, responses, mask,
                                           params.temperature),
            "parts": models.rewards.score(query, query_mask, responses, mask, ended, tok.pad_token_id, prompts, texts,
                                          tasks),
            "generation_seconds": generation_seconds,
        }
        if models.value_model is not None:
            batch["values_old"] = models.values(hidden, query, query_mask, responses, mask).float()
    models.policy.train()
    return batch


def advantages_of(params: PolicyParams, batch: dict, score: torch.Tensor, beta: float):
    """(per-token advantages, PPO's returns or None, the mean non-score reward −β·KL the advantages saw)."""
    mask = batch["mask"].float()
    logp, logp_ref = batch["logp_old"], batch["logp_ref"]
    if params.algorithm == "ppo":
        rewards = token_rewards(score, logp, logp_ref, beta, mask)
        advantages, returns = gae(rewards, batch["values_old"], mask, params.gamma, params.lam)
        return whiten(advantages, mask), returns, float((rewards.sum(dim=1) - score).mean())
    kl = kl_per_response(logp, logp_ref, mask)
    if params.algorithm == "reinforce_pp":
        return (reinforce_pp_advantages(score, logp, logp_ref, beta, params.gamma, mask), None,
                float((-beta * kl).mean()))
    if params.algorithm == "rloo":
        reward = score - beta * kl
        return per_token(leave_one_out_advantages(reward, params.group_size), mask), None, float((-beta * kl).mean())
    kl_in_reward = params.grpo_kl == "reward"
    reward = score - beta * kl if kl_in_reward else score
    advantages = group_advantages(reward, params.group_size, scale_by_std=not params.dr_grpo)
    return per_token(advantages, mask), None, float((-beta * kl).mean()) if kl_in_reward else 0.0


def policy_update(models: Models, params: PolicyParams, optimizer, scheduler, trainable: list, batch: dict,
                  advantages: torch.Tensor, returns: torch.Tensor | None, beta: float) -> dict:
    """`update_epochs` passes of minibatch steps; the mean of each loss term and diagnostic.

    ppo:  L = L_clip + c_V·L_V − c_H·H         grpo: L = L_clip,agg + β·KL_k3,agg − c_H·H   (β = 0 with grpo_kl: reward)
    rloo, reinforce_pp: L = L_clip − c_H·H     (L_clip averaged over tokens; the KL is in their rewards)"""
    acc = models.accelerator
    maskf = batch["mask"].float()
    ppo, grpo = params.algorithm == "ppo", params.algorithm == "grpo"
    keys = ["loss/policy"] + (["loss/value"] if ppo else []) + (["loss/kl"] if grpo else []) + [
        "loss/entropy", "loss/total", "policy/clip_fraction", "policy/approx_kl"] + (["value/clip_fraction"] if ppo else [])
    sums = dict.fromkeys(keys, 0.0)
    kl_beta = beta if grpo and params.grpo_kl == "loss" else 0.0
    steps = 0
    for _epoch in range(params.update_epochs):
        order = torch.randperm(params.batch_size)
        for start in range(0, params.batch_size, params.minibatch_size):
            idx = order[start:start + params.minibatch_size].to(acc.device)
            q, qm, r, m = batch["query"][idx], batch["query_mask"][idx], batch["responses"][idx], maskf[idx]
            logp_old = batch["logp_old"][idx]
            terms = {}
            with acc.autocast():
                logp, entropy_per_token, hidden = policy_forward(models.policy, q, qm, r, batch["mask"][idx],
                                                                 params.temperature)
                if ppo:
                    values_old = batch["values_old"][idx]
                    values = models.values(hidden, q, qm, r, batch["mask"][idx]).float()
                    loss_pg = clipped_policy_loss(logp, logp_old, advantages[idx], params.clip_eps, m)
                    loss_v = value_loss(values, values_old, returns[idx], params.value_clip, m)
                    entropy = masked_mean(entropy_per_token, m)  # the loss gets −c_H·H
                    loss = loss_pg + params.vf_coef * loss_v - params.entropy_coef * entropy
                    terms = {"loss/value": loss_v,
                             "value/clip_fraction": masked_mean(((values - values_old).abs() > params.value_clip).float(), m)}
                elif grpo:
                    loss_pg, loss_kl = grpo_loss(logp, logp_old, batch["logp_ref"][idx], advantages[idx], params.clip_eps,
                                                 m, params.dr_grpo, params.max_new_tokens)
                    entropy = masked_mean(entropy_per_token, m)
                    loss = loss_pg + kl_beta * loss_kl - params.entropy_coef * entropy
                    terms = {"loss/kl": loss_kl}
                else:
                    loss_pg = clipped_policy_loss(logp, logp_old, advantages[idx], params.clip_eps, m)
                    entropy = masked_mean(entropy_per_token, m)
                    loss = loss_pg - params.entropy_coef * entropy
            acc.backward(loss)
            acc.clip_grad_norm_(trainable, params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                terms.update({"loss/policy": loss_pg, "loss/entropy": entropy, "loss/total": loss,
                              "policy/clip_fraction": clip_fraction(logp, logp_old, params.clip_eps, m),
                              "policy/approx_kl": approx_kl(logp, logp_old, m)})
                for key in keys:
                    sums[key] += float(terms[key])
            steps += 1
    return {k: v / steps for k, v in sums.items()}


def _restore(modules: list, state: dict, checkpoint_dir: Path) -> None:
    for module, key in modules:
        weights = _trainable(module)
        if set(weights) != set(state[key]):
            raise RuntimeError(f"{checkpoint_dir}: the checkpoint's {key} weights do not match the model built now")
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(state[key][name])


def train(params: PolicyParams, precision: str, sft_dir: str | Path, reward_dir: str | Path | None,
          train_prompts: list[str], heldout_prompts: list[str], out_dir: str | Path, checkpoint_dir: str | Path,
          run_fingerprint: str = "", tasks: Mapping[str, dict] | None = None, gold: Sequence[Task] = (),
          instruction: str = "") -> dict:
    """Run an online algorithm (resuming from `checkpoint_dir` when it holds a matching checkpoint); save the
    policy; return its metrics, per-iteration curve, over-optimisation points and samples.

    `tasks` maps each verifiable training prompt to its task record (the verifier's reward reads it); `gold` are
    the held-out tasks of the gold accuracy, prompted with `instruction`. `heldout_prompts` (the test split's) are
    taken in turn until `params.eval_responses`. `reward_dir` is read when the reward includes the RM, and by PPO's
    value model initialised from it."""
    if not params.online:
        raise ValueError("rlhf.policy.train runs the online algorithms; DPO is rlhf.policy.train_dpo")
    tasks = dict(tasks or {})
    check_sizes(params, len(train_prompts), len(heldout_prompts))
    set_seed(params.seed)
    dtype = resolve_precision(precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(sft_dir)

    policy, reference = build_policy(str(sft_dir), dtype, params)
    reward_model, reward_stats = load_reward_model(reward_dir, dtype) if params.uses_reward_model else (None, None)
    if reward_model is not None:
        reward_model.eval().requires_grad_(False)
    ppo = params.algorithm == "ppo"
    value_model = build_value_model(params, str(reward_dir), dtype, policy.config.hidden_size) if ppo else None
    trainable = list(_trainable(policy).values()) + (list(_trainable(value_model).values()) if ppo else [])
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, fused=True)
    updates_per_iteration = params.update_epochs * (params.batch_size // params.minibatch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, params.iterations * updates_per_iteration)
    # the scheduler stays unprepared: accelerate would step it once per process, for data loaders it shards
    if ppo:
        policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    for frozen in (reward_model, reference):
        if frozen is not None:
            frozen.to(accelerator.device)
    sampler_copy = build_sampler(str(sft_dir), dtype, params.uses_lora)
    if sampler_copy is not None:
        sampler_copy.to(accelerator.device)
    suffix = reply_suffix(tokenizer)
    rewards = RewardSources(params.reward_weights, reward_model, reward_stats, suffix)
    stop_ids = eos_ids(accelerator.unwrap_model(policy), tokenizer)
    models = Models(accelerator, policy, reference, value_model, rewards, tokenizer, suffix, stop_ids, sampler_copy)
    n_trainable, n_total = count_parameters(policy)
    sampler = PromptSampler(train_prompts, params.seed)
    eval_prompts = [heldout_prompts[i % len(heldout_prompts)] for i in range(params.eval_responses)]
    beta, start, curve, points = params.kl_coef, 0, [], []
    modules = [(policy, "policy")] + ([(value_model, "value")] if ppo else [])

    checkpoint_dir = Path(checkpoint_dir)
    state = load_latest_state(checkpoint_dir, run_fingerprint)
    if state is not None:
        _restore(modules, state, checkpoint_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.restore(state["sampler"])
        beta, start, curve = state["kl_coef"], state["iteration"], state["curve"]
        points = [Point.from_state(p) for p in state["points"]]
        restore_rng(state["rng"])
        print(f"policy: resuming after iteration {start} from {checkpoint_path(checkpoint_dir, start)}")
        if accelerator.is_main_process:  # this run's MLflow history starts where the checkpoint's ends
            for row in [{"iteration": 0, **points[0].row()}] + curve:
                log_step({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])
    else:
        points = [measure(models, params, eval_prompts, gold, instruction, 0)]
        if accelerator.is_main_process:
            log_step(points[0].row(), step=0)

    progress = tqdm(total=params.iterations, initial=start, desc=params.algorithm,
                    disable=not accelerator.is_main_process)
    prompts_per_batch = params.batch_size // params.group_size
    for iteration in range(start + 1, params.iterations + 1):
        tic = time.perf_counter()
        prompts = [p for p in sampler.next_batch(prompts_per_batch) for _ in range(params.group_size)]
        batch = rollout(models, params, prompts, tasks)
        mask = batch["mask"].float()
        reward = weighted_reward(batch["parts"], params.reward_weights)
        score = reward - params.no_eos_penalty * (~batch["ended"]).float()
        advantages, returns, non_score_reward = advantages_of(params, batch, score, beta)
        losses = policy_update(models, params, optimizer, scheduler, trainable, batch, advantages, returns, beta)

        kl = float(kl_per_response(batch["logp_old"], batch["logp_ref"], mask).mean())  # nats per response
        elapsed = time.perf_counter() - tic
        n_tokens = int(mask.sum())
        row = {
            "iteration": iteration,
            **({"objective/rm_score": float(batch["parts"][RM].mean())} if RM in batch["parts"] else {}),
            **{k: v for k, v in part_means(batch["parts"]).items() if k != f"reward/{RM}"},
            "objective/score": float(score.mean()),
            "objective/kl": kl,
            "objective/kl_coef": beta,
            "objective/entropy": batch["entropy"],
            "objective/non_score_reward": non_score_reward,
            **losses,
            **({"value/explained_variance": explained_variance(batch["values_old"], returns, mask),
                "value/mean": float(masked_mean(batch["values_old"], mask))} if ppo else {}),
            "response/length": float(mask.sum(dim=1).mean()),
            "response/no_eos_fraction": float((~batch["ended"]).float().mean()),
            "perf/tokens_per_s": n_tokens / elapsed,
            "perf/generation_tokens_per_s": n_tokens / batch["generation_seconds"],
            "perf/iteration_seconds": elapsed,
            "lr": scheduler.get_last_lr()[0],
        }
        if iteration % params.eval_every == 0 or iteration == params.iterations:
            points.append(measure(models, params, eval_prompts, gold, instruction, iteration))
            row.update(points[-1].row())
        curve.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        if accelerator.is_main_process:
            log_step({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
        beta = adaptive_kl_coef(beta, kl, params.kl_target, params.kl_horizon, params.batch_size)
        progress.set_postfix(score=f"{row['objective/score']:.2f}", kl=f"{kl:.2f}", tok_s=f"{n_tokens / elapsed:.0f}")
        progress.update(1)
        if accelerator.is_main_process and (iteration % params.checkpoint_every == 0 or iteration == params.iterations):
            save_state(checkpoint_dir, {
                "iteration": iteration, "fingerprint": run_fingerprint,
                **{key: {n: p.detach().cpu().clone() for n, p in _trainable(module).items()} for module, key in modules},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "kl_coef": beta,
                "sampler": sampler.state(), "rng": rng_states(), "curve": curve,
                "points": [p.state() for p in points],
            })
    progress.close()

    n_samples = len(curve) * params.batch_size
    metrics = {
        "policy/iterations": params.iterations,
        "policy/resumed_from": start,
        "policy/trainable_parameters": n_trainable,
        "policy/total_parameters": n_total,
        "policy/train_prompts": len(train_prompts),
        "policy/train_task_prompts": sum(p in tasks for p in train_prompts),
        "policy/final_kl_coef": round(beta, 6),
        "policy/last_score": curve[-1]["objective/score"],
        "policy/last_kl": curve[-1]["objective/kl"],
        "policy/last_entropy": curve[-1]["objective/entropy"],
        **({"policy/last_rm_score": curve[-1]["objective/rm_score"]} if "objective/rm_score" in curve[-1] else {}),
        "policy/heldout_prompts": len(set(eval_prompts)),
        **evaluation_metrics(points[0], points[-1]),
        "perf/samples_per_s": round(n_samples / sum(r["perf/iteration_seconds"] for r in curve), 4),
        "perf/tokens_per_s": round(sum(r["response/length"] for r in curve) * params.batch_size
                                   / sum(r["perf/iteration_seconds"] for r in curve), 2),
        "perf/peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(policy), tokenizer, out_dir, dtype)
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "curve": curve, "points": [{"iteration": p.iteration, **p.row()} for p in points],
            "samples": samples_shown(eval_prompts, points[0], points[-1])}


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------

def pair_logprobs(model, encoded: list, pad_id: int, device, temperature: float = 1.0) -> torch.Tensor:
    """log π(y) of each pair's chosen and rejected response, (B, 2), in one forward pass."""
    query, query_mask, responses, mask = pair_batch(encoded, pad_id, device)
    logp = policy_forward(model, query, query_mask, responses, mask, temperature)[0]
    return sequence_logprob(logp, mask.float()).view(2, -1).T


def preference_loss(params: PolicyParams, margin: torch.Tensor) -> torch.Tensor:
    return ipo_loss(margin, params.dpo_beta) if params.dpo_loss == "ipo" else dpo_loss(margin, params.dpo_beta)


@torch.no_grad()
def reference_pair_logprobs(models: Models, encoded: list, chunk: int) -> torch.Tensor:
    """log π_ref(y₊), log π_ref(y₋) of every pair, (n, 2): the reference never changes, so once, before training."""
    acc, pad = models.accelerator, models.tokenizer.pad_token_id
    policy = acc.unwrap_model(models.policy)
    out = []
    with acc.autocast():
        for start in range(0, len(encoded), chunk):
            part = encoded[start:start + chunk]
            if models.reference is None:
                with policy.disable_adapter():
                    out.append(pair_logprobs(policy, part, pad, acc.device).float())
            else:
                out.append(pair_logprobs(models.reference, part, pad, acc.device).float())
    return torch.cat(out)


@torch.no_grad()
def dpo_heldout(models: Models, params: PolicyParams, heldout: tuple[list, torch.Tensor]) -> dict:
    """The held-out pairs' preference loss, accuracy (h > 0) and mean margin β·h under the current policy."""
    encoded, reference = heldout
    acc = models.accelerator
    policy = acc.unwrap_model(models.policy)
    logps = torch.cat([pair_logprobs(policy, encoded[s:s + params.minibatch_size], models.tokenizer.pad_token_id,
                                     acc.device).float() for s in range(0, len(encoded), params.minibatch_size)])
    margin = logratio_margin(logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1])
    return {"loss": float(preference_loss(params, margin)), "accuracy": float((margin > 0).float().mean()),
            "margin": float((params.dpo_beta * margin).mean())}


def train_dpo(params: PolicyParams, precision: str, sft_dir: str | Path, pairs: list[Pair], heldout_pairs: list[Pair],
              heldout_prompts: list[str], out_dir: str | Path, checkpoint_dir: str | Path, run_fingerprint: str = "",
              ties: int = 0, gold: Sequence[Task] = (), instruction: str = "") -> dict:
    """DPO (or IPO) over `pairs` for `dpo_epochs` (resuming from a matching checkpoint); save the policy; return
    metrics, the per-step curve, the over-optimisation points and samples. `ties` is how many tied comparisons
    were left out, for the metrics."""
    if params.online:
        raise ValueError("rlhf.policy.train_dpo runs dpo; the online algorithms are rlhf.policy.train")
    check_dpo_sizes(params, len(pairs), ties)
    set_seed(params.seed)
    dtype = resolve_precision(precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(sft_dir)
    policy, reference = build_policy(str(sft_dir), dtype, params)
    trainable = list(_trainable(policy).values())
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, fused=True)
    steps_per_epoch = math.ceil(len(pairs) / params.batch_size)
    total_steps = params.dpo_epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if reference is not None:
        reference.to(accelerator.device)
    sampler_copy = build_sampler(str(sft_dir), dtype, params.uses_lora)
    if sampler_copy is not None:
        sampler_copy.to(accelerator.device)
    suffix = reply_suffix(tokenizer)
    stop_ids = eos_ids(accelerator.unwrap_model(policy), tokenizer)
    models = Models(accelerator, policy, reference, None, None, tokenizer, suffix, stop_ids, sampler_copy)
    n_trainable, n_total = count_parameters(policy)
    pad = tokenizer.pad_token_id

    def encode(some):
        return [encode_pair(tokenizer, p, suffix, params.max_prompt_len, params.max_new_tokens) for p in some]

    encoded = encode(pairs)
    reference_logps = reference_pair_logprobs(models, encoded, params.minibatch_size)
    heldout = None
    if heldout_pairs:
        heldout_encoded = encode(heldout_pairs)
        heldout = (heldout_encoded, reference_pair_logprobs(models, heldout_encoded, params.minibatch_size))
    eval_prompts = [heldout_prompts[i % len(heldout_prompts)] for i in range(params.eval_responses)]

    start, curve, points = 0, [], []
    checkpoint_dir = Path(checkpoint_dir)
    state = load_latest_state(checkpoint_dir, run_fingerprint)
    if state is not None:
        _restore([(policy, "policy")], state, checkpoint_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, curve = state["iteration"], state["curve"]
        points = [Point.from_state(p) for p in state["points"]]
        restore_rng(state["rng"])
        print(f"policy: resuming after step {start} from {checkpoint_path(checkpoint_dir, start)}")
        if accelerator.is_main_process:
            for row in [{"iteration": 0, **points[0].row()}] + curve:
                log_step({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])
    else:
        points = [measure(models, params, eval_prompts, gold, instruction, 0, heldout)]
        if accelerator.is_main_process:
            log_step(points[0].row(), step=0)

    progress = tqdm(total=total_steps, initial=start, desc="dpo", disable=not accelerator.is_main_process)
    for step in range(start + 1, total_steps + 1):
        epoch, within = divmod(step - 1, steps_per_epoch)
        order = list(range(len(pairs)))
        random.Random(params.seed + epoch).shuffle(order)  # an epoch's order depends on its number alone: resumable
        chosen_ids = order[within * params.batch_size:(within + 1) * params.batch_size]
        tic = time.perf_counter()
        sums = {"loss/dpo": 0.0, "dpo/accuracy": 0.0, "dpo/margin": 0.0, "dpo/chosen_reward": 0.0,
                "dpo/rejected_reward": 0.0}
        for s in range(0, len(chosen_ids), params.minibatch_size):
            ids = chosen_ids[s:s + params.minibatch_size]
            ref = reference_logps[ids].to(accelerator.device)
            with accelerator.autocast():
                logps = pair_logprobs(policy, [encoded[i] for i in ids], pad, accelerator.device).float()
                margin = logratio_margin(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])
                loss = preference_loss(params, margin)
            accelerator.backward(loss * len(ids) / len(chosen_ids))  # the step's loss is the mean over its pairs
            with torch.no_grad():
                share = len(ids) / len(chosen_ids)
                sums["loss/dpo"] += float(loss) * share
                sums["dpo/accuracy"] += float((margin > 0).float().mean()) * share
                sums["dpo/margin"] += float((params.dpo_beta * margin).mean()) * share
                sums["dpo/chosen_reward"] += float((params.dpo_beta * (logps[:, 0] - ref[:, 0])).mean()) * share
                sums["dpo/rejected_reward"] += float((params.dpo_beta * (logps[:, 1] - ref[:, 1])).mean()) * share
        accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - tic
        row = {"iteration": step, "epoch": epoch + 1, **sums, "perf/pairs_per_s": len(chosen_ids) / elapsed,
               "perf/iteration_seconds": elapsed, "lr": scheduler.get_last_lr()[0]}
        if step % params.eval_every == 0 or step == total_steps:
            points.append(measure(models, params, eval_prompts, gold, instruction, step, heldout))
            row.update(points[-1].row())
        curve.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        if accelerator.is_main_process:
            log_step({k: v for k, v in row.items() if k != "iteration"}, step=step)
        progress.set_postfix(loss=f"{sums['loss/dpo']:.3f}", margin=f"{sums['dpo/margin']:.2f}")
        progress.update(1)
        if accelerator.is_main_process and (step % params.checkpoint_every == 0 or step == total_steps):
            save_state(checkpoint_dir, {
                "iteration": step, "fingerprint": run_fingerprint,
                "policy": {n: p.detach().cpu().clone() for n, p in _trainable(policy).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(),
                "curve": curve, "points": [p.state() for p in points],
            })
    progress.close()

    metrics = {
        "policy/iterations": total_steps,
        "policy/resumed_from": start,
        "policy/trainable_parameters": n_trainable,
        "policy/total_parameters": n_total,
        "policy/train_pairs": len(pairs),
        "policy/ties_excluded": ties,
        "policy/heldout_pairs": len(heldout_pairs),
        "policy/last_dpo_loss": curve[-1]["loss/dpo"],
        "policy/last_dpo_margin": curve[-1]["dpo/margin"],
        "policy/heldout_prompts": len(set(eval_prompts)),
        **evaluation_metrics(points[0], points[-1]),
        "perf/pairs_per_s": round(len(pairs) * params.dpo_epochs / sum(r["perf/iteration_seconds"] for r in curve), 4),
        "perf/peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(policy), tokenizer, out_dir, dtype)
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "curve": curve, "points": [{"iteration": p.iteration, **p.row()} for p in points],
            "samples": samples_shown(eval_prompts, points[0], points[-1])}


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def training_prompts(params: PolicyParams, tasks_params: TasksParams) -> tuple[list[str], dict[str, dict], int]:
    """(the training pool, {verifiable prompt: task record}, open-ended prompts left out): the open-ended pool
    (`policy.prompts`) and `policy.task_prompts` verifiable tasks. Open-ended prompts are left out when no part of
    the reward scores them (the verifier alone)."""
    open_ended = load_train_prompts(params.prompts)
    records = {task_prompt(t, tasks_params.instruction): t.to_dict()
               for t in (train_tasks(tasks_params, params.task_prompts) if params.task_prompts else [])}
    if params.online and not scores_prompt(params.reward_weights, has_task=False):
        if not records:
            raise ParamError(
                "params.yaml: policy.reward is the verifier alone, which scores only verifiable tasks, but "
                "policy.task_prompts is 0, so no training prompt would get a reward. Set policy.task_prompts (320 is "
                "the default) or add a part that scores open-ended prompts (`rm`, a reward function)."
            )
        return list(records), records, len(open_ended)
    known = set(open_ended)
    return open_ended + [p for p in records if p not in known], records, 0


def run_fingerprint_of(params: PolicyParams, tasks_params: TasksParams, precision: str, inputs: list) -> str:
    """What a checkpoint must match to be resumed: the policy section, the tasks it draws, precision, inputs."""
    tasks_hash = hashlib.sha256(json.dumps(asdict(tasks_params), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{fingerprint('policy', params, precision, inputs)}-{tasks_hash}"


def main() -> int:
    config = load_params()
    p, precision = config.policy, config.model.precision
    if p.gold_tasks > config.tasks.heldout_size:
        raise ParamError(
            f"params.yaml: policy.gold_tasks is {p.gold_tasks}, more than the {config.tasks.heldout_size} held-out tasks "
            "(tasks.heldout_size) it is drawn from. Lower policy.gold_tasks or raise tasks.heldout_size."
        )
    gold = heldout_tasks(config.tasks)[:p.gold_tasks]
    pool, tasks, left_out = training_prompts(p, config.tasks)
    train_prompts, heldout = held_out_prompts(pool, p.eval_responses, p.seed)
    inputs = [SFT_DIR, TEST_COMPARISONS]
    if p.uses_reward_model or (p.algorithm == "ppo" and p.value_model == "reward_model"):
        inputs.append(REWARD_DIR)
    if p.algorithm == "dpo" or p.prompts == "comparisons":
        inputs.append(TRAIN_COMPARISONS)
    if p.prompts not in ("comparisons", "embedded:prompts"):
        inputs.append(p.prompts)
    run_fingerprint = run_fingerprint_of(p, config.tasks, precision, inputs)
    section = {"policy": config.section("policy"), "tasks": config.section("tasks"), "model.precision": precision}
    with tracking.stage_run("policy", section):
        gate = {}
        if p.uses_reward_model:
            quality = reward_model_quality(REWARD_DIR, precision)
            train_anyway, why = reward_model_gate(quality["lower"], p.allow_weak_reward_model)
            gate = {"policy/rm_accuracy": quality["accuracy"], "policy/rm_accuracy_lower": round(quality["lower"], 4),
                    "policy/rm_pairs": quality["pairs"], "policy/rm_gate_passed": int(why == "above_chance"),
                    "policy/rm_gate_forced": int(why == "forced")}
            if not train_anyway:
                if PartialState().is_main_process:
                    tracking.write_metrics(METRICS, {**gate, "policy/stopped_before_training": 1})
                raise ParamError(f"policy: stopped before training: {weak_reward_model_message(quality)}")
            if why == "forced":
                print(f"policy: training anyway (policy.allow_weak_reward_model): {weak_reward_model_message(quality)}")
        if p.online:
            result = train(p, precision, SFT_DIR, REWARD_DIR, train_prompts, heldout, POLICY_DIR, CHECKPOINT_DIR,
                           run_fingerprint, tasks, gold, config.tasks.instruction)
        else:
            pairs, ties = preference_pairs(read_comparisons(TRAIN_COMPARISONS), TRAIN_COMPARISONS)
            heldout_pairs, _ = preference_pairs(read_comparisons(TEST_COMPARISONS), TEST_COMPARISONS)
            result = train_dpo(p, precision, SFT_DIR, pairs, heldout_pairs, heldout, POLICY_DIR, CHECKPOINT_DIR,
                               run_fingerprint, ties, gold, config.tasks.instruction)
        if not PartialState().is_main_process:
            return 0  # under `accelerate launch` one process records and writes the outputs
        metrics = {**gate, **result["metrics"], "policy/open_prompts_left_out": left_out}
        tracking.log_outputs("policy", {"policy": POLICY_DIR})
        tracking.write_plot(PLOT, [result["points"][0]] + result["curve"])
        tracking.write_metrics(METRICS, metrics)
        if mlflow.active_run() is not None:
            mlflow.log_dict(result["samples"], "policy_samples.json")
    for s in result["samples"]:
        print(f"\nprompt: {s['prompt']}\n  before ({s['before_score']:+.2f}): {s['before']}\n"
              f"  after  ({s['after_score']:+.2f}): {s['after']}")
    m = metrics
    figures = [f"KL {m['policy/heldout_kl_per_response']:.2f} nats per response"]
    if "policy/heldout_rm_score_before" in m:
        figures.insert(0, f"held-out RM score {m['policy/heldout_rm_score_before']:+.3f} -> "
                          f"{m['policy/heldout_rm_score_after']:+.3f} (proxy, RM std units)")
    if "policy/gold_accuracy_before" in m:
        figures.append(f"gold accuracy {m['policy/gold_accuracy_before']:.3f} -> {m['policy/gold_accuracy_after']:.3f} "
                       f"on {m['policy/gold_tasks']} held-out tasks (gain {m['policy/gold_accuracy_gain']:+.3f}, "
                       f"95% interval [{m['policy/gold_accuracy_gain_lower']:+.3f}, {m['policy/gold_accuracy_gain_upper']:+.3f}])")
    print(f"\npolicy ({p.algorithm}, reward {p.reward_weights if p.online else 'the comparisons'}): "
          f"{'; '.join(figures)}; wrote {POLICY_DIR}")
    return 0


if __name__ == "__main__":
    run_stage(main)
