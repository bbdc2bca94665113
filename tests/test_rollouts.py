"""The one decoding loop: it samples what transformers' `generate` samples, seed for seed."""
from __future__ import annotations

import pytest
import torch

from rlhf.chat import render_prompt
from rlhf.decoding import LlamaDecoder, TransformersDecoder, decoder
from rlhf.models import add_lora, load_causal_lm
from rlhf.rollouts import (distinct_runs, eos_ids, kl_per_response, lora_merged, mask_positions, pad_left,
                           policy_forward, sample_k, sample_responses, shared_prefill)
from tests.conftest import build_tiny_tokenizer

PROMPTS = ["what is two plus two?", "explain why the sky is blue in one sentence", "rain", "name a colour"]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 50, 0.95), (1.0, 0, 0.9), (0.7, 5, 1.0)])
def test_sample_k_draws_the_same_tokens_as_generate(tiny_model_dir, temperature, top_k, top_p):
    tokenizer = build_tiny_tokenizer()
    model = load_causal_lm(tiny_model_dir).eval()
    texts = [render_prompt(tokenizer, p) for p in PROMPTS]
    torch.manual_seed(3)
    ours = sample_k(model, tokenizer, texts, 2, 12, temperature, batch_rows=4, top_k=top_k, top_p=top_p,
                    add_special_tokens=False)
    torch.manual_seed(3)
    theirs = []
    tokenizer.padding_side = "left"
    for start in range(0, len(texts), 2):  # 2 prompts x 2 samples = 4 rows a call, as batch_rows=4
        batch = tokenizer(texts[start:start + 2], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=12, num_return_sequences=2, pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        theirs += [decoded[i:i + 2] for i in range(0, len(decoded), 2)]
    assert ours.texts == theirs
    assert len({t for pair in ours.texts for t in pair}) > 2  # really sampled


def test_the_samples_of_one_prompt_share_its_prompt_pass(tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    model = load_causal_lm(tiny_model_dir).eval()
    stop, pad = eos_ids(model, tokenizer), tokenizer.pad_token_id
    ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    rows = [ids[0]] * 3 + [ids[1]] * 2  # two prompts, three and two samples, consecutive
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: batch_sizes.append(kwargs["input_ids"].size(0)),
                                           with_kwargs=True)
    responses, mask, _ = sample_responses(model, *pad_left(rows, pad), 8, 0.0, stop, pad)
    hook.remove()
    assert batch_sizes == [2]  # the prompt pass on the distinct prompts only; the decoding steps are rlhf.decoding's
    for row, prompt in enumerate(rows):  # and each row decodes as it would alone
        alone, alone_mask, _ = sample_responses(model, *pad_left([prompt], pad), 8, 0.0, stop, pad)
        assert torch.equal(responses[row][mask[row].bool()], alone[0][alone_mask[0].bool()])


def test_log_probs_from_a_shared_prompt_pass_match_each_row_run_whole(tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    model = load_causal_lm(tiny_model_dir).eval()
    stop, pad = eos_ids(model, tokenizer), tokenizer.pad_token_id
    ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    query, query_mask = pad_left([ids[0]] * 3 + [ids[1]] + [ids[2]] * 2, pad)
    torch.manual_seed(0)
    responses, mask, _ = sample_responses(model, query, query_mask, 10, 1.0, stop, pad)
    assert distinct_runs(query, query_mask) is not None
    with torch.no_grad():
        shared = policy_forward(model, query, query_mask, responses, mask, 0.8)
    whole = policy_forward(model, query, query_mask, responses, mask, 0.8)  # with gradients: every row whole
    kept = mask.bool()  # positions after a row's EOS are padding either way
    for got, expected in zip(shared, whole):  # log π, entropy, hidden state
        torch.testing.assert_close(got[kept], expected.detach()[kept], atol=1e-5, rtol=1e-5)


def test_kl_per_response_sums_the_masked_log_ratio():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    logp_ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: 0.5 + 0 − 1 = −0.5; row 1: 0.5 + 0.5 (the third token is masked)
    assert kl_per_response(logp, logp_ref, mask).tolist() == pytest.approx([-0.5, 1.0])


def _decode_both(model, tokenizer, steps: int):
    """The logits of `steps` decoding steps after the same prompt pass, from `decoder(model, ...)` and from the
    model's own forward, fed the same greedy tokens (three prompts, two of them the same, left-padded)."""
    ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    query, query_mask = pad_left([ids[0], ids[0], ids[1], ids[2]], tokenizer.pad_token_id)
    positions = mask_positions(query_mask)
    with torch.no_grad():
        logits, cache = shared_prefill(model, query, query_mask, positions)
        ours = decoder(model, cache, query_mask, steps)
        theirs = TransformersDecoder(model, shared_prefill(model, query, query_mask, positions)[1], query_mask)
        position, pairs = positions[:, -1:] + 1, []
        for _ in range(steps):
            token = logits.argmax(dim=-1)
            logits = ours(token, position)
            pairs.append((logits, theirs(token, position)))
            position = position + 1
    return ours, pairs


def test_the_llama_decoder_gives_the_models_own_logits(tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    for dtype in (torch.bfloat16, torch.float32):  # bf16 as the stages sample on the CPU: bit for bit
        ours, pairs = _decode_both(load_causal_lm(tiny_model_dir, dtype=dtype).eval(), tokenizer, steps=6)
        assert isinstance(ours, LlamaDecoder)
        for got, expected in pairs:
            if dtype == torch.bfloat16:
                assert torch.equal(got, expected)
            else:  # fp32: the fused matrices may sum in another order
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_lora_policy_decodes_fast_only_with_its_adapter_merged_or_disabled(tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    policy = add_lora(load_causal_lm(tiny_model_dir, dtype=torch.bfloat16), r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():  # an adapter that changes the outputs
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    live, pairs = _decode_both(policy, tokenizer, steps=2)
    assert isinstance(live, TransformersDecoder)  # the base weights alone would leave the adapter out
    with lora_merged(policy):
        merged, pairs = _decode_both(policy, tokenizer, steps=3)
    with policy.disable_adapter():
        disabled, disabled_pairs = _decode_both(policy, tokenizer, steps=3)
    assert isinstance(merged, LlamaDecoder) and isinstance(disabled, LlamaDecoder)
    for got, expected in pairs + disabled_pairs:
        assert torch.equal(got, expected)
    assert not torch.equal(pairs[0][0], disabled_pairs[0][0])  # the adapter was in the merged logits


def test_an_autocast_to_another_dtype_decodes_through_the_models_forward(tiny_model_dir):
    tokenizer = build_tiny_tokenizer()
    model = load_causal_lm(tiny_model_dir).eval()  # fp32 weights, bf16 autocast: transformers casts each call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step, _ = _decode_both(model, tokenizer, steps=1)
    assert isinstance(step, TransformersDecoder)
