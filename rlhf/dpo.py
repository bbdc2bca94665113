"""DPO's and IPO's equations, and the preference pairs they learn from (not a stage: rlhf.policy runs DPO when
`policy.algorithm` is 'dpo').

DPO (Rafailov et al. 2023) trains the policy on the validated comparisons directly, with no reward model and no
sampling. With h = (log π(y₊) − log π_ref(y₊)) − (log π(y₋) − log π_ref(y₋)), the log-ratio margin of the chosen
response over the rejected one (log π(y) summed over the response's tokens):

    DPO:  L = −log σ(β·h)              IPO (Azar et al. 2023):  L = (h − 1/(2β))²

β·(log π(y) − log π_ref(y)) is the policy's implicit reward of y; its chosen-minus-rejected difference, β·h, is
the margin logged beside the loss. The reference is the SFT model (with LoRA: the policy with its adapter off).
A tie says neither response is better, so it has no place in a pairwise loss: ties are left out and counted.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from rlhf.chat import prompt_and_reply_ids
from rlhf.comparisons import Pair
from rlhf.rewards import pad_right
from rlhf.rollouts import pad_left


# ------------------------------------------------------------------------------------------------
# The equations
# ------------------------------------------------------------------------------------------------

def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response's tokens.  (B, N) -> (B,)
    return (logp * mask).sum(dim=1)


def logratio_margin(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor) -> torch.Tensor:
    # h = (log π(y₊) − log π_ref(y₊)) − (log π(y₋) − log π_ref(y₋))
    return (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)


def dpo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    # L = −log σ(β·h), mean over pairs; log 2 where the policy is the reference (h = 0)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    # L = (h − 1/(2β))², mean over pairs: h is pulled to the margin 1/(2β), never past it
    return ((margin - 1 / (2 * beta)) ** 2).mean()


# ------------------------------------------------------------------------------------------------
# Pairs and their token ids
# ------------------------------------------------------------------------------------------------

def response_ids(tokenizer, prompt: str, response: str, suffix: list[int], max_tokens: int) -> list[int]:
    """The response's tokens as the policy samples them: the reply and its EOS, without the template's closing
    tokens after the EOS, at most `max_tokens` (a longer one loses its end)."""
    ids = prompt_and_reply_ids(tokenizer, prompt, response)[1]
    if suffix and ids[-len(suffix):] == suffix:
        ids = ids[:-len(suffix)]
    return ids[:max_tokens]


def encode_pair(tokenizer, pair: Pair, suffix: list[int], max_prompt_len: int,
                max_response_len: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen response ids, rejected response ids); a long prompt loses its beginning."""
    prompt = prompt_and_reply_ids(tokenizer, pair.prompt, pair.chosen)[0][-max_prompt_len:]
    return (prompt, response_ids(tokenizer, pair.prompt, pair.chosen, suffix, max_response_len),
            response_ids(tokenizer, pair.prompt, pair.rejected, suffix, max_response_len))


def pair_batch(encoded: list[tuple[list[int], list[int], list[int]]], pad_id: int, device):
    """The chosen responses' rows, then the rejected ones', for one forward pass: (query, query_mask) left-padded
    and (responses, response_mask) right-padded, each (2B, ·), as rlhf.rollouts.policy_forward takes them."""
    prompts = [p for p, _, _ in encoded] * 2
    replies = [c for _, c, _ in encoded] + [r for _, _, r in encoded]
    query, query_mask = pad_left(prompts, pad_id)
    responses, mask = pad_right(replies, pad_id)
    return query.to(device), query_mask.to(device), responses.to(device), mask.to(device)
