"""Verifiable tasks with a known answer: the default objective's ground truth (not a stage).

reasoning-gym's seeded generators (`basic_arithmetic`, `chain_sum`, `gsm_symbolic`, ...) make tasks whose gold answer
is known and whose dataset scores an answer (`score_answer`). From them this module gives the stages:

  generate_tasks / train_tasks / heldout_tasks   seeded tasks; held-out questions never appear among training ones
  task_prompt                                    the one place the prompt text is written
  extract_final_answer / score_response / is_correct
  judge_pair                                     the offline AI feedback for verifiable prompts: 'a' | 'b' | 'tie'
  gold_accuracy / sampled_pass_at_k / accuracy_difference
                                                 the gold figures, with their intervals
  verifier_reward / load_reward_function         the programmatic reward interface: reward(prompts, responses, metadata)

Correct means full credit from the dataset's own `score_answer` (1.0). Partial credits are not correctness:
basic_arithmetic gives len(gold)/len(answer) when the gold string sits inside a wrong answer ('5' in '15' scores
0.5), gsm_symbolic 0.01 for any number at all.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from random import Random

import reasoning_gym
from reasoning_gym.factory import DATASETS
from reasoning_gym.utils import extract_answer

from rlhf.params import ParamError, TasksParams
from rlhf.stats import paired_difference_interval, wilson_interval

DATASET_SIZE = 100_000  # indices each generator may draw per seed; fixed, so a generator's items never depend on how many are asked for
DRAWS_PER_TASK = 20     # draws allowed per task asked for before the settings count as having too few distinct questions
CORRECT = 1.0           # the score_answer value that counts as a correct response

Generate = Callable[[list[str]], list[str]]  # prompts -> one response each (the caller applies the chat template)
RewardFunction = Callable[[list[str], list[str], list[dict]], list[float]]


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    id: str          # "<generator>-<12 hex digits of sha256(generator, config, question)>": one question, one id
    generator: str   # the reasoning-gym dataset name
    config: dict     # its config as params gave it (the seed and size are the pipeline's)
    question: str
    answer: str      # the gold answer, as the generator wrote it
    metadata: dict   # the generator's metadata, which its score_answer may read

    def entry(self) -> dict:
        """The item as reasoning-gym made it, the form its score_answer takes."""
        return {"question": self.question, "answer": self.answer, "metadata": self.metadata}

    def to_dict(self) -> dict:
        """A JSON-ready record: what a stage keeps beside the prompt and passes to a reward function as metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, record: Mapping) -> Task:
        keys = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(record, Mapping) or set(record) != keys:
            got = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(
                f"a task record needs exactly the keys {sorted(keys)}, but got {got}. Task records come from "
                "rlhf.verifiers (Task.to_dict() of a generated task); only prompts made from one can be verified, so "
                "pass the verifier only those rows (open-ended prompts need the reward model or an AI judge)."
            )
        return cls(**record)


def task_id(generator: str, config: Mapping, question: str) -> str:
    """A stable id: the same question from the same generator settings has the same id, whatever the seed."""
    digest = hashlib.sha256(json.dumps([generator, config, question], sort_keys=True).encode()).hexdigest()
    return f"{generator}-{digest[:12]}"


def _dataset_seed(seed: int, position: int, generator: str) -> int:
    # reasoning-gym seeds item i with Random(seed + i), so datasets seeded s and s + 1 share all items but one;
    # hashing spreads (seed, generator) pairs across 2³², far apart
    return int.from_bytes(hashlib.sha256(f"{seed}:{position}:{generator}".encode()).digest()[:4], "big")


def _dataset(name: str, config: Mapping, where: str, seed: int, size: int):
    """reasoning-gym's dataset `name` with `config`; a setting it cannot take is a ParamError naming `where`."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ParamError(
            f"{where}.name is '{name}', which is not a reasoning-gym dataset.{hint} Tasks with a numeric answer, "
            "which the verifier reads best, include basic_arithmetic, chain_sum and gsm_symbolic; "
            "`python -c 'from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))'` lists all "
            f"{len(DATASETS)}. Fix params.yaml and run again."
        )
    config_cls = DATASETS[name][1]
    reserved = sorted({"seed", "size"} & set(config))
    if reserved:
        raise ParamError(
            f"{where}.config sets {', '.join(reserved)}, which the pipeline sets itself: the seed from "
            "tasks.train_seed or tasks.heldout_seed (that is what keeps held-out tasks apart from training ones) and "
            "the size from the number of tasks asked for. Remove it from the config and run again."
        )
    settings = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    unknown = sorted(set(config) - set(settings))
    if unknown:
        raise ParamError(
            f"{where}.config has {', '.join(unknown)}, which {name}'s {config_cls.__name__} does not take. "
            f"Its settings are: {', '.join(settings)}. Fix params.yaml and run again."
        )
    try:
        return reasoning_gym.create_dataset(name, **config, seed=seed, size=size)
    except (AssertionError, TypeError, ValueError) as error:
        raise ParamError(
            f"{where}.config {dict(config)} is refused by reasoning-gym's {config_cls.__name__}: {error or 'a check failed'}. "
            "Fix the setting it names in params.yaml and run again."
        ) from None


def generate_tasks(generators: Sequence[Mapping], seed: int, count: int, exclude: Collection[str] = ()) -> list[Task]:
    """`count` tasks with distinct questions, none of them in `exclude`, from the weighted mix of `generators`.

    Each item picks its generator with probability weight/Σweights (from Random(seed)), then takes that generator's
    next item. Deterministic in (generators, seed, exclude), and prefix-stable: the first m tasks of a call asking for
    n ≥ m are the tasks of the call asking for m.
    """
    where = [f"params.yaml: tasks.generators[{i}]" for i in range(len(generators))]
    datasets = [_dataset(g["name"], g.get("config", {}), where[i], _dataset_seed(seed, i, g["name"]), DATASET_SIZE)
                for i, g in enumerate(generators)]
    weights = [g.get("weight", 1.0) for g in generators]
    pick = Random(seed)
    next_index = [0] * len(generators)
    seen = set(exclude)
    tasks: list[Task] = []
    max_draws = DRAWS_PER_TASK * count + 100
    draws = 0
    while len(tasks) < count:
        k = pick.choices(range(len(generators)), weights=weights)[0]
        if draws == max_draws or next_index[k] == DATASET_SIZE:
            raise ParamError(
                f"tasks.generators give too few distinct questions: {draws} draws (seed {seed}) found only "
                f"{len(tasks)} of the {count} tasks asked for that differ from each other and from the {len(exclude)} "
                "left out (the held-out set). Widen the settings (more terms, digits or operators), add a generator, "
                "or ask for fewer tasks (tasks.heldout_size, or the stage's prompt count), and run again."
            )
        name, config = generators[k]["name"], generators[k].get("config", {})
        item = datasets[k][next_index[k]]
        next_index[k] += 1
        draws += 1
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        tasks.append(Task(id=task_id(name, config, item["question"]), generator=name, config=dict(config),
                          question=item["question"], answer=str(item["answer"]), metadata=item["metadata"]))
    return tasks


def heldout_tasks(params: TasksParams) -> list[Task]:
    """The held-out tasks (tasks.heldout_seed, tasks.heldout_size): the gold accuracy's yardstick."""
    return generate_tasks(params.generators, params.heldout_seed, params.heldout_size)


def train_tasks(params: TasksParams, count: int) -> list[Task]:
    """`count` tasks to collect and train on (tasks.train_seed), none with a held-out question, whatever the seeds."""
    held_out = {task.question for task in heldout_tasks(params)}
    return generate_tasks(params.generators, params.train_seed, count, exclude=held_out)


def task_prompt(task: Task, instruction: str) -> str:
    """The user message the policy sees: the question, then the instruction ("Calculate 3 + 4. Give only the final
    answer."). The caller renders it with the policy's chat template."""
    return f"{task.question} {instruction}".strip()


# ------------------------------------------------------------------------------------------------
# Scoring and the pair judge
# ------------------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")  # 1,234.5 (thousands commas) or -12.5
NUMERIC_ANSWER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_final_answer(task: Task, response: str) -> str | None:
    """The answer a response gives, as the task's score_answer should see it; None when it gives none.

    A task with a numeric gold answer: the last number of the reply ('−' read as '-', thousands commas dropped), so
    "3 + 4 = 7" gives "7". Any other task: reasoning-gym's own extraction, the text of the last <answer>…</answer>
    tags, or the whole reply, stripped, when it has no tags (what "Give only the final answer" asks for).
    """
    if NUMERIC_ANSWER.fullmatch(task.answer.strip()):
        numbers = NUMBER.findall(response.replace("\u2212", "-"))
        return numbers[-1].replace(",", "") if numbers else None
    tagged = extract_answer(response)
    return tagged if tagged is not None else response.strip()


@lru_cache(maxsize=None)
def _scorer(generator: str, config_json: str):
    return _dataset(generator, json.loads(config_json), f"the task record's generator ({generator})", seed=0, size=1)


def score_response(task: Task, response: str) -> float:
    """score_answer(extract_final_answer(response), task) of the task's own dataset, in [0, 1]."""
    dataset = _scorer(task.generator, json.dumps(task.config, sort_keys=True))
    score = float(dataset.score_answer(extract_final_answer(task, response), task.entry()))
    return min(1.0, max(0.0, score))


def is_correct(task: Task, response: str) -> bool:
    """Correct ⇔ score_response = 1 (full credit; a partial credit is a wrong answer)."""
    return score_response(task, response) >= CORRECT


def judge_pair(task: Task, response_a: str, response_b: str) -> str:
    """The verifier's verdict on two responses to one task, as the comparison schema's `chosen`: 'a' | 'b' | 'tie'.

    The correct response beats the wrong one; both correct or both wrong is a tie. There is no secondary rule
    (shorter, nearer number): it would teach the reward model a preference the verifier cannot vouch for, and a
    tie stays out of the reward model's loss (it is counted in its metrics).
    """
    a, b = is_correct(task, response_a), is_correct(task, response_b)
    return "tie" if a == b else ("a" if a else "b")


# ------------------------------------------------------------------------------------------------
# Gold figures
# ------------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples, c of them correct (Chen et al. 2021): 1 − C(n−c, k)/C(n, k).

    The chance that k of the n samples, drawn without replacement, hold a correct one; 1 when n − c < k.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k got n={n}, c={c}, k={k}; it needs 0 <= c <= n and 1 <= k <= n.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class GoldAccuracy:
    task_ids: tuple[str, ...]
    responses: tuple[str, ...]
    correct: tuple[bool, ...]
    accuracy: float   # correct / n
    lower: float      # Wilson interval at `confidence`
    upper: float
    confidence: float

    @property
    def n(self) -> int:
        return len(self.correct)


@dataclass(frozen=True)
class PassAtK:
    task_ids: tuple[str, ...]
    correct_counts: tuple[int, ...]  # correct samples of each task, out of `samples`
    samples: int
    k: int
    value: float                     # mean over tasks of pass_at_k(samples, c, k)

    @property
    def sampled_accuracy(self) -> float:
        """pass@1 under sampling: the share of all samples that are correct."""
        return sum(self.correct_counts) / (self.samples * len(self.correct_counts))


def _responses_for(generate: Generate, prompts: list[str]) -> list[str]:
    responses = list(generate(prompts))
    if len(responses) != len(prompts) or not all(isinstance(r, str) for r in responses):
        raise ValueError(
            f"the generate callable returned {len(responses)} values for {len(prompts)} prompts; it must return one "
            "response string a prompt, in the prompts' order."
        )
    return responses


def gold_accuracy(generate: Generate, tasks: Sequence[Task], instruction: str, confidence: float = 0.95) -> GoldAccuracy:
    """Share of `tasks` that `generate` (one response a prompt, greedy for the headline figure) answers correctly,
    with its Wilson interval."""
    if not tasks:
        raise ValueError("gold_accuracy needs at least one task; tasks.heldout_size sets how many are held out.")
    responses = _responses_for(generate, [task_prompt(t, instruction) for t in tasks])
    correct = tuple(is_correct(t, r) for t, r in zip(tasks, responses))
    lower, upper = wilson_interval(sum(correct), len(correct), confidence)
    return GoldAccuracy(tuple(t.id for t in tasks), tuple(responses), correct, sum(correct) / len(correct),
                        lower, upper, confidence)


def sampled_pass_at_k(sample: Generate, tasks: Sequence[Task], instruction: str, samples: int, k: int) -> PassAtK:
    """pass@k over `tasks`: `sample` answers each prompt `samples` times (the prompts come each repeated `samples`
    times in a row), and pass_at_k(samples, c, k) is averaged over the tasks."""
    if not tasks or not 1 <= k <= samples:
        raise ValueError(f"sampled_pass_at_k got {len(tasks)} tasks, samples={samples}, k={k}; it needs tasks and 1 <= k <= samples.")
    prompts = [task_prompt(t, instruction) for t in tasks for _ in range(samples)]
    responses = _responses_for(sample, prompts)
    counts = tuple(sum(is_correct(t, r) for r in responses[i * samples:(i + 1) * samples]) for i, t in enumerate(tasks))
    value = sum(pass_at_k(samples, c, k) for c in counts) / len(counts)
    return PassAtK(tuple(t.id for t in tasks), counts, samples, k, value)


def accuracy_difference(after: GoldAccuracy, before: GoldAccuracy, confidence: float = 0.95) -> tuple[float, float, float]:
    """after − before on the same tasks, with its interval: (Δ, lower, upper).

    Paired over the tasks, Δ = mean(correct_after − correct_before), with the normal interval of that mean
    (rlhf.stats.paired_difference_interval: Δ ± z·s_d/√n), not a bootstrap.
    """
    if after.task_ids != before.task_ids:
        raise ValueError(
            f"accuracy_difference compares accuracies on the same tasks in the same order, but got {after.n} and "
            f"{before.n} tasks that differ. Measure both models on one heldout_tasks(params) list."
        )
    return paired_difference_interval([float(c) for c in after.correct], [float(c) for c in before.correct], confidence)


# ------------------------------------------------------------------------------------------------
# Programmatic rewards: reward(prompts, responses, metadata) -> list[float]
# ------------------------------------------------------------------------------------------------

def verifier_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 for a correct response, 0.0 for any other; metadata[i] is the record (Task.to_dict()) of the task
    prompts[i] was made from. In params: `rlhf.verifiers:verifier_reward`."""
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(f"verifier_reward got {len(prompts)} prompts, {len(responses)} responses and {len(metadata)} "
                         "metadata records; it needs one of each per response.")
    return [float(is_correct(Task.from_dict(m), r)) for m, r in zip(metadata, responses)]


def load_reward_function(spec: str, setting: str = "the reward function") -> RewardFunction:
    """The function `spec` names as 'module:function', checked to take (prompts, responses, metadata); every call
    is checked to return one finite number per response. `setting` names the param in the errors."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise ParamError(
            f"{setting} is '{spec}', but a reward function is named as `module:function`, for example "
            "`rlhf.verifiers:verifier_reward`, or `my_rewards:brevity` for a function `brevity` in my_rewards.py in "
            "the project folder. Fix params.yaml and run again."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a module that fails to import, whatever the reason, is the user's to fix
        raise ParamError(
            f"{setting} is '{spec}', but the module '{module_name}' could not be imported "
            f"({type(error).__name__}: {error}). It must be importable where the stage runs: a .py file in the project "
            "folder (the stages run from there with `python -m`, which puts it on the path) or an installed package. "
            "Check the name, fix the error shown or install what the module imports, and run again."
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "is not callable" if hasattr(module, name) else "does not exist"
        names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ParamError(
            f"{setting} is '{spec}', but `{name}` in {module_name} {found}. The module's functions are: "
            f"{', '.join(names) or 'none'}. Name one that takes (prompts, responses, metadata) and run again."
        )
    try:
        inspect.signature(function).bind([], [], [])
    except TypeError:
        raise ParamError(
            f"{setting} is '{spec}', but {name}{inspect.signature(function)} cannot be called as "
            "reward(prompts, responses, metadata). A reward function takes three lists of one length (the prompts, "
            "the responses, and a metadata dict per prompt, the task record for verifiable prompts) and returns one "
            f"float per response: `def {name}(prompts, responses, metadata) -> list[float]`. Change it and run again."
        ) from None
    except ValueError:  # no signature to read (some builtins): the first call's check still applies
        pass

    def reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        returned = function(prompts, responses, metadata)
        try:
            values = [float(v) for v in returned]
        except (TypeError, ValueError):
            values = None
        if values is None or len(values) != len(responses) or not all(math.isfinite(v) for v in values):
            raise ValueError(
                f"the reward function {spec} returned {str(returned)[:200]} for {len(responses)} responses; it must "
                "return one finite number per response, in order. Fix the function and run again."
            )
        return values

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = function.__doc__
    return reward
