"""PPO's equations and its value model (not a stage: rlhf.policy runs PPO when `policy.algorithm` is 'ppo').

Each iteration (Ziegler et al. 2019; Ouyang et al. 2022):
  1. sample one response per prompt for a batch of prompts (rlhf.rollouts);
  2. score each (rlhf.reward_sources: the RM in its standard deviations, the verifier, reward functions), minus
     `no_eos_penalty` when the response never emitted EOS;
  3. per-token reward r_t = −β·(log π − log π_ref)_t, plus the score on the response's last token (`token_rewards`);
  4. GAE(γ, λ) advantages (`gae`), whitened over the batch's response tokens (`whiten`);
  5. `update_epochs` passes of minibatch updates: clipped surrogate + c_V·clipped value loss − c_H·entropy,
     gradient-norm clipping;
  6. the adaptive controller moves β so that the KL per response approaches `kl_target` (`adaptive_kl_coef`).

The value function is a linear head on the policy's last hidden state, or a separate model initialised from the
reward model (`policy.value_model`): `build_value_model`. The critic-free optimisers (rlhf.objectives) share
`masked_mean`, `whiten`, `token_rewards`, `clipped_surrogate`, `approx_kl` and `adaptive_kl_coef` from here.
"""
from __future__ import annotations

import torch

from rlhf.models import add_lora, load_scalar_model
from rlhf.params import PolicyParams
from rlhf.rewards import TokenScorer
from rlhf.rollouts import mask_positions


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


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, eps: float) -> torch.Tensor:
    # min(ρA, clip(ρ, 1−ε, 1+ε)A) per token, ρ = exp(log π − log π_old)
    ratio = torch.exp(logp - logp_old)
    return torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, eps: float,
                        mask: torch.Tensor) -> torch.Tensor:
    # L = −E[min(ρA, clip(ρ, 1−ε, 1+ε)A)] over the valid tokens (PPO; RLOO and REINFORCE++ use it too)
    return -masked_mean(clipped_surrogate(logp, logp_old, advantages, eps), mask)


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


# ------------------------------------------------------------------------------------------------
# The value model
# ------------------------------------------------------------------------------------------------

def build_value_model(params: PolicyParams, reward_dir: str, dtype: torch.dtype, hidden_size: int) -> torch.nn.Module:
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


def value_forward(value_model, query, query_mask, responses, response_mask) -> torch.Tensor:
    """Per-token values of a separate value model (a TokenScorer, so DDP runs its forward), (B, N), at the
    positions that predict each response token."""
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = mask_positions(attention_mask)
    n = responses.size(1)
    return value_model(input_ids, attention_mask, position_ids)[:, -n - 1:-1]
