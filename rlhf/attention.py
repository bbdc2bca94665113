"""The attention the stages' models run with: softmax(Q·Kᵀ)·V multiplied out on the CPU, SDPA elsewhere.

Registered with transformers as `attn_implementation="rlhf"` when this module is imported; `rlhf.models`,
the checkpoint loader, imports it and loads every model with it.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


ATTENTION = "rlhf"  # the attn_implementation every stage loads its models with
SCORES_PER_CHUNK = 4 * 9 * 512 * 512  # attention scores `attention` makes at once: 19 MB in bf16


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(Q·Kᵀ·s + mask)·V multiplied out on the CPU, a chunk of the batch at a time; SDPA otherwise.

    torch's CPU flash-attention kernel runs far below the matmul rate here: forward and backward take 2.6-3.5×
    as long with it at PPO's 4-8 × 100-153 positions and 2.0× at 8 × 512, the SFT benchmark's shape
    (benchmarks/attention.py). Chunks keep the scores of one matmul within SCORES_PER_CHUNK, where this CPU's
    caches keep it fast; where a single row's scores exceed it (over ~1,000 positions), SDPA's memory-light
    kernel takes over. Query heads are grouped by the key/value head they read, so grouped-query attention needs
    no copy of K and V. The scores stay in the compute dtype, as in transformers' eager attention (the softmax
    accumulates in fp32 inside). `attention_mask` is SDPA's boolean mask (True: attend), a caller's additive
    float mask, or None for a causal block without padding.
    """
    batch, heads, q_len, dim = query.shape
    kv_len = key.size(2)
    rows = SCORES_PER_CHUNK // (heads * q_len * kv_len)
    if query.device.type != "cpu" or dropout or rows == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    scale = dim ** -0.5 if scaling is None else scaling
    shared_mask = attention_mask is None or attention_mask.dim() == 2 or attention_mask.size(0) == 1
    out = torch.cat([
        _attention_multiplied_out(query[s:s + rows], key[s:s + rows], value[s:s + rows],
                                  attention_mask if shared_mask else attention_mask[s:s + rows], scale)
        for s in range(0, batch, rows)])
    return out.transpose(1, 2).contiguous(), None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in here: autocast's where it is on, the tensor's own otherwise."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _attention_multiplied_out(query, key, value, attention_mask, scale: float) -> torch.Tensor:
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.size(1), key.size(2)
    group = heads // kv_heads
    queries = (query * scale).reshape(batch, kv_heads, group * q_len, dim)  # (the group's heads one above another)
    keys = key.transpose(-1, -2)
    if attention_mask is None:
        scores = queries @ keys
    else:  # the mask as an additive bias that the matmul starts from: no pass of its own, forward or backward.
        # The dtype's lowest, not −inf, so that a row with nothing to attend to stays finite; in the dtype the
        # matmul runs in, as fp32's lowest would round to −inf in bf16 under autocast.
        dtype = compute_dtype(query)
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
            bias.masked_fill_(~attention_mask, torch.finfo(dtype).min)
        else:  # a caller's own additive mask (evaluate's TruthfulQA tree), passed through by transformers
            bias = attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)
        if bias.dim() == 2 or bias.size(0) == 1:  # one mask for every row
            scores = torch.baddbmm(bias.reshape(q_len, kv_len).repeat(group, 1), queries.flatten(0, 1),
                                   keys.flatten(0, 1)).view(batch, kv_heads, group * q_len, kv_len)
        elif q_len > 1:  # a mask a row (padding): a matmul a row, each from its row's bias
            scores = torch.stack([
                torch.baddbmm(bias[row].reshape(q_len, kv_len).repeat(group, 1), queries[row], keys[row])
                for row in range(batch)])
        else:  # decoding: the bias of every row and head at once, small, and one matmul instead of a loop
            bias = bias.reshape(batch, 1, kv_len).expand(batch, kv_heads * group, kv_len)
            scores = torch.baddbmm(bias.reshape(batch * kv_heads, group, kv_len), queries.flatten(0, 1),
                                   keys.flatten(0, 1)).view(batch, kv_heads, group, kv_len)
    probs = scores.softmax(dim=-1)
    return (probs @ value).view(batch, heads, q_len, dim)


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
