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
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import extract_model_from_parallel, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

from rlhf import tracking
from rlhf.comparisons import read_comparisons
from rlhf.models import (ATTENTION, adapter_inputs_uncast, add_lora, compute_dtype, count_parameters,
                         load_causal_lm, load_tokenizer, resolve_precision, save_checkpoint, without_peft)
from rlhf.params import EMBEDDED_PROMPTS, ParamError, PpoParams, load_params
from rlhf.reward_model import TokenScorer, load_reward_model, pad_right, rewards

SFT_DIR = "models/sft"
REWARD_DIR = "models/reward"
TRAIN_COMPARISONS = "data/comparisons/train.parquet"
TEST_COMPARISONS = "data/comparisons/test.parquet"
OUT_DIR = "models/ppo"
CHECKPOINT_DIR = "checkpoints/ppo"
METRICS = "metrics/ppo.json"
PLOT = "plots/ppo.csv"
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


def token_entropy(logp_all: torch.Tensor) -> torch.Tensor:
    # H(π(·|s_t)) = −Σ_a π(a|s_t) log π(a|s_t), from the log-probabilities over the vocabulary (..., V)
    return -(logp_all.exp() * logp_all).sum(dim=-1)


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


def token_logprobs(logp_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # log π(a_t|s_t) of the taken tokens (...,), from the log-probabilities over the vocabulary (..., V)
    return torch.gather(logp_all, -1, tokens.unsqueeze(-1)).squeeze(-1)


class LinearLogprobEntropy(torch.autograd.Function):
    """`token_logprobs` and `token_entropy` of π = softmax(z), z = h·Wᵀ/τ, for hidden states h (T, H), the LM
    head W (V, H) and the taken tokens (T,), `chunk` rows at a time. The (T, V) fp32 log-probabilities (150 MB
    for 8 responses × 96 tokens with a 49,152 vocabulary) only ever exist a chunk at a time: backward makes
    each chunk's logits again from h and applies
        ∂ log π(y)/∂z = onehot(y) − π,        ∂H/∂z = −π ⊙ (log π + H)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, chunk: int):
        logp = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        for s in range(0, hidden.size(0), chunk):
            logp_all = _chunk_logprobs(hidden[s:s + chunk], weight, temperature)
            logp[s:s + chunk] = token_logprobs(logp_all, tokens[s:s + chunk])
            entropy[s:s + chunk] = token_entropy(logp_all)
        ctx.save_for_backward(hidden, weight, tokens, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, entropy = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for s in range(0, hidden.size(0), ctx.chunk):
            h, y = hidden[s:s + ctx.chunk], tokens[s:s + ctx.chunk]
            g_logp, g_entropy = grad_logp[s:s + ctx.chunk, None], grad_entropy[s:s + ctx.chunk, None]
            logp_all = _chunk_logprobs(h, weight, ctx.temperature)
            probs = logp_all.exp()
            # ∂L/∂z = g_logp·(onehot(y) − π) − g_H·π⊙(log π + H), built in place in logp_all's memory
            grad_z = logp_all.add_(entropy[s:s + ctx.chunk, None]).mul_(g_entropy).add_(g_logp).mul_(probs).neg_()
            grad_z[torch.arange(y.size(0), device=y.device), y] += g_logp[:, 0]
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(hidden.dtype)
            if want_hidden:
                grad_hidden[s:s + ctx.chunk] = grad_z @ weight
            if want_weight:
                grad_weight += (grad_z.T @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.log_softmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

def distinct_prompts(path: str | Path) -> list[str]:
    """The distinct prompts of a comparisons file, in order of first appearance."""
    return list(dict.fromkeys(read_comparisons(path)["prompt"]))


def load_train_prompts(source: str) -> list[str]:
    if source == "comparisons":
        return distinct_prompts(TRAIN_COMPARISONS)
    if source == EMBEDDED_PROMPTS:
        text = resources.files("rlhf.data").joinpath("prompts.jsonl").read_text(encoding="utf-8")
        return list(dict.fromkeys(json.loads(line)["prompt"] for line in text.splitlines() if line.strip()))
    path = Path(source)
    if not path.exists() or path.suffix not in (".jsonl", ".parquet"):
        raise ParamError(
            f"params.yaml: ppo.prompts is '{source}', which is neither '{EMBEDDED_PROMPTS}', 'comparisons' nor an existing "
            ".jsonl/.parquet file. Use '{EMBEDDED_PROMPTS}' (the project's prompt pool), 'comparisons' (the prompts of the "
            "comparisons' train split) or a file with a `prompt` column."
        )
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    if "prompt" not in frame.columns:
        raise ParamError(f"{path} has no `prompt` column (it has: {', '.join(map(str, frame.columns))}). Rename the column.")
    return list(dict.fromkeys(p for p in frame["prompt"] if isinstance(p, str) and p.strip()))


class PromptSampler:
    """Batches of prompts: a seeded shuffle, dealt out in order, reshuffled when used up."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.rng, self.queue = prompts, random.Random(seed), []

    def next_batch(self, n: int) -> list[str]:
        batch = []
        while len(batch) < n:
            if not self.queue:
                self.queue = list(range(len(self.prompts)))
                self.rng.shuffle(self.queue)
            batch.append(self.prompts[self.queue.pop()])
        return batch

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "queue": list(self.queue)}

    def restore(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.queue = list(state["queue"])


def encode_prompt(tokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """The prompt in the chat template, ready for the assistant's turn; a long one loses its beginning."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_len:]


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, width - len(s):] = torch.tensor(s)
        attention_mask[row, width - len(s):] = 1
    return input_ids, attention_mask


def reply_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after an assistant reply's EOS (ChatML: the newline)."""
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], tokenize=False)
    tail = full[len(prompt) + 1:]  # after the reply "y"
    eos = tokenizer.eos_token
    return tokenizer(tail[len(eos):], add_special_tokens=False)["input_ids"] if tail.startswith(eos) else []


# ------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def lora_merged(model):
    """The LoRA update folded into the base weights while inside, so generation runs plain bf16 linears; the
    base weights are copied back after, bit-exact (peft's unmerge_adapter in bf16 leaves rounding drift)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.get_base_layer().weight.copy_(weight)
                layer.merged_adapters = []


def build_sampler(sft_dir: str, dtype: torch.dtype, params: PpoParams) -> torch.nn.Module | None:
    """Full fine-tuning in bf16: a frozen copy of the policy in `dtype` that generates the rollouts, its weights
    refreshed from the fp32 master weights before each (`refreshed`). Generating from the fp32 policy under
    autocast would cast every weight at every decoding step. None with LoRA (see `lora_merged`) or in fp32."""
    if params.uses_lora or dtype == torch.float32:
        return None
    return load_causal_lm(sft_dir, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def refreshed(sampler: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module:
    """`sampler` holding `policy`'s current weights, rounded to its dtype."""
    for target, source in zip(sampler.parameters(), policy.parameters(), strict=True):
        target.copy_(source)
    return sampler


def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row of logits (B, V) from softmax(logits / τ): the CDF inverted at a uniform draw, one
    random number a row (torch.multinomial draws V exponentials a row, 6 ms a step at batch 8). The CDF is
    summed in fp64, so each token's chance is its probability to within ~1e-16."""
    logits = logits.float()
    probs = (logits / temperature if temperature != 1.0 else logits).softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    draw = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # position ids that follow the attention mask: a left-padded row starts at 0 where its tokens start
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def cut_at_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """(responses with padding after the first EOS, mask over the tokens up to and including it, ended (B,)):
    `ended` is False where no EOS came."""
    is_eos = responses == eos_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), responses.size(1) - 1)
    mask = (torch.arange(responses.size(1), device=responses.device) <= first_eos.unsqueeze(1)).long()
    return responses.masked_fill(mask == 0, pad_id), mask, ended


@torch.no_grad()
def sample_responses(model, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
                     eos_id: int, pad_id: int):
    """Sample one response per left-padded query from the full tempered distribution, batched, one forward
    pass a token over the KV cache, until every row has an EOS or `max_new_tokens`: `cut_at_eos`'s
    (responses (B, N), response_mask (B, N), ended (B,)). Position ids follow the attention mask, as in
    `policy_forward`."""
    positions = mask_positions(query_mask)
    out = model(input_ids=query, attention_mask=query_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    attention_mask, next_position = query_mask, positions[:, -1:] + 1
    tokens, ended = [], torch.zeros(query.size(0), dtype=torch.bool, device=query.device)
    while True:
        token = sample_tokens(out.logits[:, -1], temperature).masked_fill_(ended, pad_id)
        tokens.append(token)
        ended |= token == eos_id
        if ended.all() or len(tokens) == max_new_tokens:
            return cut_at_eos(torch.stack(tokens, dim=1), eos_id, pad_id)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        next_position = next_position + 1


LOGIT_CHUNK_TOKENS = 128  # rows of (T, V) logits at a time in LinearLogprobEntropy: 25 MB fp32 each


def policy_forward(model, query, query_mask, responses, response_mask, temperature: float):
    """log π(y_t|s_t) and the entropy H(π(·|s_t)) at the response positions, (B, N) fp32, and the last hidden
    state there, (B, N, H). π is the model's next-token distribution at temperature τ.

    The model runs its layers only (it keeps the logits of no position) and `LinearLogprobEntropy` applies the
    LM head, so the (B, N, V) logits are never held. Position ids follow the attention mask, as in generation
    with left-padded queries.
    """
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = mask_positions(attention_mask)
    no_position = torch.empty(0, dtype=torch.long, device=input_ids.device)
    with adapter_inputs_uncast(model, input_ids.device.type):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=-1, logits_to_keep=no_position)
    n = responses.size(1)
    hidden = out.hidden_states[-1][:, -n - 1:-1]  # position t predicts response token t
    head = without_peft(extract_model_from_parallel(model)).get_output_embeddings().weight
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = LinearLogprobEntropy.apply(hidden.reshape(-1, hidden.size(-1)).to(dtype), head.to(dtype),
                                                   responses.reshape(-1), temperature, LOGIT_CHUNK_TOKENS)
    return logp.view(responses.shape), entropy.view(responses.shape), hidden


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
    model = AutoModelForSequenceClassification.from_pretrained(
        reward_dir, dtype=dtype if params.uses_lora else torch.float32, attn_implementation=ATTENTION)
    if not params.uses_lora:
        return TokenScorer(model)
    return TokenScorer(add_lora(model, params.lora_r, params.lora_alpha, 0.0, task_type="SEQ_CLS"))


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def fingerprint(params: PpoParams, precision: str, inputs: list[str | Path]) -> str:
    """What a checkpoint must match to be resumed: the ppo params, the precision and the inputs' DVC hashes."""
    spec = {"ppo": asdict(params), "precision": precision,
            "inputs": {str(p): tracking.dvc_md5(p) for p in inputs if Path(p).exists()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return folder / f"iter-{iteration:06d}.pt"


def save_state(folder: Path, state: dict) -> Path:
    """One file per checkpoint, written to a temporary name and renamed; older ones are removed after."""
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, state["iteration"])
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in folder.glob("iter-*.pt"):
        if old != path:
            old.unlink()
    return path


def load_latest_state(folder: Path, expected_fingerprint: str) -> dict | None:
    """The newest checkpoint made with the same params and inputs; stale ones are removed, with a note."""
    paths = sorted(folder.glob("iter-*.pt"))
    if not paths:
        return None
    state = torch.load(paths[-1], map_location="cpu", weights_only=False)
    if state.get("fingerprint") != expected_fingerprint:
        print(f"ppo: {paths[-1]} was made with other params or inputs; starting from scratch and removing it.")
        for p in paths:
            p.unlink()
        return None
    return state


def _rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
    sampler: torch.nn.Module | None = None  # full fine-tuning in bf16: the rollouts' bf16 copy of the policy

    def normalised(self, raw_score: torch.Tensor) -> torch.Tensor:
        # the RM score in standard deviations of its training rewards: (R − mean) / std
        return (raw_score - self.reward_stats["mean"]) / self.reward_stats["std"]

    def values(self, hidden, query, query_mask, responses, response_mask) -> torch.Tensor:
        if isinstance(self.accelerator.unwrap_model(self.value_model), torch.nn.Linear):  # a head on the policy's hidden state
            return self.value_model(hidden.float()).squeeze(-1)
        return value_forward(self.value_model, query, query_mask, responses, response_mask)


def encode_queries(models: Models, prompts: list[str], max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [encode_prompt(models.tokenizer, p, max_prompt_len) for p in prompts]
    query, query_mask = pad_left(ids, models.tokenizer.pad_token_id)
    return query.to(models.accelerator.device), query_mask.to(models.accelerator.device)


@torch.no_grad()
def rollout(models: Models, params: PpoParams, prompts: list[str]) -> dict:
    """Sample one response per prompt and everything PPO holds fixed while it updates on them."""
    acc, tok = models.accelerator, models.tokenizer
    query, query_mask = encode_queries(models, prompts, params.max_prompt_len)
    models.policy.eval()
    tic = time.perf_counter()
    policy = acc.unwrap_model(models.policy)
    # no autocast: every weight generation touches is in the compute dtype already (LoRA merged into the
    # bf16 base, or the sampler copy), where autocast's per-step weight casts would cost ~1/3 of the time
    generator = policy if models.sampler is None else refreshed(models.sampler, policy)
    with lora_merged(policy):
        responses, mask, ended = sample_responses(generator, query, query_mask, params.max_new_tokens,
                                                  params.temperature, tok.eos_token_id, tok.pad_token_id)
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
    sampler_copy = build_sampler(str(sft_dir), dtype, params)
    if sampler_copy is not None:
        sampler_copy.to(accelerator.device)
    models = Models(accelerator, policy, reference, value_model, reward_model, reward_stats, tokenizer,
                    reply_suffix(tokenizer), sampler_copy)
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
        _restore_rng(state["rng"])
        print(f"ppo: resuming after iteration {start} from {checkpoint_path(checkpoint_dir, start)}")
        if accelerator.is_main_process:  # this run's MLflow history starts where the checkpoint's ends
            for row in curve:
                _log({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    progress = tqdm(total=params.iterations, initial=start, desc="ppo", disable=not accelerator.is_main_process)
    for iteration in range(start + 1, params.iterations + 1):
        tic = time.perf_counter()
        batch = rollout(models, params, sampler.next_batch(params.batch_size))
        mask = batch["mask"].float()
        rm_score = models.normalised(batch["raw_score"])
        score = rm_score - params.no_eos_penalty * (~batch["ended"]).float()
        rewards = token_rewards(score, batch["logp_old"], batch["logp_ref"], beta, mask)
        advantages, returns = gae(rewards, batch["values_old"], mask, params.gamma, params.lam)
        losses = ppo_update(models, params, optimizer, scheduler, trainable, batch, whiten(advantages, mask), returns)

        kl = float(((batch["logp_old"] - batch["logp_ref"]) * mask).sum(dim=1).mean())  # nats per response
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
            _log({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
        beta = adaptive_kl_coef(beta, kl, params.kl_target, params.kl_horizon, params.batch_size)
        progress.set_postfix(rm=f"{row['objective/rm_score']:.2f}", kl=f"{kl:.2f}", tok_s=f"{n_tokens / elapsed:.0f}")
        progress.update(1)
        if accelerator.is_main_process and (iteration % params.checkpoint_every == 0 or iteration == params.iterations):
            save_state(checkpoint_dir, {
                "iteration": iteration, "fingerprint": run_fingerprint,
                "policy": {n: p.detach().cpu().clone() for n, p in _trainable(policy).items()},
                "value": {n: p.detach().cpu().clone() for n, p in _trainable(value_model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "kl_coef": beta,
                "sampler": sampler.state(), "rng": _rng_states(), "curve": curve,
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
    results = {}
    for when in ("before", "after"):
        torch.manual_seed(params.seed + 1)
        scores, kls, lengths, ended_all, texts = [], [], [], [], []
        for s in range(0, len(prompts), params.batch_size):
            query, query_mask = encode_queries(models, prompts[s:s + params.batch_size], params.max_prompt_len)
            if when == "before":  # the SFT policy: the frozen copy, or the LoRA policy with its adapter off
                model = models.reference if models.reference is not None else policy
                context = policy.disable_adapter() if models.reference is None else contextlib.nullcontext()
            else:
                model = policy if models.sampler is None else refreshed(models.sampler, policy)
                context = contextlib.nullcontext()
            with acc.autocast():
                with context:
                    responses, mask, ended = sample_responses(model, query, query_mask, params.max_new_tokens,
                                                              params.temperature, tok.eos_token_id, tok.pad_token_id)
                raw = score_responses(models.reward_model, query, query_mask, responses, mask, ended, models.suffix,
                                      tok.pad_token_id)
                if when == "after":  # the SFT policy's KL to itself is 0
                    logp = policy_forward(policy, query, query_mask, responses, mask, params.temperature)[0]
                    logp_ref = reference_logprobs(acc, policy, models.reference, query, query_mask, responses, mask,
                                                  params.temperature)
                    kls.append(((logp - logp_ref) * mask).sum(dim=1).float().cpu())
            scores.append(models.normalised(raw).cpu())
            lengths.append(mask.sum(dim=1).float().cpu())
            ended_all.append(ended.cpu())
            texts += [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
        results[when] = {"score": torch.cat(scores), "length": torch.cat(lengths), "ended": torch.cat(ended_all),
                         "kl": torch.cat(kls) if kls else torch.zeros(len(prompts)), "texts": texts}
    before, after = results["before"], results["after"]
    metrics = {
        "ppo/heldout_prompts": len(set(prompts)),
        "ppo/heldout_responses": len(prompts),
        "ppo/heldout_rm_score_before": round(float(before["score"].mean()), 4),
        "ppo/heldout_rm_score_after": round(float(after["score"].mean()), 4),
        "ppo/heldout_rm_score_gain": round(float(after["score"].mean() - before["score"].mean()), 4),
        "ppo/heldout_kl_per_response": round(float(after["kl"].mean()), 4),
        "ppo/heldout_response_length_before": round(float(before["length"].mean()), 2),
        "ppo/heldout_response_length_after": round(float(after["length"].mean()), 2),
        "ppo/heldout_no_eos_fraction_before": round(float((~before["ended"]).float().mean()), 4),
        "ppo/heldout_no_eos_fraction_after": round(float((~after["ended"]).float().mean()), 4),
    }
    samples = [{"prompt": prompts[i], "before": before["texts"][i], "before_score": round(float(before["score"][i]), 3),
                "after": after["texts"][i], "after_score": round(float(after["score"][i]), 3)}
               for i in range(min(N_SAMPLES_SHOWN, len(prompts)))]
    return {"metrics": metrics, "samples": samples}


def _log(metrics: dict, step: int) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=step)


def held_out_prompts(train_prompts: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts without any test prompt, up to n test prompts in a seeded order)."""
    test = distinct_prompts(TEST_COMPARISONS)
    test_set = set(test)
    random.Random(seed).shuffle(test)
    return [p for p in train_prompts if p not in test_set], test[:n]


def main() -> int:
    params = load_params()
    p = params.ppo
    train_prompts, heldout = held_out_prompts(load_train_prompts(p.prompts), p.eval_responses, p.seed)
    inputs = [SFT_DIR, REWARD_DIR, TEST_COMPARISONS, TRAIN_COMPARISONS if p.prompts == "comparisons" else p.prompts]
    with tracking.stage_run("ppo", {"ppo": params.section("ppo"), "model.precision": params.model.precision}):
        result = train(p, params.model.precision, SFT_DIR, REWARD_DIR, train_prompts, heldout, OUT_DIR,
                       CHECKPOINT_DIR, fingerprint(p, params.model.precision, inputs))
        if not PartialState().is_main_process:
            return 0  # under `accelerate launch` one process records and writes the outputs
        tracking.log_outputs("ppo", {"ppo": OUT_DIR})
        tracking.write_plot(PLOT, result["curve"])
        tracking.write_metrics(METRICS, result["metrics"])
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_dict(result["samples"], "ppo_samples.json")
    m = result["metrics"]
    for s in result["samples"]:
        print(f"\nprompt: {s['prompt']}\n  before ({s['before_score']:+.2f}): {s['before']}\n"
              f"  after  ({s['after_score']:+.2f}): {s['after']}")
    print(f"\nppo: held-out RM score {m['ppo/heldout_rm_score_before']:+.3f} -> {m['ppo/heldout_rm_score_after']:+.3f} "
          f"(RM std units; {m['ppo/heldout_responses']} responses to {m['ppo/heldout_prompts']} prompts), "
          f"KL {m['ppo/heldout_kl_per_response']:.2f} nats per response; wrote {OUT_DIR}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import run_stage

    run_stage(main)
