"""What an online policy optimiser maximises (`policy.reward`): the reward model, the verifier, users' reward
functions, or a weighted sum of them (not a stage; rlhf.policy and benchmarks/algorithms.py score with it).

Parts, each scored on its own and logged as `reward/<part>` (the mean over the responses it scores):
  rm               the reward model's score in its standard deviations, (R − mean)/std (rlhf.rewards)
  verifier         1 for a correct answer to a verifiable task, 0 for any other (rlhf.verifiers.verifier_reward);
                   it scores only prompts made from a task, and has no term for an open-ended prompt
  module:function  reward(prompts, responses, metadata) -> one number per response (rlhf.verifiers'
                   load_reward_function); metadata[i] is the task record of a verifiable prompt, {} otherwise

The reward of a response is R = Σ_k w_k·r_k over the parts that score its prompt (`weighted_reward`): an
open-ended prompt's reward is the weighted sum of its other parts, without a verifier term (not a zero one). A
prompt that no part scores (the verifier alone, an open-ended prompt) would carry no signal; the policy stage
leaves such prompts out of its training pool and counts them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rlhf.rewards import normalised, score_responses
from rlhf.verifiers import load_reward_function, verifier_reward

RM, VERIFIER = "rm", "verifier"


def weighted_reward(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    # R = Σ_k w_k·r_k over the parts that score the response; a part that does not score it is NaN there and adds
    # nothing. A response no part scores gets R = 0.
    total = None
    for name, values in parts.items():
        term = torch.where(torch.isnan(values), torch.zeros_like(values), weights[name] * values)
        total = term if total is None else total + term
    return total


def scores_prompt(weights: Mapping[str, float], has_task: bool) -> bool:
    """Whether some part of the reward scores a prompt: every part but the verifier scores every prompt."""
    return has_task or any(part != VERIFIER for part in weights)


class RewardSources:
    """The parts of `policy.reward`, ready to score batches of responses.

    `reward_model` and `reward_stats` are needed when 'rm' is a part (None otherwise); `suffix` is the chat
    template's closing tokens after an EOS, as the RM was trained to read a finished reply."""

    def __init__(self, weights: Mapping[str, float], reward_model=None, reward_stats: dict | None = None,
                 suffix: Sequence[int] = (), setting: str = "policy.reward"):
        self.weights = dict(weights)
        if RM in self.weights and reward_model is None:
            raise ValueError("the reward names 'rm' but no reward model was given; load it with rlhf.rewards.load_reward_model")
        self.reward_model, self.reward_stats, self.suffix = reward_model, reward_stats, list(suffix)
        self.functions = {name: load_reward_function(name, f"params.yaml: `{setting}` part '{name}'")
                          for name in self.weights if name not in (RM, VERIFIER)}

    @property
    def needs_text(self) -> bool:
        return any(name != RM for name in self.weights)

    @torch.no_grad()
    def rm_scores(self, query, query_mask, responses, mask, ended, pad_id: int) -> torch.Tensor:
        """The RM part: the reward model's score in its standard deviations, (R − mean)/std, (B,) fp32."""
        raw = score_responses(self.reward_model, query, query_mask, responses, mask, ended, self.suffix, pad_id)
        return normalised(raw, self.reward_stats).float()

    @torch.no_grad()
    def score(self, query, query_mask, responses, mask, ended, pad_id: int, prompts: Sequence[str],
              texts: Sequence[str] | None, tasks: Mapping[str, dict]) -> dict[str, torch.Tensor]:
        """Each part's scores (B,) fp32 on the responses' device, NaN where the part does not score the prompt.
        `texts` are the decoded responses (needed by every part but 'rm'); `tasks` maps a verifiable prompt to its
        task record (rlhf.verifiers.Task.to_dict())."""
        device = responses.device
        parts = {}
        for name in self.weights:
            if name == RM:
                parts[name] = self.rm_scores(query, query_mask, responses, mask, ended, pad_id)
            elif name == VERIFIER:
                rows = [i for i, p in enumerate(prompts) if p in tasks]
                values = torch.full((len(prompts),), math.nan)
                if rows:
                    values[rows] = torch.tensor(verifier_reward([prompts[i] for i in rows], [texts[i] for i in rows],
                                                                [tasks[prompts[i]] for i in rows]))
                parts[name] = values.to(device)
            else:
                values = self.functions[name](list(prompts), list(texts), [tasks.get(p, {}) for p in prompts])
                parts[name] = torch.tensor(values, dtype=torch.float32, device=device)
        return parts


def part_means(parts: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """`reward/<part>`: each part's mean over the responses it scored; a part that scored none of them is left out."""
    out = {}
    for name, values in parts.items():
        scored = values[~torch.isnan(values)]
        if scored.numel():
            out[f"reward/{name}"] = float(scored.mean())
    return out
