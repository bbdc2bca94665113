"""PPO (the policy stage with `algorithm: ppo`): each equation against hand-computed values, rollouts on a tiny model,
stability, and exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhf import policy, prompts, reward_sources, rollouts
from rlhf.chat import prompt_ids, reply_suffix
from rlhf.params import ParamError, PolicyParams, load_params
from rlhf.ppo import (adaptive_kl_coef, approx_kl, clip_fraction, clipped_policy_loss, explained_variance, gae, kl_penalty,
                      masked_mean, token_rewards, value_loss, whiten)
from rlhf.rewards import NORMALIZATION_KEY
from rlhf.rollouts import (LinearLogprobEntropy, cut_at_eos, pad_left, policy_forward, sample_responses, sample_tokens,
                           token_entropy, token_logprobs)
from tests.conftest import build_tiny_tokenizer

PROMPTS = ["what is two plus two?", "explain why the sky is blue", "write a short poem about rain",
           "what does a reward model do?"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads collapse on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(iterations=6, batch_size=4, minibatch_size=2, update_epochs=2, max_new_tokens=6, max_prompt_len=64,
            checkpoint_every=2, eval_responses=3, learning_rate=1e-2, lora_r=4, lora_alpha=8, seed=3)


# ------------------------------------------------------------------------------------------------
# The equations, by hand
# ------------------------------------------------------------------------------------------------

def test_kl_penalty_is_beta_times_the_log_ratio():
    logp, logp_ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(logp, logp_ref, 0.1), torch.tensor([0.05, -0.1]))


def test_token_rewards_put_the_score_on_the_last_response_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logp_ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = token_rewards(torch.tensor([5.0, 7.0]), logp, logp_ref, 0.5, mask)
    # −β·KL per token: row 0 has KL (1, 0), row 1 has (0, 2, 0); the score lands on tokens 1 and 2
    torch.testing.assert_close(r, torch.tensor([[-0.5, 5.0, 0.0], [0.0, -1.0, 7.0]]))


def test_gae_hand_example():
    # δ2 = 2 − 1 = 1, A2 = 1; δ1 = 0 + 0.5·1 − 1 = −0.5, A1 = −0.5 + 0.25·1 = −0.25;
    # δ0 = 1 + 0.5·1 − 0.5 = 1, A0 = 1 + 0.25·(−0.25) = 0.9375
    advantages, returns = gae(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.0]]),
                              torch.ones(1, 3), gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.9375, -0.25, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.4375, 0.75, 2.0]]))


def test_gae_with_gamma_and_lambda_one_is_returns_minus_values():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).float()
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rewards_to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, (rewards_to_go - values) * mask)


def test_gae_matches_a_plain_loop():
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    lengths = [7, 4, 1, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        for t in range(7):
            if t >= n:
                assert advantages[b, t] == 0 and returns[b, t] == 0
                continue
            expected = 0.0
            for k in range(t, n):  # A_t = Σ_k (γλ)^(k−t) δ_k
                next_value = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_value - values[b, k].item()
                expected += (gamma * lam) ** (k - t) * delta
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + values[b, t].item(), abs=1e-5)


def test_whitening_gives_zero_mean_unit_variance_on_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0, abs=1e-6)
    assert (valid ** 2).mean().item() == pytest.approx(1, abs=1e-5)
    assert w[~mask.bool()].abs().sum() == 0


def _ratio_gradient(ratio: float, advantage: float, eps: float = 0.2) -> tuple[float, float]:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), eps, torch.ones(1, 1))
    loss.backward()
    return loss.item(), logp.grad.item()


def test_a_ratio_outside_the_clip_range_gets_zero_gradient():
    loss, grad = _ratio_gradient(1.5, advantage=1.0)  # wants a higher ratio, but it is already past 1 + ε
    assert loss == pytest.approx(-1.2) and grad == 0.0
    loss, grad = _ratio_gradient(0.5, advantage=-1.0)  # wants a lower ratio, but it is already below 1 − ε
    assert loss == pytest.approx(0.8) and grad == 0.0
    # the pessimistic side is never clipped: a ratio past 1 + ε with a negative advantage is pulled back
    loss, grad = _ratio_gradient(1.5, advantage=-1.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)  # d(−ρA)/d log ρ = −ρA
    loss, grad = _ratio_gradient(1.1, advantage=2.0)  # inside the range: the plain surrogate
    assert loss == pytest.approx(-2.2) and grad == pytest.approx(-2.2)


def test_policy_loss_ignores_masked_tokens():
    logp = torch.tensor([[0.0, 5.0]])
    loss = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 100.0]]), 0.2, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)


def test_value_loss_is_clipped_around_the_old_value():
    ones = torch.ones(1, 1)
    # V moved from 0 to 1 and R = 1: unclipped error 0, clipped V = 0.2 → error 0.64; the max wins: ½·0.64
    v = torch.tensor([[1.0]], requires_grad=True)
    loss = value_loss(v, torch.zeros(1, 1), ones, 0.2, ones)
    loss.backward()
    assert loss.item() == pytest.approx(0.32) and v.grad.item() == 0.0
    # inside the clip range it is the plain ½(V − R)²
    v = torch.tensor([[0.1]], requires_grad=True)
    loss = value_loss(v, torch.zeros(1, 1), ones, 0.2, ones)
    loss.backward()
    assert loss.item() == pytest.approx(0.405) and v.grad.item() == pytest.approx(-0.9)


def test_entropy_of_uniform_and_of_certain_distributions():
    logits = torch.stack([torch.zeros(4), torch.tensor([0.0, -1e4, -1e4, -1e4])]).unsqueeze(0)  # (1, 2, 4)
    entropy = token_entropy(logits.log_softmax(dim=-1))
    assert entropy[0, 0].item() == pytest.approx(math.log(4))
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(entropy, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(4))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert token_entropy(p.log()).item() == pytest.approx(1.5 * math.log(2))


def _logprob_entropy_unfused(hidden, weight, tokens, temperature):
    logp_all = ((hidden @ weight.to(hidden.dtype).T).float() / temperature).log_softmax(dim=-1)
    return token_logprobs(logp_all, tokens), token_entropy(logp_all)


@pytest.mark.parametrize("dtype, weight_dtype, temperature, chunk", [
    (torch.float32, torch.float32, 1.0, 3), (torch.float32, torch.float32, 0.7, 64),
    (torch.bfloat16, torch.bfloat16, 1.0, 4), (torch.bfloat16, torch.float32, 0.9, 4)])
def test_fused_logprobs_and_entropy_match_the_full_log_softmax_in_value_and_gradient(dtype, weight_dtype,
                                                                                    temperature, chunk):
    """LinearLogprobEntropy against autograd through the whole (T, V) log-softmax, under any mix of upstream
    gradients on log π(y) and H, chunk sizes that do and do not divide T; an fp32 head with bf16 hidden states
    (full fine-tuning under autocast) gets its gradient in fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 16).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16) * 0.5).to(weight_dtype).requires_grad_()
    tokens = torch.randint(0, 50, (10,))
    g_logp, g_entropy = torch.randn(10), torch.randn(10)

    def values_and_grads(function):
        logp, entropy = function()
        (logp * g_logp + entropy * g_entropy).sum().backward()
        out = (logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
        return out

    fused = values_and_grads(lambda: LinearLogprobEntropy.apply(hidden, weight, tokens, temperature, chunk))
    unfused = values_and_grads(lambda: _logprob_entropy_unfused(hidden, weight, tokens, temperature))
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in zip(fused, unfused):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tolerance)


def test_approx_kl_and_clip_fraction_by_hand():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.9]]))
    mask = torch.ones(1, 3)
    expected = ((1.5 - 1 - math.log(1.5)) + (0.9 - 1 - math.log(0.9))) / 3
    assert approx_kl(logp, logp_old, mask).item() == pytest.approx(expected, rel=1e-5)
    assert clip_fraction(logp, logp_old, 0.2, mask).item() == pytest.approx(1 / 3)


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, kl=4.0, target=4.0, horizon=100, n_responses=10) == pytest.approx(0.1)
    # KL far above target: the error is clipped to +0.2, so β grows by 0.2·n/horizon
    assert adaptive_kl_coef(0.1, kl=40.0, target=4.0, horizon=100, n_responses=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=3.6, target=4.0, horizon=100, n_responses=10) == pytest.approx(0.1 * 0.99)


# ------------------------------------------------------------------------------------------------
# Rollouts on a tiny model
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_response_mask_ends_at_the_first_eos():
    eos, pad = 2, 0
    generated = torch.tensor([[7, 8, eos, 9], [eos, eos, eos, eos], [7, 8, 9, 10]])
    responses, mask, ended = cut_at_eos(generated, [eos], pad)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    assert responses.tolist() == [[7, 8, eos, pad], [eos, pad, pad, pad], [7, 8, 9, 10]]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_tokens_follow_the_tempered_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1e9, 0.5]).log_softmax(dim=-1)  # token 3 has probability 0
    expected = (logits / temperature).softmax(dim=-1)
    torch.manual_seed(0)
    draws = sample_tokens(logits.expand(40_000, -1), temperature)
    frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert frequencies[3] == 0
    # 40,000 draws: each frequency within 5 standard errors of its probability
    standard_error = (expected * (1 - expected) / draws.numel()).sqrt()
    assert ((frequencies - expected).abs() <= 5 * standard_error + 1e-12).all(), (frequencies, expected)


def test_sampling_stops_when_every_row_has_ended_and_pads_after_eos(tiny_model_dir, tokenizer):
    from rlhf.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    query, query_mask = pad_left([prompt_ids(tokenizer, p, 64) for p in PROMPTS[:3]], tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # an EOS-loving model: every row ends at once
        model.lm_head.weight[eos] += 50 * model.lm_head.weight.norm(dim=1).max()
    responses, mask, ended = sample_responses(model, query, query_mask, 8, 1.0, [eos], tokenizer.pad_token_id)
    assert ended.all() and responses.size(1) < 8
    assert (responses[mask == 0] == tokenizer.pad_token_id).all()


def test_reply_suffix_is_what_the_template_puts_after_eos(tokenizer):
    assert tokenizer.decode(reply_suffix(tokenizer)) == "\n"


def test_forward_logprobs_are_those_generation_sampled_from(tiny_model_dir, tokenizer):
    """Left-padded queries: the forward pass must use the positions generation used, or ratios are off."""
    from rlhf.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    query, query_mask = pad_left([prompt_ids(tokenizer, p, 64) for p in PROMPTS[:3]], tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(input_ids=query, attention_mask=query_mask, do_sample=True, top_k=0, top_p=1.0,
                         temperature=0.7, max_new_tokens=5, min_new_tokens=5, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    responses = out.sequences[:, query.size(1):]
    sampled_logp_all = (torch.stack(out.logits, dim=1) / 0.7).log_softmax(dim=-1)
    with torch.no_grad():
        logp, entropy, hidden = policy_forward(model, query, query_mask, responses, torch.ones_like(responses), 0.7)
    torch.testing.assert_close(logp, token_logprobs(sampled_logp_all, responses), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, token_entropy(sampled_logp_all), atol=1e-4, rtol=1e-4)
    assert hidden.shape == (*responses.shape, model.config.hidden_size)


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny randomly initialised reward model with its normalisation, as the reward_model stage writes it."""
    folder = tmp_path_factory.mktemp("tiny-reward")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    setattr(model.config, NORMALIZATION_KEY, {"mean": 0.0, "std": 1.0, "responses": 0})
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def run_ppo(tmp_path: Path, sft_dir, reward_dir, name: str, **overrides) -> dict:
    params = PolicyParams(**{**TINY, **overrides})
    return policy.train(params, "fp32", sft_dir, reward_dir, PROMPTS, PROMPTS[:2], tmp_path / name / "out",
                     tmp_path / name / "checkpoints", run_fingerprint="tiny")


def test_reference_is_the_sft_model_while_the_policy_moves(tiny_model_dir, tiny_reward_dir, tmp_path, tokenizer):
    from rlhf.models import load_causal_lm

    result = run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "run", iterations=2)
    assert result["metrics"]["policy/heldout_kl_per_response"] != 0  # the policy moved away from the reference
    # the two held-out prompts are taken in turn until eval_responses
    assert result["metrics"]["policy/heldout_prompts"] == 2 and result["metrics"]["policy/heldout_responses"] == 3
    trained = load_causal_lm(tmp_path / "run" / "out")
    sft = load_causal_lm(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), sft.parameters()))
    # LoRA: the reference is the policy with its adapter off, so it must equal the untouched SFT model
    params = PolicyParams(**TINY)
    model, reference = policy.build_policy(str(tiny_model_dir), torch.float32, params)
    assert reference is None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
        query, query_mask = pad_left([prompt_ids(tokenizer, p, 64) for p in PROMPTS], tokenizer.pad_token_id)
        responses = torch.randint(3, len(tokenizer), (4, 5))
        mask = torch.ones_like(responses)
        from accelerate import Accelerator

        logp_ref = policy.reference_logprobs(Accelerator(cpu=True), model, None, query, query_mask, responses, mask, 1.0)
        logp_sft = policy_forward(sft, query, query_mask, responses, mask, 1.0)[0]
        logp_policy = policy_forward(model, query, query_mask, responses, mask, 1.0)[0]
    torch.testing.assert_close(logp_ref, logp_sft)
    assert not torch.allclose(logp_policy, logp_sft)


def test_no_nan_or_inf_in_100_iterations_under_random_rewards(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    def random_scores(reward_model, query, *args, **kwargs):
        return torch.randn(query.size(0)) * 10

    monkeypatch.setattr(reward_sources, "score_responses", random_scores)
    result = run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "long", iterations=100, batch_size=2, minibatch_size=1,
                     update_epochs=1, max_new_tokens=4, checkpoint_every=50, lora_r=0, learning_rate=1e-3,
                     entropy_coef=0.01)
    assert len(result["curve"]) == 100
    for row in result["curve"]:
        for key, value in row.items():
            if key != "value/explained_variance":  # undefined (nan) when every return is equal
                assert math.isfinite(value), (row["iteration"], key, value)
    weights = load_file(tmp_path / "long" / "out" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(math.isfinite(v) for v in result["metrics"].values())


@pytest.mark.parametrize("lora_r, value_model", [(4, "head"), (0, "reward_model")])
def test_killed_and_restarted_run_ends_with_the_same_weights(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch,
                                                              lora_r, value_model):
    whole = run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "whole", lora_r=lora_r, value_model=value_model)

    real_sample = policy.sample_responses
    calls = {"n": 0}

    def killed_at_iteration_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the held-out point 0, iterations 1 and 2 (checkpointed), then iteration 3: lost
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(policy, "sample_responses", killed_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "killed", lora_r=lora_r, value_model=value_model)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")] == ["iter-000002.pt"]
    monkeypatch.setattr(policy, "sample_responses", real_sample)
    resumed = run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "killed", lora_r=lora_r, value_model=value_model)

    assert resumed["metrics"]["policy/resumed_from"] == 2
    assert resumed["curve"][-1]["objective/kl"] == whole["curve"][-1]["objective/kl"]
    a = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "out" / "model.safetensors")
    sft = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], sft[k]) for k in sft if k in a)  # training did change the policy
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_from_other_params_is_not_resumed(tiny_model_dir, tiny_reward_dir, tmp_path, capsys):
    run_ppo(tmp_path, tiny_model_dir, tiny_reward_dir, "run", iterations=2)
    params = PolicyParams(**{**TINY, "iterations": 2})
    result = policy.train(params, "fp32", tiny_model_dir, tiny_reward_dir, PROMPTS, PROMPTS[:2], tmp_path / "out2",
                       tmp_path / "run" / "checkpoints", run_fingerprint="other")
    assert result["metrics"]["policy/resumed_from"] == 0
    assert "made with other params or inputs; starting from scratch" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Params
# ------------------------------------------------------------------------------------------------

def test_minibatch_must_divide_the_batch():
    with pytest.raises(ParamError, match=r"policy.minibatch_size is 3, which does not divide policy.batch_size \(8\)"):
        policy.check_sizes(PolicyParams(batch_size=8, minibatch_size=3), 100, 10)
    with pytest.raises(ParamError, match=r"policy.batch_size 8 with group_size 1 takes 8 prompts an iteration, more than "
                                         r"the 5 distinct training prompts"):
        policy.check_sizes(PolicyParams(batch_size=8, minibatch_size=4), 5, 10)


@pytest.mark.parametrize("key, value, message", [
    ("kl_coef", -0.1, r"`policy.kl_coef` is -0.1\. .* must be >= 0"),
    ("clip_eps", 1.5, r"`policy.clip_eps` is 1.5\. It is ε bounding the policy ratio .* must lie in \(0, 1\)"),
    ("gamma", 0.0, r"`policy.gamma` is 0.0\. .* must lie in \(0, 1\]"),
    ("value_model", "critic", r"`policy.value_model` is 'critic' .* one of 'head', 'reward_model'"),
])
def test_out_of_range_ppo_params_are_refused(tmp_path, key, value, message):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"policy": {key: value}}))
    with pytest.raises(ParamError, match=message):
        load_params(path)


def test_out_of_range_reward_model_params_are_refused(tmp_path):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"reward_model": {"learning_rate": 0}}))
    with pytest.raises(ParamError, match=r"`reward_model.learning_rate` is 0\. .* must be > 0"):
        load_params(path)


def test_training_prompts_from_a_file_never_include_a_test_prompt(tmp_path, monkeypatch):
    import pandas as pd

    from rlhf.comparisons import write_comparisons

    rows = [{"pair_id": p, "prompt": p, "response_a": "x", "response_b": "y", "chosen": "a", "source": "judge:t",
             "policy_version": None, "votes": None, "agreement": None,
             "created_at": pd.Timestamp("2026-01-01", tz="UTC")} for p in ("p1", "p2")]
    write_comparisons(pd.DataFrame(rows), tmp_path / "test.parquet")
    monkeypatch.setattr(prompts, "TEST_COMPARISONS", tmp_path / "test.parquet")
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "p0"}\n{"prompt": "p1"}\n{"prompt": "p3"}\n{"prompt": "p0"}\n{"prompt": " "}\n')
    train_prompts, heldout = prompts.held_out_prompts(prompts.load_train_prompts(str(source)), 10, seed=0)
    assert train_prompts == ["p0", "p3"] and sorted(heldout) == ["p1", "p2"]
    with pytest.raises(ParamError, match=r"policy.prompts is 'nowhere.txt', which is neither 'embedded:prompts', 'comparisons' nor"):
        prompts.load_train_prompts("nowhere.txt")
    pool = prompts.load_train_prompts("embedded:prompts")  # the project's pool, as collect draws from it
    assert len(pool) == len(set(pool)) > 300 and all(p.strip() for p in pool)


def test_lora_merged_generates_with_the_policy_and_restores_the_base_weights_bit_exact(tiny_model_dir):
    model, _ = policy.build_policy(str(tiny_model_dir), torch.bfloat16, PolicyParams(lora_r=4, lora_alpha=8))
    with torch.no_grad():  # a non-zero adapter, as after some PPO updates
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        with rollouts.lora_merged(model):
            merged = model(input_ids=ids).logits.float()
        after = model(input_ids=ids).logits.float()
    assert torch.allclose(merged, unmerged, atol=0.1)  # the same policy, up to bf16 rounding of W + BA
    assert not torch.equal(merged, unmerged)  # the merge really happened
    assert torch.equal(after, unmerged)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_full_fine_tuning_samples_from_a_bf16_copy_refreshed_with_the_current_weights(tiny_model_dir):
    params = PolicyParams(lora_r=0)
    assert rollouts.build_sampler(str(tiny_model_dir), torch.float32, uses_lora=False) is None  # fp32: the policy itself
    assert rollouts.build_sampler(str(tiny_model_dir), torch.bfloat16, uses_lora=True) is None
    model, _ = policy.build_policy(str(tiny_model_dir), torch.bfloat16, params)
    sampler = rollouts.build_sampler(str(tiny_model_dir), torch.bfloat16, params.uses_lora)
    with torch.no_grad():  # the policy after some updates
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    rollouts.refreshed(sampler, model)
    pairs = list(zip(sampler.named_parameters(), model.named_parameters(), strict=True))
    assert all(ns == np_ and s.dtype == torch.bfloat16 and torch.equal(s, p.to(torch.bfloat16))
               for (ns, s), (np_, p) in pairs)
    assert not any(s.requires_grad for s in sampler.parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits.float()
        got = sampler(input_ids=ids).logits.float()
    assert torch.allclose(got, expected, atol=0.1)  # the same policy, up to bf16 rounding of the residual stream


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; the other tests here run in fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_bf16_full_fine_tuning_iteration_runs(tiny_model_dir, tiny_reward_dir, tmp_path, fresh_accelerator_state):
    params = PolicyParams(**{**TINY, "lora_r": 0, "iterations": 1, "checkpoint_every": 1})
    result = policy.train(params, "bf16", tiny_model_dir, tiny_reward_dir, PROMPTS, PROMPTS[:2], tmp_path / "out",
                       tmp_path / "checkpoints", run_fingerprint="tiny")
    assert all(math.isfinite(v) for k, v in result["curve"][-1].items() if isinstance(v, float))
