"""Rollouts: the one decoding loop every stage samples with, and the log-probabilities of what it sampled.

- `sample_responses`: left-padded queries, one forward pass a token over the KV cache, until every row has
  ended or `max_new_tokens`; `sample_tokens` draws from the tempered distribution, optionally cut to its top-k
  and nucleus (top-p) as transformers' sampling does. collect, the policy stage and evaluate sample with it;
  the model server keeps a loop of its own for per-request settings (see rlhf/serve.py).
- `policy_forward`: log π(y_t|s_t) and the entropy of π at each response token, the LM head applied chunk by
  chunk (`LinearLogprobEntropy`) so the (B, N, V) logits are never held.
- `heldout_rollouts`: sample one response per held-out prompt, score it, and measure its KL to a reference:
  how the policy stage and evaluate compare policies.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import extract_model_from_parallel
from tqdm.auto import tqdm

from rlhf.attention import compute_dtype
from rlhf.chat import prompt_ids
from rlhf.decoding import decoder
from rlhf.models import adapter_inputs_uncast, load_causal_lm, without_peft


# ------------------------------------------------------------------------------------------------
# The equations
# ------------------------------------------------------------------------------------------------

def token_logprobs(logp_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # log π(a_t|s_t) of the taken tokens (...,), from the log-probabilities over the vocabulary (..., V)
    return torch.gather(logp_all, -1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logp_all: torch.Tensor) -> torch.Tensor:
    # H(π(·|s_t)) = −Σ_a π(a|s_t) log π(a|s_t), from the log-probabilities over the vocabulary (..., V)
    return -(logp_all.exp() * logp_all).sum(dim=-1)


def kl_per_response(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # KL(π‖π_ref) of each response ≈ Σ_t mask_t·(log π(y_t) − log π_ref(y_t)), over its sampled tokens. (B,)
    return ((logp - logp_ref) * mask).sum(dim=1)


class LinearLogprobEntropy(torch.autograd.Function):
    """`token_logprobs` and `token_entropy` of π = softmax(z), z = h·Wᵀ/τ, for hidden states h (T, H), the LM
    head W (V, H) and the taken tokens (T,), `chunk` rows at a time. The (T, V) fp32 log-probabilities (150 MB
    for 8 responses × 96 tokens with a 49,152 vocabulary) only ever exist a chunk at a time: backward makes
    each chunk's logits again from h and applies
        ∂ log π(y)/∂z = onehot(y) − π,        ∂H/∂z = −π ⊙ (log π + H).
    The matmuls run in h's dtype; W may be wider (the fp32 master weights under bf16 autocast), and its
    gradient is summed over the chunks and returned in W's dtype, never rounded to h's on the way."""

    @staticmethod
    def forward(ctx, hidden, master_weight, tokens, temperature: float, chunk: int):
        weight = master_weight.to(hidden.dtype)
        ctx.weight_dtype = master_weight.dtype
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
        grad_weight = None
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
            if want_weight:  # summed in fp32 (at least): a bf16 sum over chunks would round at each
                grad_weight = (grad_z.T @ h).float() if grad_weight is None else grad_weight.add_(grad_z.T @ h)
        return grad_hidden, None if grad_weight is None else grad_weight.to(ctx.weight_dtype), None, None, None


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.log_softmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, width - len(s):] = torch.tensor(s)
        attention_mask[row, width - len(s):] = 1
    return input_ids, attention_mask


def encode_queries(tokenizer, prompts: Sequence[str], max_prompt_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts in the chat template, left-padded: (query (B, T), query_mask (B, T)) on `device`."""
    query, query_mask = pad_left([prompt_ids(tokenizer, p, max_prompt_len) for p in prompts], tokenizer.pad_token_id)
    return query.to(device), query_mask.to(device)


def last_position(input_ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for the prompt pass: the last position as an index tensor. With `logits_to_keep=1` the
    model slices hidden[:, -1:], a non-contiguous (B, 1, H) view that F.linear multiplies by a (B, H, V) expanded
    copy of the LM head: 0.57 s for 8 rows and a 49,152 vocabulary, against 4.6 ms for the indexed copy."""
    return torch.tensor([input_ids.size(1) - 1], device=input_ids.device)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # position ids that follow the attention mask: a left-padded row starts at 0 where its tokens start
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row of logits (B, V) from softmax(logits / τ); τ = 0 takes the most likely token.

    The full distribution: the CDF inverted at a uniform draw, one random number a row (torch.multinomial draws
    V exponentials a row, 6 ms a step at batch 8); the CDF is summed in fp64, so each token's chance is its
    probability to within ~1e-16. Cut to the top-k tokens and/or the nucleus (the smallest set of most likely
    tokens whose probability reaches top_p): the filters and torch.multinomial exactly as transformers'
    `generate` applies them, so a seed samples the same text as `model.generate(do_sample=True, ...)`.
    """
    logits = logits.float()
    if temperature == 0:  # greedy
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if not top_k and top_p >= 1.0:
        cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
        draw = torch.rand(cdf.size(0), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)
    if top_k:
        top, top_ids = torch.topk(logits, min(top_k, logits.size(-1)))  # descending
        logits = logits.masked_fill(logits < top[..., -1:], -float("inf"))
        if top_p < 1.0:  # the nucleus among the k survivors: sorting k values, not the vocabulary (2x a step)
            ascending, order = top.flip(-1), top_ids.flip(-1)
            outside = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the least likely, mass ≤ 1 − p
            outside[..., -1:] = False  # the most likely token always stays
            logits = logits.scatter(1, order, ascending.masked_fill(outside, -float("inf")))
    elif top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        outside = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the least likely tokens, mass ≤ 1 − p
        outside[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(outside.scatter(1, order, outside), -float("inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)


def cut_at_eos(responses: torch.Tensor, eos_ids: Sequence[int], pad_id: int):
    """(responses with padding after the first EOS, mask over the tokens up to and including it, ended (B,)):
    `ended` is False where no EOS came."""
    is_eos = torch.isin(responses, torch.tensor(list(eos_ids), device=responses.device))
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.int().argmax(dim=1), responses.size(1) - 1)
    mask = (torch.arange(responses.size(1), device=responses.device) <= first_eos.unsqueeze(1)).long()
    return responses.masked_fill(mask == 0, pad_id), mask, ended


@torch.no_grad()
def sample_responses(model, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
                     eos_ids: Sequence[int], pad_id: int, top_k: int = 0, top_p: float = 1.0):
    """Sample one response per left-padded query, batched, one decoding step a token over the KV cache
    (rlhf.decoding), until every row has an EOS or `max_new_tokens`: `cut_at_eos`'s (responses (B, N),
    response_mask (B, N), ended (B,)). Position ids follow the attention mask, as in `policy_forward`."""
    eos = torch.tensor(list(eos_ids), device=query.device)
    positions = mask_positions(query_mask)
    logits, cache = shared_prefill(model, query, query_mask, positions)
    step, next_position = decoder(model, cache, query_mask, max_new_tokens), positions[:, -1:] + 1
    tokens, ended = [], torch.zeros(query.size(0), dtype=torch.bool, device=query.device)
    while True:
        token = sample_tokens(logits, temperature, top_k, top_p).masked_fill_(ended, pad_id)
        tokens.append(token)
        ended |= torch.isin(token, eos)
        if ended.all() or len(tokens) == max_new_tokens:
            return cut_at_eos(torch.stack(tokens, dim=1), eos_ids, pad_id)
        logits, next_position = step(token, next_position), next_position + 1


def distinct_runs(query: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the first row of each run of identical consecutive queries, each row's run) when some rows repeat the row
    before them, else None. The k samples of one prompt (a GRPO/RLOO group, collect's pair) are such a run, and
    their prompt pass, most of a forward pass when prompts are long and replies short, need run only once."""
    _, inverse, counts = torch.unique_consecutive(torch.cat([query, query_mask], dim=1), dim=0,
                                                  return_inverse=True, return_counts=True)
    if len(counts) == query.size(0):
        return None
    return torch.cumsum(counts, dim=0) - counts, inverse


def shared_prefill(model, query: torch.Tensor, query_mask: torch.Tensor, positions: torch.Tensor):
    """The prompt pass of `sample_responses`: (last-position logits (B, V), KV cache), once per distinct prompt
    (`distinct_runs`), the cache then copied to every row of the prompt."""
    runs = distinct_runs(query, query_mask)
    if runs is None:
        out = model(input_ids=query, attention_mask=query_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=last_position(query))
        return out.logits[:, -1], out.past_key_values
    first, inverse = runs
    out = model(input_ids=query[first], attention_mask=query_mask[first], position_ids=positions[first],
                use_cache=True, logits_to_keep=last_position(query))
    out.past_key_values.reorder_cache(inverse)
    return out.logits[inverse, -1], out.past_key_values


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and whatever the model's generation config adds."""
    configured = model.generation_config.eos_token_id
    ids = dict.fromkeys([tokenizer.eos_token_id] + (configured if isinstance(configured, list) else [configured]))
    return [i for i in ids if i is not None]


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


def build_sampler(checkpoint: str, dtype: torch.dtype, uses_lora: bool) -> torch.nn.Module | None:
    """Full fine-tuning in bf16: a frozen copy of the policy in `dtype` that generates the rollouts, its weights
    refreshed from the fp32 master weights before each (`refreshed`). Generating from the fp32 policy under
    autocast would cast every weight at every decoding step. None with LoRA (see `lora_merged`) or in fp32."""
    if uses_lora or dtype == torch.float32:
        return None
    return load_causal_lm(checkpoint, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def refreshed(sampler: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module:
    """`sampler` holding `policy`'s current weights, rounded to its dtype."""
    for target, source in zip(sampler.parameters(), policy.parameters(), strict=True):
        target.copy_(source)
    return sampler


# ------------------------------------------------------------------------------------------------
# Log-probabilities of sampled responses
# ------------------------------------------------------------------------------------------------

LOGIT_CHUNK_TOKENS = 128  # rows of (T, V) logits at a time in LinearLogprobEntropy: 25 MB fp32 each


def response_hidden(model, query, query_mask, responses, response_mask) -> torch.Tensor:
    """The model's last hidden state at the positions that predict the response tokens, (B, N, H): the last
    query position and every response position but the last. Position ids follow the attention mask, as in
    generation with left-padded queries. Without gradients (log π_old, log π_ref) a prompt sampled several times
    runs its prompt pass once (`distinct_runs`) and its rows continue from the copied KV cache; with gradients
    every row runs whole."""
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = mask_positions(attention_mask)
    no_position = torch.empty(0, dtype=torch.long, device=query.device)
    n, prompt_len = responses.size(1), query.size(1)
    runs = None if torch.is_grad_enabled() or n < 2 else distinct_runs(query, query_mask)
    if runs is None:
        out = model(input_ids=torch.cat([query, responses], dim=1), attention_mask=attention_mask,
                    position_ids=position_ids, output_hidden_states=-1, logits_to_keep=no_position)
        return out.hidden_states[-1][:, -n - 1:-1]  # position t predicts response token t
    first, inverse = runs
    prompt = model(input_ids=query[first], attention_mask=query_mask[first], position_ids=position_ids[first, :prompt_len],
                   use_cache=True, output_hidden_states=-1, logits_to_keep=no_position)
    prompt.past_key_values.reorder_cache(inverse)
    rest = model(input_ids=responses[:, :-1], attention_mask=attention_mask[:, :-1],
                 position_ids=position_ids[:, prompt_len:-1], past_key_values=prompt.past_key_values, use_cache=True,
                 output_hidden_states=-1, logits_to_keep=no_position)
    return torch.cat([prompt.hidden_states[-1][inverse, -1:], rest.hidden_states[-1]], dim=1)


def policy_forward(model, query, query_mask, responses, response_mask, temperature: float):
    """log π(y_t|s_t) and the entropy H(π(·|s_t)) at the response positions, (B, N) fp32, and the last hidden
    state there, (B, N, H). π is the model's next-token distribution at temperature τ.

    The model runs its layers only (it keeps the logits of no position) and `LinearLogprobEntropy` applies the
    LM head, so the (B, N, V) logits are never held.
    """
    with adapter_inputs_uncast(model, query.device.type):
        hidden = response_hidden(model, query, query_mask, responses, response_mask)
    head = without_peft(extract_model_from_parallel(model)).get_output_embeddings().weight
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = LinearLogprobEntropy.apply(hidden.reshape(-1, hidden.size(-1)).to(dtype), head,
                                                   responses.reshape(-1), temperature, LOGIT_CHUNK_TOKENS)
    return logp.view(responses.shape), entropy.view(responses.shape), hidden



@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, max_prompt_len: int,
                   stop_ids: Sequence[int], device) -> list[str]:
    """Each prompt's greedy reply (temperature 0), `batch_size` prompts a decoding call: the verifier's gold
    accuracy is pass@1 of these."""
    replies = []
    for start in range(0, len(prompts), batch_size):
        query, query_mask = encode_queries(tokenizer, prompts[start:start + batch_size], max_prompt_len, device)
        responses, mask, _ = sample_responses(model, query, query_mask, max_new_tokens, 0.0, stop_ids,
                                              tokenizer.pad_token_id)
        replies += [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return replies


# ------------------------------------------------------------------------------------------------
# Held-out rollouts
# ------------------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """One policy's responses to held-out prompts, scored, with their KL to the reference."""

    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # the scorer's, e.g. RM score in RM standard deviations
    lengths: list[int] = field(default_factory=list)  # response tokens, EOS included
    ended: list[bool] = field(default_factory=list)  # False where the response ran to max_new_tokens
    kl: list[float] = field(default_factory=list)  # Σ_t log π − log π_ref over each response

    def mean(self, figure: str) -> float:
        values = getattr(self, figure)
        return sum(values) / len(values)


Sample = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Kl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def heldout_rollouts(prompts: Sequence[str], tokenizer, sample: Sample, score: Score, kl: Kl | None,
                     batch_size: int, max_prompt_len: int, seed: int, device, progress: bool = False) -> Rollouts:
    """One response per prompt from `sample(query, query_mask)`, `batch_size` prompts at a time, each scored by
    `score(query, query_mask, responses, mask, ended)` and, where `kl` is given, its KL per response to the
    reference by `kl(query, query_mask, responses, mask)` (0 otherwise). The random stream starts at `seed`, so
    policies compared on the same prompts draw the same random numbers."""
    torch.manual_seed(seed)
    out = Rollouts()
    for start in tqdm(range(0, len(prompts), batch_size), desc="held-out rollouts", leave=False, disable=not progress):
        query, query_mask = encode_queries(tokenizer, prompts[start:start + batch_size], max_prompt_len, device)
        responses, mask, ended = sample(query, query_mask)
        out.scores += score(query, query_mask, responses, mask, ended).float().cpu().tolist()
        out.kl += (kl(query, query_mask, responses, mask).float().cpu().tolist() if kl is not None
                   else [0.0] * len(responses))
        out.lengths += mask.sum(dim=1).tolist()
        out.ended += ended.tolist()
        out.texts += [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
    return out


# ------------------------------------------------------------------------------------------------
# k samples per prompt (collect's pairs, evaluate's toxicity continuations)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    """k sampled responses per prompt, with the generation's token count and wall time."""

    texts: list[list[str]]  # [prompt][sample]
    generated_tokens: int  # new tokens up to and including each row's first EOS
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def sample_k(model, tokenizer, texts: Sequence[str], k: int, max_new_tokens: int, temperature: float, batch_rows: int,
             top_k: int = 0, top_p: float = 1.0, add_special_tokens: bool = True, progress=None) -> Samples:
    """k responses to each text (used as given: render a chat template first where one is wanted). The k samples
    of a text are consecutive rows, as `generate`'s num_return_sequences makes them, and `batch_rows` rows go
    to a `sample_responses` call. Draws from the global random stream."""
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    rows = [t for t in texts for _ in range(k)]
    decoded, generated, started = [], 0, time.perf_counter()
    for start in range(0, len(rows), batch_rows):
        ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in rows[start:start + batch_rows]]
        query, query_mask = pad_left(ids, tokenizer.pad_token_id)
        responses, mask, _ = sample_responses(model, query.to(device), query_mask.to(device), max_new_tokens,
                                              temperature, stop, tokenizer.pad_token_id, top_k, top_p)
        generated += int(mask.sum())
        decoded += tokenizer.batch_decode(responses, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(ids))
            progress.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}")
    return Samples([decoded[i:i + k] for i in range(0, len(decoded), k)], generated, time.perf_counter() - started)
