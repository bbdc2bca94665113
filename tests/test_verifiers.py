"""Verifiable tasks: seeded generation, scoring, the pair judge, pass@k and the intervals against hand values."""
from __future__ import annotations

import itertools
import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rlhf import verifiers
from rlhf.params import ParamError, TasksParams, load_params
from rlhf.stats import paired_difference_interval, wilson_interval
from rlhf.verifiers import Task

REPO = Path(__file__).resolve().parents[1]
ARITHMETIC = [{"name": "basic_arithmetic", "weight": 1.0,
               "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}}]


def task(answer: str, generator: str = "basic_arithmetic", question: str = "Calculate x.") -> Task:
    return Task(id="t", generator=generator, config={}, question=question, answer=answer, metadata={})


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds():
    first = verifiers.generate_tasks(ARITHMETIC, seed=0, count=50)
    assert first == verifiers.generate_tasks(ARITHMETIC, seed=0, count=50)
    other = verifiers.generate_tasks(ARITHMETIC, seed=1, count=50)
    # reasoning-gym seeds item i with seed + i; unhashed, seeds 0 and 1 would share 49 of 50 questions
    shared = {t.question for t in first} & {t.question for t in other}
    assert len(shared) < 10
    assert len({t.question for t in first}) == 50 and len({t.id for t in first}) == 50


def test_generation_is_prefix_stable_and_ids_follow_the_question():
    few, many = verifiers.generate_tasks(ARITHMETIC, 3, 10), verifiers.generate_tasks(ARITHMETIC, 3, 40)
    assert many[:10] == few
    t = few[0]
    assert t.id == verifiers.task_id("basic_arithmetic", ARITHMETIC[0]["config"], t.question)
    assert t.id.startswith("basic_arithmetic-") and t.answer and t.metadata["source_dataset"] == "basic_arithmetic"


@pytest.mark.parametrize("train_seed, heldout_seed", [(1, 2), (7, 7)])
def test_train_and_heldout_questions_are_disjoint(train_seed, heldout_seed):
    params = TasksParams(generators=ARITHMETIC, train_seed=train_seed, heldout_seed=heldout_seed, heldout_size=200)
    heldout = verifiers.heldout_tasks(params)
    train = verifiers.train_tasks(params, 400)
    assert len(heldout) == 200 and len(train) == 400
    assert not {t.question for t in heldout} & {t.question for t in train}


def test_weights_mix_generators():
    mix = [{"name": "chain_sum", "config": {"max_terms": 2, "max_digits": 2}, "weight": 3.0},
           {"name": "gsm_symbolic", "weight": 1.0}]
    tasks = verifiers.generate_tasks(mix, seed=0, count=200)
    share = sum(t.generator == "chain_sum" for t in tasks) / len(tasks)
    assert 0.65 < share < 0.85  # 0.75 expected
    gsm = next(t for t in tasks if t.generator == "gsm_symbolic")
    assert gsm.config == {} and verifiers.is_correct(gsm, f"It is {gsm.answer}")


def test_settings_with_too_few_questions_say_so():
    one_digit = [{"name": "chain_sum", "config": {"min_terms": 1, "max_terms": 1, "min_digits": 1, "max_digits": 1}}]
    assert len(verifiers.generate_tasks(one_digit, 0, 10)) == 10  # the ten questions "0 =" ... "9 ="
    with pytest.raises(ParamError, match="too few distinct questions: .* only 10 of the 11"):
        verifiers.generate_tasks(one_digit, 0, 11)


@pytest.mark.parametrize("generator, message", [
    ({"name": "basic_arithmatic"}, r"tasks.generators\[0\].name is 'basic_arithmatic', .* Did you mean basic_arithmetic"),
    ({"name": "chain_sum", "config": {"seed": 3}}, r"config sets seed, which the pipeline sets itself"),
    ({"name": "chain_sum", "config": {"max_term": 3}}, r"config has max_term, which chain_sum's ChainSumConfig does not take\. Its settings are: min_terms, max_terms"),
    ({"name": "chain_sum", "config": {"min_terms": 3, "max_terms": 2}}, r"refused by reasoning-gym's ChainSumConfig: max_terms must be >= min_terms"),
])
def test_bad_generator_settings_name_the_fix(generator, message):
    with pytest.raises(ParamError, match=message):
        verifiers.generate_tasks([generator], 0, 5)


def test_the_tasks_section_loads_and_rejects_bad_entries(tmp_path):
    params = load_params(REPO / "params.yaml").tasks
    assert params.heldout_size >= 200 and params.train_seed != params.heldout_seed
    assert len(verifiers.heldout_tasks(params)) == params.heldout_size
    for bad in ({"name": "chain_sum", "weight": 0}, {"name": "chain_sum", "size": 3}, {"config": {}}):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({"tasks": {"generators": [bad]}}))
        with pytest.raises(ParamError, match=r"`tasks.generators` is .* must be a non-empty list of mappings"):
            load_params(path)


def test_the_prompt_is_the_question_then_the_instruction():
    t = task("7", question="Calculate 3 + 4.")
    assert verifiers.task_prompt(t, "Give only the final answer.") == "Calculate 3 + 4. Give only the final answer."
    assert verifiers.task_prompt(t, "") == "Calculate 3 + 4."


# ------------------------------------------------------------------------------------------------
# Scoring and the pair judge
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, score", [
    ("7", 1.0), ("The answer is 7.", 1.0), ("3 + 4 = 7", 1.0), ("7, no wait, 8", 0.0),
    ("8", 0.0), ("banana", 0.0), ("", 0.0), ("17", 1 / 2),  # basic_arithmetic's own partial credit: '7' in '17'
])
def test_scoring_right_wrong_and_garbled_answers(response, score):
    t = task("7")
    assert verifiers.score_response(t, response) == pytest.approx(score)
    assert verifiers.is_correct(t, response) is (score == 1.0)


def test_signs_and_thousands():
    negative = task("-6")
    assert verifiers.is_correct(negative, "-(7 - 1) = -6") and verifiers.is_correct(negative, "\u22126")
    assert not verifiers.is_correct(negative, "6")
    assert verifiers.is_correct(task("1583", "chain_sum"), "That makes 1,583.")


def test_gsm_symbolic_gives_credit_for_any_number_but_it_is_not_correct():
    t = task("44", "gsm_symbolic")
    assert verifiers.score_response(t, "so 44") == 1.0
    assert verifiers.score_response(t, "43") == pytest.approx(0.01) and not verifiers.is_correct(t, "43")


def test_a_text_answer_uses_the_tags_or_else_the_whole_reply():
    t = task("noremopyh", "spell_backward")
    assert verifiers.extract_final_answer(t, "Thinking... <answer>noremopyh</answer>") == "noremopyh"
    assert verifiers.is_correct(t, "  Noremopyh\n") and not verifiers.is_correct(t, "hypomeron")


def test_the_pair_judge_prefers_the_correct_response_and_ties_otherwise():
    t = task("7")
    assert verifiers.judge_pair(t, "7", "8") == "a"
    assert verifiers.judge_pair(t, "8", "It is 7") == "b"
    assert verifiers.judge_pair(t, "7", "3 + 4 = 7") == "tie"
    assert verifiers.judge_pair(t, "8", "17") == "tie"  # a partial credit is still wrong


# ------------------------------------------------------------------------------------------------
# Gold figures and intervals
# ------------------------------------------------------------------------------------------------

def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_against_hand_values_and_enumeration():
    assert verifiers.pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert verifiers.pass_at_k(8, 2, 2) == pytest.approx(13 / 28)  # 1 − C(6,2)/C(8,2) = 1 − 15/28
    assert verifiers.pass_at_k(5, 2, 3) == pytest.approx(0.9)      # 1 − C(3,3)/C(5,3) = 1 − 1/10
    assert verifiers.pass_at_k(8, 0, 8) == 0.0 and verifiers.pass_at_k(8, 1, 8) == 1.0
    for n, c, k in itertools.product(range(1, 8), range(0, 8), range(1, 8)):
        if c <= n and k <= n:
            assert verifiers.pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(n, c, k))
    with pytest.raises(ValueError):
        verifiers.pass_at_k(4, 5, 1)


def test_wilson_interval_against_hand_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10, 0.99) == pytest.approx((0.1842, 0.8158), abs=1e-4)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(3, 0)


def test_paired_difference_interval_against_hand_values():
    # d = (1, 0, 1, 0): mean 0.5, s_d = √(1/3), half-width 1.959964·0.57735/2 = 0.56579
    mean, lower, upper = paired_difference_interval([1, 1, 1, 0], [0, 1, 0, 0])
    assert (mean, lower, upper) == pytest.approx((0.5, 0.5 - 0.56579, 0.5 + 0.56579), abs=1e-5)
    assert paired_difference_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference_interval([1, 0], [1])


def test_gold_accuracy_pass_at_k_and_their_difference():
    tasks = verifiers.generate_tasks(ARITHMETIC, 0, 10)
    gold = {verifiers.task_prompt(t, "Answer."): t.answer for t in tasks}
    right_on_even = lambda prompts: [gold[p] if i % 2 == 0 else "no idea" for i, p in enumerate(prompts)]
    always_right = lambda prompts: [f"= {gold[p]}" for p in prompts]

    before = verifiers.gold_accuracy(right_on_even, tasks, "Answer.")
    assert before.correct == (True, False) * 5 and before.accuracy == 0.5 and before.n == 10
    assert (before.lower, before.upper) == pytest.approx(wilson_interval(5, 10))
    after = verifiers.gold_accuracy(always_right, tasks, "Answer.")
    assert verifiers.accuracy_difference(after, before) == pytest.approx(paired_difference_interval([1] * 10, [1, 0] * 5))
    with pytest.raises(ValueError, match="same tasks"):
        verifiers.accuracy_difference(after, verifiers.gold_accuracy(always_right, tasks[:9], "Answer."))

    # each prompt comes 4 times in a row, so right_on_even gets 2 of each task's 4 samples right
    sampled = verifiers.sampled_pass_at_k(right_on_even, tasks[:3], "Answer.", samples=4, k=2)
    assert sampled.correct_counts == (2, 2, 2)
    assert sampled.value == pytest.approx(verifiers.pass_at_k(4, 2, 2)) and sampled.sampled_accuracy == 0.5
    with pytest.raises(ValueError, match="one response string a prompt"):
        verifiers.gold_accuracy(lambda prompts: prompts[:-1], tasks, "Answer.")


# ------------------------------------------------------------------------------------------------
# Reward functions
# ------------------------------------------------------------------------------------------------

def test_the_verifier_reward_through_the_loader():
    reward = verifiers.load_reward_function("rlhf.verifiers:verifier_reward")
    tasks = verifiers.generate_tasks(ARITHMETIC, 0, 2)
    prompts = [verifiers.task_prompt(t, "") for t in tasks]
    records = [t.to_dict() for t in tasks]
    assert reward(prompts, [tasks[0].answer, "wrong"], records) == [1.0, 0.0]
    with pytest.raises(ValueError, match="a task record needs exactly the keys"):
        reward(prompts[:1], ["1"], [{"prompt_id": 3}])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        LIMIT = 3

        def brevity(prompts, responses, metadata):
            return [-len(r) for r in responses]

        def two_args(prompts, responses):
            return [0.0 for _ in responses]

        def too_few(prompts, responses, metadata):
            return [1.0]

        def not_numbers(prompts, responses, metadata):
            return ["high" for _ in responses]
    """))
    (tmp_path / "broken_rewards.py").write_text("import not_a_package_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_rewards", "broken_rewards"):  # another test's module of the same name may be imported already
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_users_reward_function_loads_and_is_checked(user_module):
    brevity = verifiers.load_reward_function("my_rewards:brevity", "ppo.reward_function")
    assert brevity(["p", "q"], ["ab", "abcd"], [{}, {}]) == [-2.0, -4.0]
    with pytest.raises(ValueError, match=r"returned \[1.0\] for 2 responses; it must return one finite number"):
        verifiers.load_reward_function("my_rewards:too_few")(["p", "q"], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="returned \\['high'\\]"):
        verifiers.load_reward_function("my_rewards:not_numbers")(["p"], ["a"], [{}])


@pytest.mark.parametrize("spec, message", [
    ("my_rewards.brevity", r"ppo.reward_function is 'my_rewards.brevity', but a reward function is named as `module:function`"),
    ("no_such_module:f", r"the module 'no_such_module' could not be imported \(ModuleNotFoundError"),
    ("broken_rewards:f", r"the module 'broken_rewards' could not be imported \(ModuleNotFoundError: No module named 'not_a_package_anywhere'"),
    ("my_rewards:brevty", r"`brevty` in my_rewards does not exist\. The module's functions are: brevity, not_numbers, too_few, two_args"),
    ("my_rewards:LIMIT", r"`LIMIT` in my_rewards is not callable"),
    ("my_rewards:two_args", r"two_args\(prompts, responses\) cannot be called as reward\(prompts, responses, metadata\)"),
])
def test_the_loader_explains_what_is_wrong(user_module, spec, message):
    with pytest.raises(ParamError, match=message):
        verifiers.load_reward_function(spec, "ppo.reward_function")


def test_tasks_params_are_frozen():
    params = TasksParams()
    with pytest.raises(Exception):
        params.heldout_size = 3
    assert replace(params, heldout_size=3).heldout_size == 3
    assert math.isclose(params.generators[0]["weight"], 1.0)
