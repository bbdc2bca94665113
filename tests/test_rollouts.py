"""The one decoding loop: it samples what transformers' `generate` samples, seed for seed."""
from __future__ import annotations

import pytest
import torch

from rlhf.chat import render_prompt
from rlhf.models import load_causal_lm
from rlhf.rollouts import kl_per_response, sample_k
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


def test_kl_per_response_sums_the_masked_log_ratio():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    logp_ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: 0.5 + 0 − 1 = −0.5; row 1: 0.5 + 0.5 (the third token is masked)
    assert kl_per_response(logp, logp_ref, mask).tolist() == pytest.approx([-0.5, 1.0])
