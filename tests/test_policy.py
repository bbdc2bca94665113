"""The policy stage beside PPO: GRPO, Dr. GRPO, RLOO, REINFORCE++ and DPO against hand-computed values; the reward
sources and their weighted sum; the reward model's quality gate; and, on a tiny model, every online algorithm's
exact resume and 100 NaN-free iterations, DPO lowering its loss, the over-optimisation points."""
from __future__ import annotations

import sys
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhf import policy, reward_sources
from rlhf.comparisons import Pair, preference_pairs
from rlhf.dpo import dpo_loss, ipo_loss, logratio_margin, sequence_logprob
from rlhf.objectives import (group_advantages, grpo_loss, k3_kl, leave_one_out_advantages, per_token,
                             reinforce_pp_advantages, returns_to_go, sequence_mean, token_sum_norm)
from rlhf.params import ParamError, PolicyParams, TasksParams, load_params
from rlhf.ppo import masked_mean
from rlhf.reward_sources import RewardSources, part_means, scores_prompt, weighted_reward
from rlhf.rewards import NORMALIZATION_KEY
from rlhf.verifiers import generate_tasks, task_prompt
from tests.conftest import TINY_PAIRS, build_tiny_tokenizer, write_tiny_comparisons

PROMPTS = ["what is two plus two?", "explain why the sky is blue", "write a short poem about rain",
           "what does a reward model do?"]
ONLINE = ("grpo", "rloo", "reinforce_pp")
TINY = dict(iterations=6, batch_size=4, group_size=2, minibatch_size=2, update_epochs=2, max_new_tokens=6,
            max_prompt_len=64, checkpoint_every=2, eval_every=3, eval_responses=3, learning_rate=1e-2, lora_r=4,
            lora_alpha=8, seed=3)
ARITHMETIC = TasksParams().generators


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# The equations, by hand
# ------------------------------------------------------------------------------------------------

def test_grpo_advantages_are_relative_to_the_group_and_dr_grpo_does_not_divide_by_its_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4
    # group 1: mean 0.5, std (Bessel) √(4·0.25/3) = 1/√3, so ±0.5·√3 = ±0.8660; group 2: all equal, so 0
    expected = torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 4, scale_by_std=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_rloo_baseline_is_the_mean_of_the_other_responses():
    # baselines: (2 + 3)/2 = 2.5, (1 + 3)/2 = 2, (1 + 2)/2 = 1.5 -> A = −1.5, 0, 1.5; second group: 10 − 20, 20 − 10
    rewards = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), torch.tensor([-1.5, 0.0, 1.5]))
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([10.0, 20.0]), 2), torch.tensor([-10.0, 10.0]))
    # = k/(k−1)·(r − mean r), the identity RLOO is often written with
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), 1.5 * (rewards - rewards.mean()))


def test_a_responses_advantage_covers_its_tokens_only():
    torch.testing.assert_close(per_token(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])),
                               torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_returns_to_go_by_hand():
    # γ = 0.5: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75; nothing after the last token
    returns = returns_to_go(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.5)
    torch.testing.assert_close(returns, torch.tensor([[2.75, 3.5, 3.0, 0.0]]))


def test_reinforce_pp_advantages_by_hand():
    # β = 0.5, γ = 1. Response A: one token, KL 0.2, score 1: r = −0.1 + 1 = 0.9, G = 0.9.
    # Response B: two tokens, KL (0, 0.4), score 0: r = (0, −0.2), G = (−0.2, −0.2).
    # Over the batch's 3 tokens: mean 1/6, std √(0.26889) = 0.51854 -> (√2, −1/√2, −1/√2)
    logp_ref = torch.zeros(2, 2)
    logp = torch.tensor([[0.2, 0.0], [0.0, 0.4]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    advantages = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), logp, logp_ref, 0.5, 1.0, mask)
    r = 2 ** 0.5
    torch.testing.assert_close(advantages, torch.tensor([[r, 0.0], [-1 / r, -1 / r]]), atol=1e-4, rtol=0)


def test_k3_is_zero_with_zero_slope_at_the_reference_and_positive_elsewhere():
    # π = 0.5, π_ref = 0.25: π_ref/π − log(π_ref/π) − 1 = 0.5 + log 2 − 1 = 0.19315
    assert k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(0.5 + math.log(2) - 1)
    logp = torch.tensor([-1.3], requires_grad=True)
    value = k3_kl(logp, torch.tensor([-1.3]))
    value.sum().backward()
    assert value.item() == 0.0 and logp.grad.item() == 0.0
    assert (k3_kl(torch.linspace(-3, 0, 7), torch.full((7,), -1.5)) >= 0).all()


def test_the_three_loss_averages_by_hand():
    x = torch.tensor([[1.0, 1.0, 7.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(6 / 3)  # every token alike (RLOO, REINFORCE++, PPO)
    assert sequence_mean(x, mask).item() == pytest.approx((1 + 4) / 2)  # per response, then responses (GRPO)
    assert token_sum_norm(x, mask, max_tokens=3).item() == pytest.approx(6 / (2 * 3))  # Dr. GRPO


def test_grpo_weighs_a_long_responses_tokens_less_and_dr_grpo_weighs_every_token_alike():
    """At ρ = 1 the policy term's gradient on log π(y_t) is −Â/(B·|o_i|) for GRPO and −Â/(B·L) for Dr. GRPO."""
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # lengths 1 and 2, B = 2
    advantages = per_token(torch.tensor([1.0, 1.0]), mask)
    for dr_grpo, expected in ((False, [[-0.5, 0.0], [-0.25, -0.25]]), (True, [[-0.125, 0.0], [-0.125, -0.125]])):
        logp = torch.zeros(2, 2, requires_grad=True)
        loss_pg, loss_kl = grpo_loss(logp, torch.zeros(2, 2), torch.zeros(2, 2), advantages, 0.2, mask, dr_grpo, 4)
        loss_pg.backward()
        torch.testing.assert_close(logp.grad, torch.tensor(expected))
        assert loss_kl.item() == 0.0  # the policy is the reference
    # a ratio past 1 + ε with a positive advantage is clipped: no gradient, as in PPO
    logp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss_pg, _ = grpo_loss(logp, torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.2, torch.ones(1, 1), False, 1)
    loss_pg.backward()
    assert loss_pg.item() == pytest.approx(-1.2) and logp.grad.item() == 0.0


def test_dpo_and_ipo_losses_by_hand():
    # h = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1
    h = logratio_margin(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert h.item() == 1.0
    assert dpo_loss(h, 0.5).item() == pytest.approx(math.log(1 + math.exp(-0.5)))  # −log σ(0.5) = 0.47408
    assert dpo_loss(torch.zeros(3), 0.1).item() == pytest.approx(math.log(2))  # the policy is the reference
    assert ipo_loss(h, 0.5).item() == pytest.approx(0.0)  # h is at the margin 1/(2β) = 1
    assert ipo_loss(h, 0.25).item() == pytest.approx(1.0)  # margin 2: (1 − 2)²
    # the DPO gradient on h is −β·σ(−βh): it pushes the chosen response up, the rejected one down
    margin = torch.tensor([1.0], requires_grad=True)
    dpo_loss(margin, 0.5).backward()
    assert margin.grad.item() == pytest.approx(-0.5 / (1 + math.exp(0.5)))


def test_sequence_logprob_sums_the_response_tokens():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    torch.testing.assert_close(sequence_logprob(logp, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])),
                               torch.tensor([-3.0, -0.5]))


def test_preference_pairs_orient_the_winner_and_count_the_ties():
    frame = pd.DataFrame({"pair_id": ["1", "2", "3"], "prompt": ["p", "q", "r"], "response_a": ["a1", "a2", "a3"],
                          "response_b": ["b1", "b2", "b3"], "chosen": ["a", "b", "tie"]})
    pairs, ties = preference_pairs(frame, "test.parquet")
    assert pairs == [Pair("p", "a1", "b1"), Pair("q", "b2", "a2")] and ties == 1
    frame.loc[0, "chosen"] = None
    with pytest.raises(ParamError, match=r"test.parquet: 1 row\(s\) have no valid `chosen` \(the first, pair_id '1', has"):
        preference_pairs(frame, "test.parquet")


# ------------------------------------------------------------------------------------------------
# Reward sources
# ------------------------------------------------------------------------------------------------

def test_weighted_reward_leaves_out_a_part_that_does_not_score_the_prompt():
    parts = {"rm": torch.tensor([1.0, 2.0, -1.0]), "verifier": torch.tensor([math.nan, 1.0, 0.0])}
    # open-ended prompt: 1·1 (no verifier term); task prompts: 1·2 + 2·1 = 4 and 1·(−1) + 2·0 = −1
    torch.testing.assert_close(weighted_reward(parts, {"rm": 1.0, "verifier": 2.0}), torch.tensor([1.0, 4.0, -1.0]))
    rm = torch.randn(5)
    assert torch.equal(weighted_reward({"rm": rm}, {"rm": 1.0}), rm)  # the RM alone: its score, bit for bit
    assert part_means(parts) == {"reward/rm": pytest.approx(2 / 3), "reward/verifier": 0.5}
    assert part_means({"verifier": torch.tensor([math.nan])}) == {}  # a part that scored nothing is not logged
    assert scores_prompt({"verifier": 1.0}, has_task=False) is False
    assert scores_prompt({"verifier": 1.0, "rm": 0.5}, has_task=False) and scores_prompt({"verifier": 1.0}, True)


def test_the_verifier_scores_task_prompts_and_a_reward_function_sees_their_records(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, responses, metadata):\n"
        "    return [-len(r) / 10 + (5 if m else 0) for r, m in zip(responses, metadata)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # another test's module of the same name
    task = generate_tasks(ARITHMETIC, seed=5, count=1)[0]
    prompt = task_prompt(task, "Give only the final answer.")
    sources = RewardSources({"verifier": 1.0, "my_rewards:brevity": 0.5})
    prompts = [prompt, prompt, "write a poem"]
    texts = [task.answer, "no idea", "roses"]
    empty = torch.zeros(3, 1)
    parts = sources.score(empty, empty, empty, empty, empty, 0, prompts, texts, {prompt: task.to_dict()})
    assert parts["verifier"][:2].tolist() == [1.0, 0.0] and math.isnan(parts["verifier"][2])
    assert parts["my_rewards:brevity"].tolist() == pytest.approx([-len(task.answer) / 10 + 5, -0.7 + 5, -0.5])
    with pytest.raises(ParamError, match=r"`policy.reward` part 'my_rewards:nothing'.*does not exist"):
        RewardSources({"my_rewards:nothing": 1.0})


@pytest.mark.parametrize("reward, message", [
    ({"rm": 0}, r"gives the part `rm` the weight 0; a weight must be a finite number other than 0"),
    ("rmm", r"names the part 'rmm', which is neither 'rm', 'verifier' nor a `module:function`.* Did you mean `rm`\?"),
    ("rlhf.verifiers:verifier_reward", r"names `rlhf.verifiers:verifier_reward`.*; name it `verifier`, which the stage "
                                       r"applies to the task prompts only"),
    ({}, r"is \{\}, but it must name what the policy maximises"),
])
def test_a_bad_reward_is_refused_with_the_fix(tmp_path, reward, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"policy": {"reward": reward}}))
    with pytest.raises(ParamError, match=r"params.yaml: `policy.reward` " + message):
        load_params(path)


def test_a_weighted_reward_loads():
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    assert load_params(path).policy.reward_weights == {"verifier": 1.0}  # the default cycle's
    assert PolicyParams(reward={"rm": 1, "verifier": 2.0}).reward_weights == {"rm": 1.0, "verifier": 2.0}
    assert not PolicyParams(reward="verifier").uses_reward_model
    assert not PolicyParams(algorithm="dpo").uses_reward_model


def test_group_sizes_are_checked():
    with pytest.raises(ParamError, match=r"policy.algorithm is 'grpo' with policy.group_size 1, but grpo measures"):
        policy.check_sizes(PolicyParams(algorithm="grpo"), 100, 10)
    with pytest.raises(ParamError, match=r"policy.group_size is 3, which does not divide policy.batch_size \(8\)"):
        policy.check_sizes(PolicyParams(algorithm="rloo", group_size=3, minibatch_size=2), 100, 10)
    policy.check_sizes(PolicyParams(algorithm="rloo", group_size=4), 2, 10)  # 2 prompts × 4 responses


def test_the_training_pool_mixes_tasks_in_and_drops_what_no_part_scores(monkeypatch):
    monkeypatch.setattr(policy, "load_train_prompts", lambda source: ["open 1", "open 2"])
    tasks = TasksParams()
    pool, records, left_out = policy.training_prompts(PolicyParams(task_prompts=3), tasks)
    assert pool[:2] == ["open 1", "open 2"] and len(pool) == 5 and set(pool[2:]) == set(records) and left_out == 0
    assert all(p.endswith("Give only the final answer.") for p in records)
    pool, records, left_out = policy.training_prompts(PolicyParams(task_prompts=3, reward="verifier"), tasks)
    assert pool == list(records) and left_out == 2
    with pytest.raises(ParamError, match=r"policy.reward is the verifier alone.*policy.task_prompts is 0"):
        policy.training_prompts(PolicyParams(task_prompts=0, reward="verifier"), tasks)


# ------------------------------------------------------------------------------------------------
# The reward model's quality gate
# ------------------------------------------------------------------------------------------------

def test_the_gate_trains_only_above_chance_unless_forced():
    assert policy.reward_model_gate(0.51, allow_weak=False) == (True, "above_chance")
    assert policy.reward_model_gate(0.5, allow_weak=False) == (False, "not_above_chance")
    assert policy.reward_model_gate(0.2, allow_weak=True) == (True, "forced")


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-reward")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    setattr(model.config, NORMALIZATION_KEY, {"mean": 0.0, "std": 1.0, "responses": 0})
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_the_rm_accuracy_is_measured_on_the_validation_split_when_the_rm_stage_did_not_report_it(
        tiny_reward_dir, tmp_path, monkeypatch):
    write_tiny_comparisons(tmp_path)
    monkeypatch.chdir(tmp_path)
    quality = policy.reward_model_quality(tiny_reward_dir, "fp32")
    # the tiny validation split: one judged pair each way (the ties are left out)
    assert quality["source"] == "data/comparisons/validation.parquet" and quality["pairs"] == 2
    assert quality["accuracy"] in (0.0, 0.5, 1.0) and 0 <= quality["lower"] < 0.5 < quality["upper"]
    Path("metrics").mkdir()
    Path("metrics/reward_model.json").write_text(json.dumps(
        {"rm/heldout_accuracy": 0.8, "rm/heldout_accuracy_lower": 0.7, "rm/heldout_pairs": 120}))
    reported = policy.reward_model_quality(tiny_reward_dir, "fp32")  # the reward_model stage's own figure wins
    assert (reported["accuracy"], reported["lower"], reported["pairs"], reported["source"]) == (
        0.8, 0.7, 120, "metrics/reward_model.json")


def test_the_stage_stops_before_training_on_a_weak_reward_model_and_says_so(tmp_path, monkeypatch):
    write_tiny_comparisons(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Path("params.yaml").write_text(yaml.safe_dump({"policy": {"task_prompts": 2, "gold_tasks": 2}}))
    Path("metrics").mkdir()
    Path("metrics/reward_model.json").write_text(json.dumps(
        {"rm/heldout_accuracy": 0.357, "rm/heldout_accuracy_lower": 0.163, "rm/heldout_pairs": 14}))
    with pytest.raises(ParamError, match=r"policy: stopped before training: the reward model's held-out pairwise accuracy "
                                         r"is 0.357 on 14 pairs.*lower bound of its 95% interval, 0.163, is not above 0.5"
                                         r".*`policy.allow_weak_reward_model: true`"):
        policy.main()
    metrics = json.loads(Path("metrics/policy.json").read_text())
    assert metrics["policy/stopped_before_training"] == 1 and metrics["policy/rm_gate_passed"] == 0
    assert metrics["policy/rm_accuracy_lower"] == 0.163


# ------------------------------------------------------------------------------------------------
# On a tiny model
# ------------------------------------------------------------------------------------------------

def run(tmp_path: Path, sft_dir, reward_dir, name: str, **overrides) -> dict:
    params = PolicyParams(**{**TINY, **overrides})
    return policy.train(params, "fp32", sft_dir, reward_dir, PROMPTS, PROMPTS[:2], tmp_path / name / "out",
                        tmp_path / name / "checkpoints", run_fingerprint="tiny")


@pytest.mark.parametrize("algorithm, extra", [("grpo", {}), ("grpo", {"dr_grpo": True, "grpo_kl": "reward"}),
                                              ("rloo", {}), ("reinforce_pp", {"group_size": 1})])
def test_killed_and_restarted_run_ends_with_the_same_weights(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch,
                                                              algorithm, extra):
    def no_value_model(*args, **kwargs):
        raise AssertionError("a critic-free algorithm built a value model")

    monkeypatch.setattr(policy, "build_value_model", no_value_model)
    settings = {"algorithm": algorithm, **extra}
    whole = run(tmp_path, tiny_model_dir, tiny_reward_dir, "whole", **settings)

    real_sample = policy.sample_responses
    calls = {"n": 0}

    def killed_at_iteration_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # point 0, iterations 1-3 (a point after 3), then iteration 4: after the checkpoint of 2
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(policy, "sample_responses", killed_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model_dir, tiny_reward_dir, "killed", **settings)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")] == ["iter-000002.pt"]
    monkeypatch.setattr(policy, "sample_responses", real_sample)
    resumed = run(tmp_path, tiny_model_dir, tiny_reward_dir, "killed", **settings)

    assert resumed["metrics"]["policy/resumed_from"] == 2
    assert [r["objective/kl"] for r in resumed["curve"]] == [r["objective/kl"] for r in whole["curve"]]
    assert resumed["points"] == whole["points"] and [p["iteration"] for p in whole["points"]] == [0, 3, 6]
    a = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "out" / "model.safetensors")
    sft = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(a[k], sft[k]) for k in sft if k in a)  # training did change the policy
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "value/explained_variance" not in whole["curve"][-1] and "loss/value" not in whole["curve"][-1]
    if algorithm == "grpo":
        assert "loss/kl" in whole["curve"][-1]


@pytest.mark.parametrize("algorithm", ONLINE)
def test_no_nan_or_inf_in_100_iterations_under_random_rewards(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch,
                                                              algorithm):
    def random_scores(reward_model, query, *args, **kwargs):
        return torch.randn(query.size(0)) * 10

    monkeypatch.setattr(reward_sources, "score_responses", random_scores)
    result = run(tmp_path, tiny_model_dir, tiny_reward_dir, "long", algorithm=algorithm, iterations=100, batch_size=2,
                 group_size=1 if algorithm == "reinforce_pp" else 2, minibatch_size=1, update_epochs=1,
                 max_new_tokens=4, checkpoint_every=50, eval_every=50, lora_r=0, learning_rate=1e-3, entropy_coef=0.01)
    assert len(result["curve"]) == 100
    for row in result["curve"]:
        for key, value in row.items():
            assert math.isfinite(value), (row["iteration"], key, value)
    weights = load_file(tmp_path / "long" / "out" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(math.isfinite(v) for v in result["metrics"].values())


def test_every_reward_part_is_logged_and_the_points_measure_gold_and_kl(tiny_model_dir, tiny_reward_dir, tmp_path):
    tasks = generate_tasks(ARITHMETIC, seed=5, count=4)
    instruction = "Give only the final answer."
    records = {task_prompt(t, instruction): t.to_dict() for t in tasks}
    gold = generate_tasks(ARITHMETIC, seed=6, count=3)
    params = PolicyParams(**{**TINY, "algorithm": "grpo", "reward": {"rm": 1.0, "verifier": 2.0}, "iterations": 4,
                             "eval_every": 2})
    result = policy.train(params, "fp32", tiny_model_dir, tiny_reward_dir, PROMPTS + list(records), PROMPTS[:2],
                          tmp_path / "out", tmp_path / "checkpoints", tasks=records, gold=gold, instruction=instruction)
    rows = result["curve"]
    assert all("objective/rm_score" in r and "objective/score" in r for r in rows)
    assert any("reward/verifier" in r for r in rows)  # when the batch held a task prompt
    assert [p["iteration"] for p in result["points"]] == [0, 2, 4]
    first, last = result["points"][0], result["points"][-1]
    assert first["heldout/kl"] == 0 and last["heldout/kl"] != 0
    assert {"heldout/rm_score", "heldout/gold_accuracy"} <= set(first) and "heldout/rm_score" in rows[1]
    m = result["metrics"]
    assert m["policy/gold_tasks"] == 3 and m["policy/gold_accuracy_before_lower"] <= m["policy/gold_accuracy_before"]
    assert m["policy/heldout_rm_score_before"] == round(first["heldout/rm_score"], 4)
    assert m["perf/peak_rss_mib"] > 0 and m["policy/train_task_prompts"] == 4


# ------------------------------------------------------------------------------------------------
# DPO on a tiny model
# ------------------------------------------------------------------------------------------------

DPO = dict(algorithm="dpo", batch_size=4, minibatch_size=2, dpo_epochs=6, max_new_tokens=16, max_prompt_len=64,
           learning_rate=1e-2, lora_r=4, lora_alpha=8, checkpoint_every=4, eval_every=6, eval_responses=2, seed=0)


def run_dpo(tmp_path, sft_dir, name: str, **overrides) -> dict:
    pairs = [Pair(*p) for p in TINY_PAIRS]
    return policy.train_dpo(PolicyParams(**{**DPO, **overrides}), "fp32", sft_dir, pairs, pairs, PROMPTS[:2],
                            tmp_path / name / "out", tmp_path / name / "checkpoints", "tiny", ties=3)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_lowers_its_loss_and_raises_the_margin(tiny_model_dir, tmp_path, loss):
    result = run_dpo(tmp_path, tiny_model_dir, loss, dpo_loss=loss)
    m = result["metrics"]
    assert m["policy/train_pairs"] == 12 and m["policy/ties_excluded"] == 3 and m["policy/iterations"] == 18
    assert m["policy/heldout_dpo_loss_after"] < m["policy/heldout_dpo_loss_before"]
    assert m["policy/heldout_dpo_margin_after"] > m["policy/heldout_dpo_margin_before"] == 0
    if loss == "sigmoid":
        assert m["policy/heldout_dpo_loss_before"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference
    assert result["curve"][-1]["loss/dpo"] < result["curve"][0]["loss/dpo"]
    assert m["policy/heldout_kl_per_response"] != 0
    trained = load_file(tmp_path / loss / "out" / "model.safetensors")
    sft = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(trained[k], sft[k]) for k in sft if k in trained)


def test_a_killed_dpo_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    whole = run_dpo(tmp_path, tiny_model_dir, "whole", dpo_epochs=2)
    real = policy.pair_logprobs
    calls = {"n": 0}

    def killed_at_step_5(*args, **kwargs):
        calls["n"] += 1
        # 6 + 6 reference chunks, point 0's 6 held-out chunks, then 2 per step: step 5 starts at call 27
        if calls["n"] == 27:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(policy, "pair_logprobs", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(tmp_path, tiny_model_dir, "killed", dpo_epochs=2)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")] == ["iter-000004.pt"]
    monkeypatch.setattr(policy, "pair_logprobs", real)
    resumed = run_dpo(tmp_path, tiny_model_dir, "killed", dpo_epochs=2)
    assert resumed["metrics"]["policy/resumed_from"] == 4
    assert [r["loss/dpo"] for r in resumed["curve"]] == [r["loss/dpo"] for r in whole["curve"]]
    a = load_file(tmp_path / "whole" / "out" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
