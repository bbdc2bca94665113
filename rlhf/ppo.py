"""Stage `ppo`: optimise the SFT policy against the frozen reward model, on a KL leash to the SFT model.

Each iteration (Ziegler et al. 2019; Ouyang et al. 2022):
  1. sample one response per prompt for a batch of prompts (stochastic, batched, KV cache);
  2. score each with the reward model, in RM standard deviations ((R − mean)/std, statistics stored
     with the RM), minus `no_eos_penalty` when the response never emitted EOS;
  3. per-token reward r_t = −β·(log π − log π_ref)_t, plus the score on the response's last token;
  4. GAE(γ, λ) advantages, whitened over the batch's response tokens;
  5. `ppo_epochs` passes of minibatch updates: clipped surrogate + c_V·clipped value loss − c_H·entropy,
     gradient-norm clipping;
  6. the adaptive controller moves β so that the KL per response approaches `kl_target`.

Policy: models/sft with LoRA (the reference is the same weights with the adapter disabled, no second
copy) or trained in full (the reference is a frozen copy). Value: a linear head on the policy's last
hidden state, or a separate model initialised from the reward model (`ppo.value_model`).

Checkpoints (checkpoints/ppo, not a DVC output) hold the trainable weights, optimizer, scheduler, β,
every RNG state and the metrics so far; a restarted stage resumes from the last one whose params and
inputs match, and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from rlhf import tracking
from rlhf.chat import reply_suffix
from rlhf.checkpoints import count_parameters, load_tokenizer, resolve_precision, save_checkpoint
from rlhf.models import add_lora, load_causal_lm, load_scalar_model
from rlhf.params import ParamError, PpoParams, load_params
from rlhf.paths import POLICY_CURVES as PLOT, POLICY_DIR, REWARD_DIR, SFT_DIR, TEST_COMPARISONS, TRAIN_COMPARISONS
from rlhf.prompts import PromptSampler, held_out_prompts, load_train_prompts
from rlhf.resume import checkpoint_path, fingerprint, load_latest_state, restore_rng, rng_states, save_state
from rlhf.rewards import TokenScorer, load_reward_model, normalised, score_responses
from rlhf.rollouts import (build_sampler, encode_queries, eos_ids, heldout_rollouts, kl_per_response, lora_merged,
                           mask_positions, policy_forward, refreshed, sample_responses)
from rlhf.stage import log_step, run_stage

CHECKPOINT_DIR = "checkpoints/ppo"
METRICS = "metrics/ppo.json"
N_SAMPLES_SHOWN = 4  # before/after samples printed and logged to MLflow


# ------------------------------------------------------------------------------------------------
# The equations
# ------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x̂ = (x − mean) / std over the valid tokens; 0 elsewhere
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    # β·KL per token, with KL_t = log π(a_t|s_t) − log π_ref(a_t|s_t)
    return beta * (logp - logp_ref)


def token_rewards(score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, beta: float,
                  mask: torch.Tensor) -> torch.Tensor:
    # r_t = −β·(log π − log π_ref)_t, and r_T += score on the last response token T
    r = -kl_penalty(logp, logp_ref, beta) * mask
    last = mask.sum(dim=1).long() - 1
    r[torch.arange(r.size(0)), last] += score
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    # δ_t = r_t + γV_{t+1} − V_t ;  A_t = δ_t + γλA_{t+1} ;  V and A are 0 after the last token.
    # Returns (advantages, returns = A + V). With γ = λ = 1, A_t = Σ_{k≥t} r_k − V_t.
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    steps = rewards.size(1)
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < steps else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, eps: float,
                        mask: torch.Tensor) -> torch.Tensor:
    # L = −E[min(ρA, clip(ρ, 1−ε, 1+ε)A)], ρ = exp(log π − log π_old)
    ratio = torch.exp(logp - logp_old)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    return -masked_mean(surrogate, mask)


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, clip: float,
               mask: torch.Tensor) -> torch.Tensor:
    # L_V = ½E[max((V − R)², (V_clip − R)²)], V_clip = V_old + clip(V − V_old, −c, c)
    values_clipped = values_old + (values - values_old).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)


def approx_kl(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # KL(π_old‖π) ≈ E[(ρ − 1) − log ρ] (Schulman's k3: unbiased, never negative)
    log_ratio = logp - logp_old
    return masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)


def clip_fraction(logp: torch.Tensor, logp_old: torch.Tensor, eps: float, mask: torch.Tensor) -> torch.Tensor:
    # share of tokens whose ratio left [1−ε, 1+ε]
    return masked_mean(((torch.exp(logp - logp_old) - 1).abs() > eps).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    # 1 − Var(R − V) / Var(R): 1 is a perfect value function, ≤ 0 no better than a constant
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_responses: int) -> float:
    # β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon)  (Ziegler et al. 2019)
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_responses / horizon)


def reference_logprobs(accelerator, policy, reference, query, query_mask, responses, response_mask,
                       temperature: float) -> torch.Tensor:
    """log π_ref of the response tokens: the frozen copy, or the LoRA policy with its adapter disabled."""
    if reference is None:
        with accelerator.unwrap_model(policy).disable_adapter():
            return policy_forward(policy, query, query_mask, responses, response_mask, temperature)[0]
    return policy_forward(reference, query, query_mask, responses, response_mask, temperature)[0]


def value_forward(value_model, query, query_mask, responses, response_mask) -> torch.Tensor:
    """Per-token values of a separate value model (a TokenScorer, so DDP runs its forward), (B, N), at the
    positions that predict each response token."""
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = mask_positions(attention_mask)
    n = responses.size(1)
    return value_model(input_ids, attention_mask, position_ids)[:, -n - 1:-1]


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def build_policy(sft_dir: str, dtype: torch.dtype, params: PpoParams):
    """(policy, frozen reference or None). With LoRA the reference is the policy with its adapter disabled."""
    if not params.uses_lora:
        policy = load_causal_lm(sft_dir, dtype=torch.float32)  # fp32 master weights
        reference = load_causal_lm(sft_dir, dtype=dtype).eval().requires_grad_(False)
        return policy, reference
    # no LoRA dropout: the ratio π/π_old must be exactly 1 before the first update
    return add_lora(load_causal_lm(sft_dir, dtype=dtype), params.lora_r, params.lora_alpha, 0.0), None


def build_value_model(params: PpoParams, reward_dir: str, dtype: torch.dtype, hidden_size: int) -> torch.nn.Module:
    """A zero-initialised linear head (V = 0 at first), or a trainable copy of the reward model (in a TokenScorer)."""
    if params.value_model == "head":
        head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return head
    model = load_scalar_model(reward_dir, dtype if params.uses_lora else torch.float32)
    if not params.uses_lora:
        return TokenScorer(model)
    return TokenScorer(add_lora(model, params.lora_r, params.lora_alpha, 0.0, task_type="SEQ_CLS"))


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def check_sizes(params: PpoParams, n_train: int, n_eval: int) -> None:
    if params.batch_size % params.minibatch_size:
        raise ParamError(
            f"params.yaml: ppo.minibatch_size is {params.minibatch_size}, which does not divide ppo.batch_size "
            f"({params.batch_size}), so the last minibatch of every epoch would be short. Pick a divisor of "
            f"{params.batch_size} (for example {params.batch_size // 2 or 1})."
        )
    if params.batch_size > n_train:
        raise ParamError(
            f"params.yaml: ppo.batch_size is {params.batch_size}, larger than the {n_train} distinct training prompts. "
            f"Set ppo.batch_size to at most {n_train} (or add prompts) and run again."
        )
    if n_eval == 0:
        raise ParamError(
            f"{TEST_COMPARISONS} holds no prompt that is not also a training prompt, so PPO has nothing held out to "
            "measure on. Check the validate stage's test split."
        )


@dataclass
class Models:
    """What every iteration uses: the trained policy and value model, the frozen reference and reward model."""
    accelerator: Accelerator
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled
    value_model: torch.nn.Module
    reward_model: torch.nn.Module
    reward_stats: dict  # {"mean", "std"} of the RM over its training responses
    tokenizer: object
    suffix: list[int]  # template tokens after an assistant reply's EOS
    stop_ids: list[int]  # tokens that end a response
    sampler: torch.nn.Module | None = None  # full fine-tuning in bf16: the rollouts' bf16 copy of the policy

    def values(self, hidden, query, query_mask, responses, response_mask) -> torch.Tensor:
        if isinstance(self.accelerator.unwrap_model(self.value_model), torch.nn.Linear):  # a head on the policy's hidden state
            return self.value_model(hidden.float()).squeeze(-1)
        return value_forward(self.value_model, query, query_mask, responses, response_mask)


@torch.no_grad()
def rollout(models: Models, params: PpoParams, prompts: list[str]) -> dict:
    """Sample one response per prompt and everything PPO holds fixed while it updates on them."""
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
    with acc.autocast():
        logp, entropy, hidden = policy_forward(models.policy, query, query_mask, responses, mask, params.temperature)
        batch = {
            "query": query, "query_mask": query_mask, "responses": responses, "mask": mask, "ended": ended,
            "logp_old": logp,
            "entropy": float(masked_mean(entropy, mask)),
            "values_old": models.values(hidden, query, query_mask, responses, mask).float(),
            "logp_ref": reference_logprobs(acc, models.policy, models.reference, query, query_mask, responses, mask,
                                           params.temperature),
            "raw_score": score_responses(models.reward_model, query, query_mask, responses, mask, ended,
                                         models.suffix, tok.pad_token_id),
            "generation_seconds": generation_seconds,
        }
    models.policy.train()
    return batch


def ppo_update(models: Models, params: PpoParams, optimizer, scheduler, trainable: list, batch: dict,
               advantages: torch.Tensor, returns: torch.Tensor) -> dict:
    """`ppo_epochs` passes of minibatch steps on L = L_clip + c_V·L_V − c_H·H; the mean of each term."""
    acc = models.accelerator
    maskf = batch["mask"].float()
    sums = dict.fromkeys(("loss/policy", "loss/value", "loss/entropy", "loss/total", "policy/clip_fraction",
                          "policy/approx_kl", "value/clip_fraction"), 0.0)
    steps = 0
    for _epoch in range(params.ppo_epochs):
        order = torch.randperm(params.batch_size)
        for start in range(0, params.batch_size, params.minibatch_size):
            idx = order[start:start + params.minibatch_size].to(acc.device)
            q, qm, r, m = batch["query"][idx], batch["query_mask"][idx], batch["responses"][idx], maskf[idx]
            logp_old, values_old = batch["logp_old"][idx], batch["values_old"][idx]
            with acc.autocast():
                logp, entropy_per_token, hidden = policy_forward(models.policy, q, qm, r, batch["mask"][idx],
                                                                 params.temperature)
                values = models.values(hidden, q, qm, r, batch["mask"][idx]).float()
                loss_pg = clipped_policy_loss(logp, logp_old, advantages[idx], params.clip_eps, m)
                loss_v = value_loss(values, values_old, returns[idx], params.value_clip, m)
                entropy = masked_mean(entropy_per_token, m)  # the loss gets −c_H·H
                loss = loss_pg + params.vf_coef * loss_v - params.entropy_coef * entropy
            acc.backward(loss)
            acc.clip_grad_norm_(trainable, params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for key, value in (("loss/policy", loss_pg), ("loss/value", loss_v), ("loss/entropy", entropy),
                                   ("loss/total", loss),
                                   ("policy/clip_fraction", clip_fraction(logp, logp_old, params.clip_eps, m)),
                                   ("policy/approx_kl", approx_kl(logp, logp_old, m)),
                                   ("value/clip_fraction",
                                    masked_mean(((values - values_old).abs() > params.value_clip).float(), m))):
                    sums[key] += float(value)
            steps += 1
    return {k: v / steps for k, v in sums.items()}


def train(params: PpoParams, precision: str, sft_dir: str | Path, reward_dir: str | Path, train_prompts: list[str],
          heldout_prompts: list[str], out_dir: str | Path, checkpoint_dir: str | Path, run_fingerprint: str = "") -> dict:
    """Run PPO (resuming from `checkpoint_dir` when it holds a matching checkpoint); save the policy; return metrics.

    `heldout_prompts` (the test split's) are taken in turn until `params.eval_responses` for the before/after comparison.
    """
    check_sizes(params, len(train_prompts), len(heldout_prompts))
    set_seed(params.seed)
    dtype = resolve_precision(precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(sft_dir)

    policy, reference = build_policy(str(sft_dir), dtype, params)
    reward_model, reward_stats = load_reward_model(reward_dir, dtype)
    reward_model.eval().requires_grad_(False)
    value_model = build_value_model(params, str(reward_dir), dtype, policy.config.hidden_size)
    trainable = list(_trainable(policy).values()) + list(_trainable(value_model).values())
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, fused=True)
    updates_per_iteration = params.ppo_epochs * (params.batch_size // params.minibatch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, params.iterations * updates_per_iteration)
    # the scheduler stays unprepared: accelerate would step it once per process, for data loaders it shards
    policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    for frozen in (reward_model, reference):
        if frozen is not None:
            frozen.to(accelerator.device)
    sampler_copy = build_sampler(str(sft_dir), dtype, params.uses_lora)
    if sampler_copy is not None:
        sampler_copy.to(accelerator.device)
    models = Models(accelerator, policy, reference, value_model, reward_model, reward_stats, tokenizer,
                    reply_suffix(tokenizer), eos_ids(policy, tokenizer), sampler_copy)
    n_trainable, n_total = count_parameters(policy)
    sampler = PromptSampler(train_prompts, params.seed)
    beta, start, curve = params.kl_coef, 0, []

    checkpoint_dir = Path(checkpoint_dir)
    state = load_latest_state(checkpoint_dir, run_fingerprint)
    if state is not None:
        for module, key in ((policy, "policy"), (value_model, "value")):
            weights = _trainable(module)
            if set(weights) != set(state[key]):
                raise RuntimeError(f"{checkpoint_dir}: the checkpoint's {key} weights do not match the model built now")
            with torch.no_grad():
                for name, p in weights.items():
                    p.copy_(state[key][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.restore(state["sampler"])
        beta, start, curve = state["kl_coef"], state["iteration"], state["curve"]
        restore_rng(state["rng"])
        print(f"ppo: resuming after iteration {start} from {checkpoint_path(checkpoint_dir, start)}")
        if accelerator.is_main_process:  # this run's MLflow history starts where the checkpoint's ends
            for row in curve:
                log_step({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    progress = tqdm(total=params.iterations, initial=start, desc="ppo", disable=not accelerator.is_main_process)
    for iteration in range(start + 1, params.iterations + 1):
        tic = time.perf_counter()
        batch = rollout(models, params, sampler.next_batch(params.batch_size))
        mask = batch["mask"].float()
        rm_score = normalised(batch["raw_score"], models.reward_stats)
        score = rm_score - params.no_eos_penalty * (~batch["ended"]).float()
        rewards = token_rewards(score, batch["logp_old"], batch["logp_ref"], beta, mask)
        advantages, returns = gae(rewards, batch["values_old"], mask, params.gamma, params.lam)
        losses = ppo_update(models, params, optimizer, scheduler, trainable, batch, whiten(advantages, mask), returns)

        kl = float(kl_per_response(batch["logp_old"], batch["logp_ref"], mask).mean())  # nats per response
        elapsed = time.perf_counter() - tic
        n_tokens = int(mask.sum())
        row = {
            "iteration": iteration,
            "objective/rm_score": float(rm_score.mean()),
            "objective/score": float(score.mean()),
            "objective/kl": kl,
            "objective/kl_coef": beta,
            "objective/entropy": batch["entropy"],
            "objective/non_score_reward": float((rewards.sum(dim=1) - score).mean()),
            **losses,
            "value/explained_variance": explained_variance(batch["values_old"], returns, mask),
            "value/mean": float(masked_mean(batch["values_old"], mask)),
            "response/length": float(mask.sum(dim=1).mean()),
            "response/no_eos_fraction": float((~batch["ended"]).float().mean()),
            "perf/tokens_per_s": n_tokens / elapsed,
            "perf/generation_tokens_per_s": n_tokens / batch["generation_seconds"],
            "perf/iteration_seconds": elapsed,
            "lr": scheduler.get_last_lr()[0],
        }
        curve.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        if accelerator.is_main_process:
            log_step({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
        beta = adaptive_kl_coef(beta, kl, params.kl_target, params.kl_horizon, params.batch_size)
        progress.set_postfix(rm=f"{row['objective/rm_score']:.2f}", kl=f"{kl:.2f}", tok_s=f"{n_tokens / elapsed:.0f}")
        progress.update(1)
        if accelerator.is_main_process and (iteration % params.checkpoint_every == 0 or iteration == params.iterations):
            save_state(checkpoint_dir, {
                "iteration": iteration, "fingerprint": run_fingerprint,
                "policy": {n: p.detach().cpu().clone() for n, p in _trainable(policy).items()},
                "value": {n: p.detach().cpu().clone() for n, p in _trainable(value_model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "kl_coef": beta,
                "sampler": sampler.state(), "rng": rng_states(), "curve": curve,
            })
    progress.close()

    evaluation = evaluate(models, params, [heldout_prompts[i % len(heldout_prompts)] for i in range(params.eval_responses)])
    metrics = {
        "ppo/iterations": params.iterations,
        "ppo/resumed_from": start,
        "ppo/trainable_parameters": n_trainable,
        "ppo/total_parameters": n_total,
        "ppo/train_prompts": len(train_prompts),
        "ppo/final_kl_coef": round(beta, 6),
        "ppo/last_rm_score": curve[-1]["objective/rm_score"],
        "ppo/last_kl": curve[-1]["objective/kl"],
        "ppo/last_entropy": curve[-1]["objective/entropy"],
        "perf/tokens_per_s": round(sum(r["response/length"] for r in curve) * params.batch_size
                                   / sum(r["perf/iteration_seconds"] for r in curve), 2),
        **evaluation["metrics"],
    }
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(policy), tokenizer, out_dir, dtype)
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "curve": curve, "samples": evaluation["samples"]}


@torch.no_grad()
def evaluate(models: Models, params: PpoParams, prompts: list[str]) -> dict:
    """Held-out prompts, SFT policy (the reference) against the trained policy, drawing the same random stream:
    mean RM score (RM std units), KL per response, length and EOS rate."""
    acc, tok = models.accelerator, models.tokenizer
    policy = acc.unwrap_model(models.policy)
    policy.eval()

    def sampler_of(model, context):
        def sample(query, query_mask):
            with context():
                return sample_responses(model, query, query_mask, params.max_new_tokens, params.temperature,
                                        models.stop_ids, tok.pad_token_id)
        return sample

    def score(query, query_mask, responses, mask, ended):
        raw = score_responses(models.reward_model, query, query_mask, responses, mask, ended, models.suffix,
                              tok.pad_token_id)
        return normalised(raw, models.reward_stats)

    def kl(query, query_mask, responses, mask):
        logp = policy_forward(policy, query, query_mask, responses, mask, params.temperature)[0]
        logp_ref = reference_logprobs(acc, policy, models.reference, query, query_mask, responses, mask,
                                      params.temperature)
        return kl_per_response(logp, logp_ref, mask)

    if models.reference is not None:  # the SFT policy: the frozen copy, or the LoRA policy with its adapter off
        sample_sft = sampler_of(models.reference, contextlib.nullcontext)
    else:
        sample_sft = sampler_of(policy, policy.disable_adapter)
    sample_trained = sampler_of(policy if models.sampler is None else refreshed(models.sampler, policy),
                                contextlib.nullcontext)
    with acc.autocast():
        before = heldout_rollouts(prompts, tok, sample_sft, score, None, params.batch_size, params.max_prompt_len,
                                  params.seed + 1, acc.device)  # the SFT policy's KL to itself is 0
        after = heldout_rollouts(prompts, tok, sample_trained, score, kl, params.batch_size, params.max_prompt_len,
                                 params.seed + 1, acc.device)
    metrics = {
        "ppo/heldout_prompts": len(set(prompts)),
        "ppo/heldout_responses": len(prompts),
        "ppo/heldout_rm_score_before": round(before.mean("scores"), 4),
        "ppo/heldout_rm_score_after": round(after.mean("scores"), 4),
        "ppo/heldout_rm_score_gain": round(after.mean("scores") - before.mean("scores"), 4),
        "ppo/heldout_kl_per_response": round(after.mean("kl"), 4),
        "ppo/heldout_response_length_before": round(before.mean("lengths"), 2),
        "ppo/heldout_response_length_after": round(after.mean("lengths"), 2),
        "ppo/heldout_no_eos_fraction_before": round(1 - before.mean("ended"), 4),
        "ppo/heldout_no_eos_fraction_after": round(1 - after.mean("ended"), 4),
    }
    samples = [{"prompt": prompts[i], "before": before.texts[i], "before_score": round(before.scores[i], 3),
                "after": after.texts[i], "after_score": round(after.scores[i], 3)}
               for i in range(min(N_SAMPLES_SHOWN, len(prompts)))]
    return {"metrics": metrics, "samples": samples}


def main() -> int:
    params = load_params()
    p = params.ppo
    train_prompts, heldout = held_out_prompts(load_train_prompts(p.prompts), p.eval_responses, p.seed)
    inputs = [SFT_DIR, REWARD_DIR, TEST_COMPARISONS, TRAIN_COMPARISONS if p.prompts == "comparisons" else p.prompts]
    with tracking.stage_run("ppo", {"ppo": params.section("ppo"), "model.precision": params.model.precision}):
        result = train(p, params.model.precision, SFT_DIR, REWARD_DIR, train_prompts, heldout, POLICY_DIR,
                       CHECKPOINT_DIR, fingerprint("ppo", p, params.model.precision, inputs))
        if not PartialState().is_main_process:
            return 0  # under `accelerate launch` one process records and writes the outputs
        tracking.log_outputs("ppo", {"policy": POLICY_DIR})
        tracking.write_plot(PLOT, result["curve"])
        tracking.write_metrics(METRICS, result["metrics"])
        if mlflow.active_run() is not None:
            mlflow.log_dict(result["samples"], "ppo_samples.json")
    m = result["metrics"]
    for s in result["samples"]:
        print(f"\nprompt: {s['prompt']}\n  before ({s['before_score']:+.2f}): {s['before']}\n"
              f"  after  ({s['after_score']:+.2f}): {s['after']}")
    print(f"\nppo: held-out RM score {m['ppo/heldout_rm_score_before']:+.3f} -> {m['ppo/heldout_rm_score_after']:+.3f} "
          f"(RM std units; {m['ppo/heldout_responses']} responses to {m['ppo/heldout_prompts']} prompts), "
          f"KL {m['ppo/heldout_kl_per_response']:.2f} nats per response; wrote {POLICY_DIR}")
    return 0


if __name__ == "__main__":
    run_stage(main)
