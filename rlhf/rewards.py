"""What a response is worth to the reward model: the scalar head's output at its last token.

R(prompt, response) is read from a checkpoint of the `reward_model` stage; the statistics stored with it put
scores in RM standard deviations, (R − mean) / std. PPO's value model reads the same head at every token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf.models import adapter_inputs_uncast, load_scalar_model, without_peft
from rlhf.params import ParamError

NORMALIZATION_KEY = "reward_normalization"  # config.json entry: {"mean", "std", "responses"}


def reward_at_last_token(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """R = the head's output at the last position whose attention mask is 1. (B, T) -> (B,)

    The rightmost attended position, so it holds for right and left padding alike.
    """
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask).argmax(dim=1)
    return scores[torch.arange(scores.size(0), device=scores.device), last]


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head at every position, (B, T) in fp32; PPO reads these as per-token values."""
    inner = without_peft(model)
    backbone = getattr(inner, inner.base_model_prefix)
    with adapter_inputs_uncast(model, input_ids.device.type):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return reward_at_last_token(token_scores(model, input_ids, attention_mask), attention_mask)


class TokenScorer(torch.nn.Module):
    """`token_scores` as a module's forward, for training under DDP.

    DDP all-reduces gradients only of passes through its own forward; `token_scores` on the wrapped model
    would bypass it, so it wraps this module instead.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        return token_scores(self.model, input_ids, attention_mask, position_ids)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, (B, T), padded on the right."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, :len(s)] = torch.tensor(s)
        attention_mask[row, :len(s)] = 1
    return input_ids, attention_mask


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, dict]:
    """A checkpoint of this stage and its reward normalisation {"mean", "std", "responses"}."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no reward model at {path} (config.json is missing). Run `dvc repro reward_model`.")
    model = load_scalar_model(path, dtype)
    if model.config.num_labels != 1:
        raise ParamError(
            f"{path} has num_labels={model.config.num_labels}, but a reward model gives one scalar per response. "
            "Train it with this stage (`dvc repro reward_model`), or load a classifier with num_labels=1."
        )
    stats = getattr(model.config, NORMALIZATION_KEY, None)
    if not stats:
        raise ParamError(
            f"{path}/config.json has no `{NORMALIZATION_KEY}`, so PPO cannot put its rewards in standard units. "
            "Retrain it with `dvc repro reward_model`, which stores the statistics of the training rewards there."
        )
    if not stats.get("std", 0) > 0:
        raise ParamError(
            f"{path}/config.json: `{NORMALIZATION_KEY}` has std {stats.get('std')!r}, so every training response got the "
            "same reward and PPO cannot normalise by it. The reward model learned nothing; check its comparisons and "
            "retrain it with `dvc repro reward_model`."
        )
    return model, stats


def normalised(raw: torch.Tensor, stats: dict) -> torch.Tensor:
    # the RM score in standard deviations of its training rewards: (R − mean) / std
    return (raw - stats["mean"]) / stats["std"]


@torch.no_grad()
def score_responses(reward_model, query, query_mask, responses, response_mask, ended, suffix: list[int],
                    pad_id: int) -> torch.Tensor:
    """Raw RM scores (B,) of prompt + response in the chat template, as the RM was trained to read them.

    A response that ended gets the template's closing tokens after its EOS; one that did not is scored
    as it stands (unfinished), and PPO adds the no-EOS penalty.
    """
    rows = []
    for q, qm, r, rm, done in zip(query, query_mask, responses, response_mask, ended):
        rows.append(q[qm.bool()].tolist() + r[rm.bool()].tolist() + (suffix if done else []))
    input_ids, attention_mask = pad_right(rows, pad_id)
    device = query.device
    return rewards(reward_model, input_ids.to(device), attention_mask.to(device)).float()
