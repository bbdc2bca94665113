"""One decoding step after another over a KV cache: what `rollouts.sample_responses` runs after the prompt pass.

`decoder(model, cache, query_mask, max_new_tokens)` returns a step, `step(token (B,), position (B, 1)) → logits
(B, V)`, of one of two kinds:
- `LlamaDecoder`, for Llama-architecture models (the default SmolLM2 and the tests' tiny models): the decoder
  layers written out with their weights taken once per sampling call, Q, K and V fused into one matrix and gate
  and up into another, and on the CPU in bf16 reordered for oneDNN once (the packing torch's own compiler does)
  instead of at every call; the KV cache preallocated for the whole reply. At batch 8 on this 2-core CPU a
  SmolLM2-135M step takes ~30 ms against ~47 ms through transformers' forward, which spends the difference on
  ~1,500 small ops a step and on reordering each weight each call (benchmarks/rollouts.py). In bf16 its logits
  equal the model's own forward bit for bit (tests/test_rollouts.py).
- `TransformersDecoder`: the model's own forward over its cache, for every other model, for a LoRA policy whose
  adapters are neither merged nor disabled, and under an autocast that would change the weights' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from rlhf.models import without_peft


class TransformersDecoder:
    """The model's own forward, one token a row, over the cache of the prompt pass."""

    def __init__(self, model, cache, query_mask: torch.Tensor):
        self.model, self.cache, self.attention_mask = model, cache, query_mask

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        out = self.model(input_ids=token[:, None], attention_mask=self.attention_mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1]


@dataclass(frozen=True)
class _Layer:
    qkv: torch.Tensor  # [W_q; W_k; W_v], (heads·d + 2·kv_heads·d, H), packed for oneDNN on the CPU in bf16
    o: torch.Tensor
    gate_up: torch.Tensor  # [W_gate; W_up], (2·I, H)
    down: torch.Tensor
    input_norm: torch.nn.Module  # the model's own RMSNorm modules
    post_attention_norm: torch.nn.Module


@dataclass(frozen=True)
class _Weights:
    layers: list[_Layer]
    head: torch.Tensor
    embed: torch.Tensor
    norm: torch.nn.Module
    packed: bool  # the linears' weights are oneDNN-packed: multiply with mkldnn's linear, not F.linear


class LlamaDecoder:
    """A Llama decoder layer stack for one token a row, its weights fused (and packed) once, over a preallocated
    KV cache of (layers, B, kv_heads, prompt + max_new_tokens, d). Each step computes, per layer,
        h = RMSNorm(x);  [q; k; v] = h·W_qkvᵀ;  q, k ← RoPE(q, k);  cache ← k, v
        a = softmax(q·Kᵀ/√d + mask)·V;  x ← x + a·W_oᵀ;  h = RMSNorm(x);  x ← x + (silu(h·W_gateᵀ) ⊙ h·W_upᵀ)·W_downᵀ
    in the order and dtypes of transformers' Llama with this project's attention (rlhf.attention)."""

    def __init__(self, llama, weights: _Weights, cache, query_mask: torch.Tensor, max_new_tokens: int):
        config, embed = llama.config, weights.embed
        self.rotary = llama.model.rotary_emb
        self.embed, self.head, self.norm, self.layers = embed, weights.head, weights.norm, weights.layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        self.scaling = llama.model.layers[0].self_attn.scaling
        self.packed = weights.packed
        batch, prompt_len = query_mask.shape
        self.length = prompt_len
        shape = (len(self.layers), batch, self.kv_heads, prompt_len + max_new_tokens, self.head_dim)
        self.keys = torch.empty(shape, dtype=embed.dtype, device=embed.device)
        self.values = torch.empty_like(self.keys)
        for i, layer in enumerate(cache.layers):
            self.keys[i, :, :, :prompt_len] = layer.keys
            self.values[i, :, :, :prompt_len] = layer.values
        # the attention mask as an additive bias a row, as rlhf.attention makes it: 0 where attended, else lowest
        self.bias = torch.full((batch, self.kv_heads, 1, shape[3]), torch.finfo(embed.dtype).min, dtype=embed.dtype,
                               device=embed.device)
        self.bias[..., :prompt_len].masked_fill_(query_mask.bool()[:, None, None], 0)

    @staticmethod
    def weights(llama, batch: int) -> _Weights | None:
        """The fused (and packed) weights, or None where a LoRA layer's output is not its base weight's or the
        weights differ in dtype (a merged LoRA policy's adapters stay fp32 beside its bf16 base; they are not read)."""
        embed = _linear_weight(llama.model.embed_tokens)
        if embed is None:
            return None
        pack = (embed.device.type == "cpu" and embed.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

        def fused(*linears):
            ws = [_linear_weight(linear) for linear in linears]
            if any(w is None or w.dtype != embed.dtype for w in ws):
                return None
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            return torch.ops.mkldnn._reorder_linear_weight(w, batch) if pack else w

        layers = []
        for layer in llama.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [fused(attn.q_proj, attn.k_proj, attn.v_proj), fused(attn.o_proj),
                     fused(mlp.gate_proj, mlp.up_proj), fused(mlp.down_proj)]
            if any(p is None for p in parts):
                return None
            layers.append(_Layer(*parts, layer.input_layernorm, layer.post_attention_layernorm))
        head = fused(llama.lm_head)
        if head is None:
            return None
        return _Weights(layers, head, embed, llama.model.norm, pack)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return F.linear(x, weight)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        heads, kv_heads, d, t = self.heads, self.kv_heads, self.head_dim, self.length
        batch, group = token.size(0), heads // kv_heads
        self.length += 1
        self.bias[..., t] = 0
        bias = self.bias[..., :t + 1].expand(batch, kv_heads, group, t + 1).reshape(batch * kv_heads, group, t + 1)
        x = F.embedding(token, self.embed)
        cos, sin = self.rotary(x, position)  # (B, 1, d)
        # RoPE: q·cos + rotate_half(q)·sin, with rotate_half(q) = [−q₂; q₁] written as roll(q)·[−1; 1]
        signed_sin = torch.cat([-sin[..., :d // 2], sin[..., d // 2:]], dim=-1)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(layer.input_norm(x), layer.qkv).view(batch, heads + 2 * kv_heads, d)
            qk = qkv[:, :heads + kv_heads]
            qk = qk * cos + qk.roll(d // 2, dims=-1) * signed_sin
            self.keys[i, :, :, t] = qk[:, heads:]
            self.values[i, :, :, t] = qkv[:, heads + kv_heads:]
            q = (qk[:, :heads] * self.scaling).view(batch * kv_heads, group, d)
            keys = self.keys[i, :, :, :t + 1].view(batch * kv_heads, t + 1, d)
            values = self.values[i, :, :, :t + 1].view(batch * kv_heads, t + 1, d)
            scores = torch.baddbmm(bias, q, keys.transpose(1, 2))
            attended = torch.bmm(scores.softmax(dim=-1), values).view(batch, heads * d)
            x = x + self._linear(attended, layer.o)
            gate_up = self._linear(layer.post_attention_norm(x), layer.gate_up)
            x = x + self._linear(F.silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:], layer.down)
        return self._linear(self.norm(x), self.head)


def decoder(model, cache, query_mask: torch.Tensor, max_new_tokens: int):
    """The decoding step for `model` after a prompt pass that left `cache`: `LlamaDecoder` where it applies."""
    llama = _plain_llama(model)
    if llama is not None:
        weights = LlamaDecoder.weights(llama, query_mask.size(0))
        if weights is not None:
            return LlamaDecoder(llama, weights, cache, query_mask, max_new_tokens)
    return TransformersDecoder(model, cache, query_mask)


def _plain_llama(model):
    """The LlamaForCausalLM inside `model` when its layers are the standard ones and an autocast, if on, would
    leave its dtype alone; else None."""
    from transformers import LlamaForCausalLM

    llama = without_peft(extract_model_from_parallel(model))
    if not isinstance(llama, LlamaForCausalLM):
        return None
    config, dtype = llama.config, llama.model.embed_tokens.weight.dtype
    device = llama.model.embed_tokens.weight.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != dtype:
        return None
    standard = (not config.attention_bias and not getattr(config, "mlp_bias", False) and config.hidden_act == "silu"
                and getattr(config, "pretraining_tp", 1) == 1)
    return llama if standard else None


def _linear_weight(module) -> torch.Tensor | None:
    """The weight a linear (or embedding) layer multiplies by: its own, or a peft LoRA layer's base weight when
    the adapter is merged into it (and not disabled) or disabled (and not merged); None when the adapter is live."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight
    return base.weight if module.merged != module.disable_adapters else None
