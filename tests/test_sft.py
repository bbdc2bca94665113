"""SFT: prompt tokens carry no loss; a few steps lower the loss; sizes are checked before any work."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.params import ParamError, SftParams
from rlhf.sft import (IGNORE, Demonstration, ResponseNll, check_sizes, collate, load_demonstrations, response_nll,
                      split_demonstrations, tokenize_demonstration)
from tests.conftest import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_prompt_tokens_carry_no_loss(tokenizer):
    demo = Demonstration("explain why the sky is blue", "light scatters more")
    example = tokenize_demonstration(tokenizer, demo, max_seq_len=512)
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": demo.prompt}],
                                                add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE for label in example["labels"][:n_prompt])
    response = example["labels"][n_prompt:]
    assert IGNORE not in response and response == example["input_ids"][n_prompt:]
    assert tokenizer.decode(response).startswith("light scatters more<|im_end|>")


def test_response_nll_ignores_masked_positions():
    logits = torch.zeros(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1]])
    nll, count = response_nll(logits, labels)
    assert count == 2  # labels at positions 2 and 3 are predicted from positions 1 and 2
    assert nll.item() == pytest.approx(2 * math.log(5))  # uniform logits: log V per token


@pytest.mark.parametrize("chunk", [3, 512])
def test_fused_lm_head_loss_equals_response_nll_in_value_and_gradients(tokenizer, chunk):
    """ResponseNll (the stage's loss, logits made chunk by chunk) against response_nll on the model's own logits."""
    torch.manual_seed(0)
    model = build_tiny_model(len(tokenizer))
    examples = [tokenize_demonstration(tokenizer, Demonstration(p, r), 128)
                for p, r in [("what is two plus two?", "four"), ("name a colour", "blue, or perhaps green")]]
    batch = collate(examples, tokenizer.pad_token_id)

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference, _ = response_nll(logits, batch["labels"])
    reference.backward()
    expected = grads()
    model.zero_grad()
    fused = ResponseNll(model, chunk=chunk)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    fused.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    got = grads()
    assert got.keys() == expected.keys()
    for name in expected:  # the tied embedding/LM-head weight included
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # no gradient wanted: the value alone
        again = ResponseNll(model, chunk=chunk)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert again.item() == pytest.approx(reference.item(), rel=1e-5)


def test_a_few_steps_lower_the_loss_and_move_every_weight(tokenizer):
    model = build_tiny_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = [tokenize_demonstration(tokenizer, Demonstration("what is two plus two?", "two plus two is four"), 128)] * 4
    batch = collate(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = response_nll(logits, batch["labels"])
        return nll / n

    first = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first * 0.7
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not move"


def test_split_is_deterministic_and_disjoint():
    demos = [Demonstration(f"p{i}", f"r{i}") for i in range(20)]
    train_a, val_a = split_demonstrations(demos, 0.2, seed=3)
    train_b, val_b = split_demonstrations(demos, 0.2, seed=3)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 4
    assert not set(train_a) & set(val_a)


def test_batch_larger_than_the_data_is_refused(tokenizer):
    examples = [tokenize_demonstration(tokenizer, Demonstration("a", "b"), 64)] * 3
    with pytest.raises(ParamError, match=r"sft.batch_size is 8, larger than the 3 training demonstrations"):
        check_sizes(SftParams(batch_size=8), 3, examples)


def test_seq_len_that_leaves_no_response_is_refused(tokenizer):
    examples = [tokenize_demonstration(tokenizer, Demonstration("a very long prompt " * 20, "b"), 16)]
    with pytest.raises(ParamError, match=r"sft.max_seq_len is 16, which leaves 1 demonstration"):
        check_sizes(SftParams(batch_size=1, max_seq_len=16), 1, examples)


def test_bad_demonstration_row_is_named(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "", "response": "x"}\n')
    with pytest.raises(ParamError, match=r"demos.jsonl, row 2: `prompt` is ''"):
        load_demonstrations(SftParams(data=str(path)))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ParamError, match=r"sft.data is '.*nothing.jsonl', but no file is there"):
        load_demonstrations(SftParams(data=str(tmp_path / "nothing.jsonl")))


def test_length_pooled_batches_cover_every_example_once_and_are_seeded():
    import random

    from rlhf.sft import batches

    examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in range(1, 101)]
    first = [[len(e["input_ids"]) for e in b] for b in batches(examples, 4, random.Random(7))]
    again = [[len(e["input_ids"]) for e in b] for b in batches(examples, 4, random.Random(7))]
    assert first == again
    assert sorted(n for b in first for n in b) == list(range(1, 101))
    spread = sum(max(b) - min(b) for b in first) / len(first)
    assert spread < 15  # random batches of 4 from 1..100 spread ~60 tokens
