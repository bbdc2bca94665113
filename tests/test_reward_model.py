"""Reward model: −log σ(R₊ − R₋), the reward at the last real token, ties, and training on a tiny model."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.comparisons import write_comparisons
from rlhf.params import ParamError, RewardModelParams
from rlhf.reward_model import (Pair, _score_head_model, check_sizes, encode, encode_pairs, length_grouped_batches,
                               load_pairs, preference_loss, stack_pairs, train)
from rlhf.rewards import NORMALIZATION_KEY, load_reward_model, reward_at_last_token, rewards
from tests.conftest import build_tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads collapse on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# chosen answers the question; rejected is an unrelated sentence from the same corpus
PAIRS = [
    Pair("what is two plus two?", "two plus two is four", "the quick brown fox jumps over the lazy dog"),
    Pair("explain why the sky is blue", "light scatters more at short wavelengths so the sky looks blue", "two plus two is four"),
    Pair("write a short poem about rain", "rain taps the glass and the room grows quiet", "a reward model scores a response"),
    Pair("what does a reward model do?", "a reward model scores a response to a prompt", "rain taps the glass"),
    Pair("what is two plus two? answer briefly", "four", "the lazy dog"),
    Pair("explain why the sky is blue in one sentence", "light scatters more at short wavelengths", "the quick brown fox"),
    Pair("write a poem about a window", "rain on a window, the room grows quiet", "two plus two is four"),
    Pair("what scores a response?", "a reward model scores a response to a prompt", "the sky looks blue"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_preference_loss_at_equal_rewards_is_log_2():
    r = torch.tensor([0.3, -1.0, 2.0])
    assert preference_loss(r, r).item() == pytest.approx(math.log(2))


def test_preference_loss_hand_example():
    # −log σ(1) = log(1 + e⁻¹) and −log σ(−1) = log(1 + e); the mean of the two
    loss = preference_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2)


def test_reward_is_taken_at_the_last_attended_token():
    scores = torch.arange(10.0).reshape(2, 5)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert reward_at_last_token(scores, right).tolist() == [2.0, 9.0]
    assert reward_at_last_token(scores, left).tolist() == [4.0, 8.0]


def test_encoding_cuts_long_prompts_from_the_left_and_long_responses_from_the_end(tokenizer):
    full = encode(tokenizer, "explain why the sky is blue", "light scatters more", max_seq_len=512)
    assert tokenizer.decode(full).endswith("light scatters more<|im_end|>\n")
    long_prompt = encode(tokenizer, "the quick brown fox " * 40, "two plus two is four", max_seq_len=48)
    assert len(long_prompt) == 48 and tokenizer.decode(long_prompt).endswith("two plus two is four<|im_end|>\n")
    both = encode(tokenizer, "the quick brown fox " * 40, "rain taps the glass " * 40, max_seq_len=48)
    assert len(both) == 48
    assert "rain" not in tokenizer.decode(both[:24]) and tokenizer.decode(both[24:]).startswith("rain taps")


def test_pairs_follow_chosen_and_ties_are_counted_not_trained(tmp_path):
    frame = pd.DataFrame({
        "pair_id": ["1", "2", "3"], "prompt": ["p1", "p2", "p3"], "response_a": ["a1", "a2", "a3"],
        "response_b": ["b1", "b2", "b3"], "chosen": ["a", "b", "tie"], "source": ["judge:tiny"] * 3,
        "policy_version": [None] * 3, "votes": [None] * 3, "agreement": [None] * 3,
        "created_at": pd.Timestamp("2026-01-01", tz="UTC"),
    })
    write_comparisons(frame, tmp_path / "train.parquet")
    pairs, ties = load_pairs(tmp_path / "train.parquet")
    assert pairs == [Pair("p1", "a1", "b1"), Pair("p2", "b2", "a2")] and ties == 1

    frame.loc[0, "chosen"] = None
    write_comparisons(frame, tmp_path / "unjudged.parquet")
    with pytest.raises(ParamError, match=r"1 row\(s\) have no valid `chosen` \(the first, pair_id '1', has no label\).* run `dvc repro validate`"):
        load_pairs(tmp_path / "unjudged.parquet")


def test_batches_cover_every_pair_once():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6]
    for rng in (None, __import__("random").Random(0)):
        groups = length_grouped_batches(lengths, 4, rng)
        assert sorted(i for g in groups for i in g) == list(range(9))
    assert [lengths[i] for i in length_grouped_batches(lengths, 4, None)[0]] == [1, 2, 3, 4]


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(ParamError, match=r"reward_model.batch_size is 8, larger than the 3 training pairs"):
        check_sizes(RewardModelParams(batch_size=8), 3, 2, "x")
    with pytest.raises(ParamError, match=r"0 validation pair"):
        check_sizes(RewardModelParams(batch_size=1), 3, 0, "x")


@pytest.mark.parametrize("lora_r", [0, 4])
def test_a_few_steps_raise_pairwise_accuracy_and_move_every_trainable_weight(tiny_model_dir, tokenizer, lora_r):
    torch.manual_seed(0)
    params = RewardModelParams(lora_r=lora_r, lora_alpha=8, lora_dropout=0.0)
    model = _score_head_model(str(tiny_model_dir), torch.float32, params)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # the head trains with LoRA too
    before = {n: p.detach().clone() for n, p in trainable.items()}
    input_ids, attention_mask = stack_pairs(encode_pairs(tokenizer, PAIRS, 128), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2 if lora_r else 3e-3)

    def accuracy_and_loss():
        chosen, rejected = rewards(model, input_ids, attention_mask).chunk(2)
        return float((chosen > rejected).float().mean()), preference_loss(chosen, rejected)

    accuracy_before, _ = accuracy_and_loss()
    assert accuracy_before < 1.0  # a random head does not already rank this batch
    for _ in range(15):
        optimizer.zero_grad()
        accuracy_and_loss()[1].backward()
        optimizer.step()
    accuracy_after, loss_after = accuracy_and_loss()
    assert accuracy_after == 1.0 and loss_after.item() < math.log(2)
    for name, p in trainable.items():
        assert not torch.equal(p, before[name]), f"{name} did not move"


def test_training_saves_a_checkpoint_transformers_loads_with_its_normalisation(tiny_model_dir, tokenizer, tmp_path):
    params = RewardModelParams(batch_size=4, epochs=4, learning_rate=5e-3, eval_every=2, lora_r=4, lora_alpha=8,
                               max_seq_len=128)
    result = train(params, str(tiny_model_dir), "fp32", PAIRS, PAIRS[:4], tmp_path / "reward", ties_excluded=2,
                   test_pairs=PAIRS[4:7])
    m = result["metrics"]
    assert m["rm/train_pairs"] == 8 and m["rm/val_pairs"] == 4 and m["rm/ties_excluded"] == 2 and m["rm/steps"] == 8
    assert m["rm/heldout_pairs"] == 7  # validation and test together
    assert m["rm/val_loss"] < m["rm/val_loss_before"] and m["rm/train_accuracy"] > 0.5
    assert result["val_scores"].shape == (4, 2)
    assert [p["step"] for p in result["curve"]] == list(range(9)) and result["curve"][-1]["val_loss"] == m["rm/val_loss"]

    # what the stage wrote is a plain transformers classifier (LoRA merged) whose output is our reward
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    assert model.config.num_labels == 1
    stats = getattr(model.config, NORMALIZATION_KEY)
    assert stats["mean"] == pytest.approx(m["rm/reward_mean"], abs=1e-4) and stats["responses"] == 16
    input_ids, attention_mask = stack_pairs(encode_pairs(tokenizer, PAIRS[:4], 128), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = rewards(model, input_ids, attention_mask)
        theirs = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.stack(ours.chunk(2), dim=1), result["val_scores"], atol=1e-4, rtol=1e-4)
    input_ids, attention_mask = stack_pairs(encode_pairs(tokenizer, PAIRS[:7], 128), tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = rewards(model, input_ids, attention_mask).chunk(2)
    assert m["rm/heldout_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()), abs=1e-4)
    _, loaded_stats = load_reward_model(tmp_path / "reward")
    assert loaded_stats == stats


def test_a_classifier_without_normalisation_is_refused(tiny_model_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(ParamError, match=r"has no `reward_normalization`.*dvc repro reward_model"):
        load_reward_model(tmp_path / "rm")


def test_heldout_quality_gives_the_accuracy_interval_and_the_length_baseline_on_the_same_pairs():
    from rlhf.reward_model import heldout_quality
    from rlhf.stats import wilson_interval

    pairs = [Pair("p", "a longer reply", "short"), Pair("p", "same", "size"), Pair("p", "tiny", "much longer reply")]
    quality = heldout_quality(2 / 3, pairs, 0.95)
    lower, upper = wilson_interval(2, 3, 0.95)
    assert quality == {"rm/heldout_pairs": 3, "rm/heldout_accuracy": 0.6667, "rm/heldout_accuracy_lower": round(lower, 4),
                       "rm/heldout_accuracy_upper": round(upper, 4),
                       "rm/length_baseline_accuracy": 0.5}  # (1 + ½ + 0) / 3: longer, equal, shorter
