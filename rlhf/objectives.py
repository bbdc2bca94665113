"""The critic-free policy optimisers' equations: GRPO and Dr. GRPO, RLOO, REINFORCE++ (not a stage: rlhf.policy
runs them when `policy.algorithm` is 'grpo', 'rloo' or 'reinforce_pp').

None of them trains a value model. Each turns the scores of a batch of sampled responses into per-token advantages,
then takes PPO's clipped-ratio step on them (rlhf.ppo.clipped_policy_loss: RLOO and REINFORCE++ average it over
every token of the minibatch; GRPO aggregates it as below):

- GRPO (Shao et al. 2024, DeepSeekMath): G responses per prompt; each response's advantage is its reward relative
  to its group, Â_i = (r_i − mean(r)) / std(r), on every one of its tokens; the loss averages tokens within a
  response, then responses; the KL to the reference is a loss term β·k3 per token, or −β·KL in the reward.
- Dr. GRPO (Liu et al. 2025): Â_i = r_i − mean(r) (no std: a group of near-equal rewards is not magnified), and
  the loss sums every token and divides by a constant (max_new_tokens), so a response's length does not change
  the weight of its tokens.
- RLOO (Ahmadian et al. 2024): k responses per prompt; r_i = score_i − β·KL_i, and the baseline of each is the
  mean reward of the other k − 1.
- REINFORCE++ (Hu 2025): PPO's per-token reward (−β·KL on each token, the score on the last), its return to go
  as the advantage, normalised over the whole batch's tokens instead of a value model's baseline.

A batch holds the group_size responses of a prompt as consecutive rows.
"""
from __future__ import annotations

import torch

from rlhf.ppo import clipped_surrogate, token_rewards, whiten

GROUP_STD_EPS = 1e-6  # keeps (r − mean)/std finite when a group's rewards are all equal (then every Â is 0)


# ------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True) -> torch.Tensor:
    # GRPO: Â_i = (r_i − mean_g r) / (std_g r + ε) over the G responses of the prompt (std with Bessel's correction);
    # Dr. GRPO (scale_by_std=False): Â_i = r_i − mean_g r.  (B,) -> (B,)
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + GROUP_STD_EPS)
    return centred.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    # RLOO: A_i = r_i − (1/(k−1))·Σ_{j≠i} r_j over the k responses of the prompt.  (B,) -> (B,)
    groups = rewards.view(-1, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a response's advantage on each of its tokens: A_{i,t} = A_i·mask_{i,t}.  (B,) -> (B, N)
    return advantages.unsqueeze(1) * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    # G_t = r_t + γ·G_{t+1} over a response's tokens, 0 after its last.  (B, N) -> (B, N)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, beta: float,
                            gamma: float, mask: torch.Tensor) -> torch.Tensor:
    # REINFORCE++: r_t = −β·(log π − log π_ref)_t, plus the score on the last token; A_t = G_t, whitened over every
    # valid token of the batch: Â = (A − mean)/std.  score (B,), the rest (B, N) -> (B, N)
    return whiten(returns_to_go(token_rewards(score, logp, logp_ref, beta, mask), mask, gamma), mask)


# ------------------------------------------------------------------------------------------------
# The KL term and how a loss is averaged
# ------------------------------------------------------------------------------------------------

def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    # KL(π‖π_ref) per token by Schulman's k3: π_ref/π − log(π_ref/π) − 1 — never negative, unbiased for samples of π
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (1/B)·Σ_i (1/|o_i|)·Σ_t x_{i,t}: tokens averaged within a response, then responses averaged (GRPO)
    per_response = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_response.mean()


def token_sum_norm(x: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    # (1/(B·L))·Σ_i Σ_t x_{i,t}, L = max_new_tokens: every token weighs the same whatever its response's length (Dr. GRPO)
    return (x * mask).sum() / (x.size(0) * max_tokens)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor, eps: float,
              mask: torch.Tensor, dr_grpo: bool, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's two loss terms, (policy term, KL term); the loss is policy term + β·KL term (β = 0 when the KL is in
    the reward instead):

        policy term = −agg[min(ρÂ, clip(ρ, 1−ε, 1+ε)Â)],   KL term = agg[k3(π, π_ref)]

    agg = sequence_mean (GRPO) or token_sum_norm over max_tokens (Dr. GRPO)."""
    def aggregate(x):
        return token_sum_norm(x, mask, max_tokens) if dr_grpo else sequence_mean(x, mask)

    return -aggregate(clipped_surrogate(logp, logp_old, advantages, eps)), aggregate(k3_kl(logp, logp_ref))
