"""The model loader: a GGUF file becomes a plain safetensors checkpoint with the same logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf.checkpoints import load_source_model, load_tokenizer, resolve_precision, save_checkpoint

from rlhf.models import load_causal_lm
from rlhf.params import ModelParams, ParamError
from tests.conftest import CHATML, build_tiny_model, build_tiny_tokenizer


def _hf_to_gguf_permute(weight: torch.Tensor, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this on load
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape).numpy()


def write_tiny_gguf(path, model, tokenizer) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else 10000.0)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"]: t["content"] for t in spec["added_tokens"]}
    tokens = [specials.get(i, tok) for tok, i in vocab]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHATML)
    sd = model.state_dict()
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _hf_to_gguf_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _hf_to_gguf_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf, gg in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_becomes_a_safetensors_checkpoint_with_the_same_logits(tmp_path):
    tokenizer = build_tiny_tokenizer()
    reference = build_tiny_model(len(tokenizer)).eval()
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_tiny_gguf(gguf_dir / "tiny.gguf", reference, tokenizer)

    model, gguf_tokenizer = load_source_model(ModelParams(policy=str(gguf_dir), gguf_file="tiny.gguf"))
    text = gguf_tokenizer.apply_chat_template([{"role": "user", "content": "why is the sky blue"}],
                                              add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n")
    ids = torch.tensor([tokenizer("the quick brown fox jumps")["input_ids"]])
    assert gguf_tokenizer("the quick brown fox jumps")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model.eval()(ids).logits, expected)

    save_checkpoint(model, gguf_tokenizer, tmp_path / "base", torch.float32)
    assert (tmp_path / "base" / "model.safetensors").exists()
    assert not (tmp_path / "base" / "tiny.gguf").exists()
    reloaded = load_causal_lm(tmp_path / "base").eval()
    assert not getattr(reloaded, "is_quantized", False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected)
    assert load_tokenizer(tmp_path / "base").chat_template


def test_a_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ParamError, match="looks like a path, but nothing is there"):
        load_source_model(ModelParams(policy=str(tmp_path / "missing")))


def test_offline_hub_id_fails_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParamError, match=r"taken as a Hugging Face hub id.*hf download"):
        load_source_model(ModelParams(policy="HuggingFaceTB/SmolLM2-360M-Instruct"))


def test_precision_choice():
    assert resolve_precision("fp32") == torch.float32
    assert resolve_precision("bf16") == torch.bfloat16
    assert resolve_precision("auto") in (torch.float32, torch.bfloat16)


def test_adapter_inputs_stay_in_bf16_under_autocast_with_the_same_result():
    """peft's cast of adapter inputs to fp32 is undone by autocast at once: skipping it changes no bit; outside
    autocast the cast stays, so a bf16 model with fp32 adapters still runs."""
    from rlhf.models import adapter_inputs_uncast, add_lora

    torch.manual_seed(0)
    model = add_lora(build_tiny_model(64).to(torch.bfloat16), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(input_ids=ids).logits
        with adapter_inputs_uncast(model, "cpu"):
            uncast = model(input_ids=ids).logits
    assert torch.equal(cast, uncast)
    with torch.no_grad(), adapter_inputs_uncast(model, "cpu"):  # no autocast: inputs are cast as before
        assert model(input_ids=ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("rows_per_chunk", [None, 1])
@pytest.mark.parametrize("q_len, kv_len, padded, additive", [(7, 7, False, False), (7, 7, True, False),
                                                             (1, 12, True, False), (4, 10, False, False),
                                                             (7, 7, True, True)])
def test_multiplied_out_attention_equals_sdpa_in_value_and_gradient(q_len, kv_len, padded, additive,
                                                                    rows_per_chunk, monkeypatch):
    """rlhf.attention (grouped heads, two matmuls, the batch whole or a row at a time) against HF's SDPA
    path: causal blocks, left padding, a decoding step over a cache, and a block of new queries after a cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf import attention as kernel
    from rlhf.attention import attention

    if rows_per_chunk:
        monkeypatch.setattr(kernel, "SCORES_PER_CHUNK", rows_per_chunk * 6 * q_len * kv_len)

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    torch.manual_seed(0)
    query = torch.randn(2, 6, q_len, 8, requires_grad=True)
    key, value = (torch.randn(2, 2, kv_len, 8, requires_grad=True) for _ in range(2))
    mask = None
    if padded or q_len != kv_len or additive:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).expand(2, 1, q_len, kv_len).clone()
        if padded:
            mask[0, :, :, :3] = False  # the first row's prompt is left-padded by 3
    # query rows with nothing to attend to (padding) give values nobody reads; the loss sends them no gradient
    attends = torch.ones(2, q_len, dtype=torch.bool) if mask is None else mask[:, 0].any(dim=-1)
    grad = torch.randn(2, q_len, 6, 8) * attends[:, :, None, None]
    if additive:  # as evaluate's TruthfulQA tree passes it: 0 where allowed, the dtype's lowest elsewhere
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    results = []
    for function in (attention, sdpa_attention_forward):  # (2 rows of 6 query heads on 2 key/value heads)
        out, _ = function(Layer(), query, key, value, mask, scaling=0.3)
        out.backward(grad)
        results.append((out.detach(), query.grad.clone(), key.grad.clone(), value.grad.clone()))
        query.grad = key.grad = value.grad = None
    (out, *grads), (out_sdpa, *grads_sdpa) = results
    torch.testing.assert_close(out[attends], out_sdpa[attends], atol=1e-5, rtol=1e-5)
    for ours, sdpa in zip(grads, grads_sdpa):
        torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)


def test_models_load_with_the_project_attention_and_generate_as_with_sdpa(tmp_path):
    from rlhf.attention import ATTENTION
    from rlhf.models import load_causal_lm

    build_tiny_model(64).save_pretrained(tmp_path)
    ours, sdpa = load_causal_lm(tmp_path), load_causal_lm(tmp_path)
    sdpa.set_attn_implementation("sdpa")
    assert ours.config._attn_implementation == ATTENTION
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()  # checkpoints stay portable
    ids = torch.randint(3, 64, (3, 9))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    outputs = []
    for model in (ours, sdpa):
        torch.manual_seed(0)
        outputs.append(model.generate(input_ids=ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=6,
                                      pad_token_id=2))
    assert torch.equal(*outputs)


def test_attention_leaves_rows_too_long_to_multiply_out_to_sdpa(monkeypatch):
    from rlhf import attention as kernel

    calls = []
    monkeypatch.setattr(kernel, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(args) or (None, None))
    monkeypatch.setattr(kernel, "SCORES_PER_CHUNK", 6 * 8 * 8 - 1)  # one row's scores do not fit

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    kernel.attention(Layer(), torch.randn(2, 6, 8, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), None)
    assert len(calls) == 1


def test_attention_under_autocast_keeps_rows_without_keys_finite():
    """fp32 inputs under bf16 autocast (full fine-tuning): the mask's bias must be made in bf16, or fp32's lowest
    value rounds to −inf and a row of padding turns into NaN."""
    from rlhf.attention import attention

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 6, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
    mask[0, :, :, :3] = False  # the first rows of the first sequence are padding: they attend to nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(Layer(), query, key, value, mask)
    assert out.isfinite().all()
