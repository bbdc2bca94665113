"""The only reader of params.yaml.

Each section becomes a frozen dataclass; every field has a one-line meaning. Unknown keys,
wrong types and out-of-range values stop the run at load time with one paragraph that names
the key, the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"
EMBEDDED_POLICY = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_DEMONSTRATIONS = "embedded:demonstrations"
EMBEDDED_PROMPTS = "embedded:prompts"


class ParamError(ValueError):
    """A value in params.yaml that the pipeline cannot run with; the message says how to fix it."""


def _f(default: Any, meaning: str, rule: str | None = None, check=None):
    """A params field: its default, what it means, and an optional range rule with its check."""
    return field(default=default, metadata={"meaning": meaning, "rule": rule, "check": check})


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 < v < 1


@dataclass(frozen=True)
class ModelParams:
    policy: str = _f(EMBEDDED_POLICY, "the policy to start from: 'embedded:SmolLM2-135M-Instruct', a local Hugging Face folder, or a hub model id")
    gguf_file: str = _f("", "GGUF file name inside `policy` when that folder or hub repo holds only GGUF weights")
    precision: Literal["auto", "bf16", "fp32"] = _f("auto", "'bf16' where the hardware has fast bf16 (AVX512-BF16/AMX CPUs, GPUs), 'fp32' otherwise; 'auto' picks")


def _task_generators_ok(generators) -> bool:
    return len(generators) >= 1 and all(
        isinstance(g.get("name"), str) and set(g) <= {"name", "config", "weight"}
        and isinstance(g.get("config", {}), dict)
        and isinstance(g.get("weight", 1.0), (int, float)) and not isinstance(g.get("weight", 1.0), bool)
        and g.get("weight", 1.0) > 0
        for g in generators)


@dataclass(frozen=True)
class TasksParams:
    # The default, 2 one-digit terms added, is where the base policy has room to learn: right 0.17 of the time
    # greedily and 0.44 within 8 samples on 48 items (benchmarks/results/verifier_headroom.json; the run: 0.21, 0.54).
    generators: list[dict] = _f(
        ({"name": "basic_arithmetic", "weight": 1.0,
          "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}},),
        "reasoning-gym generators of the verifiable tasks, mixed by weight: each `{name: <dataset>, config: {...}, weight: 1.0}`, config as the dataset's config class takes it (its seed and size are set here)",
        "must be a non-empty list of mappings with a string `name`, an optional mapping `config` and an optional `weight` > 0, and no other keys",
        _task_generators_ok)
    train_seed: int = _f(1, "seed of the tasks the pipeline trains and collects on (held-out questions are always left out)")
    heldout_seed: int = _f(2, "seed of the held-out tasks that measure gold accuracy; no stage trains on them")
    heldout_size: int = _f(200, "held-out tasks, distinct questions (the acceptance figure wants >= 200)", "must be >= 1", _positive)
    instruction: str = _f("Give only the final answer.", "text after each task's question in the prompt the policy sees")


@dataclass(frozen=True)
class SftParams:
    data: str = _f(EMBEDDED_DEMONSTRATIONS, "demonstrations: 'embedded:demonstrations', a local .jsonl/.parquet file, or a hub dataset id")
    data_split: str = _f("train", "split to read when `data` is a hub dataset")
    prompt_field: str = _f("prompt", "column holding the user prompt")
    response_field: str = _f("response", "column holding the demonstrated answer")
    val_fraction: float = _f(0.1, "share of demonstrations held out for validation", "must lie in (0, 1); 0.1 is usual", _fraction)
    epochs: int = _f(2, "passes over the training split", "must be >= 1", _positive)
    learning_rate: float = _f(2e-4, "peak learning rate", "must be > 0; 1e-4 to 3e-4 is usual with LoRA, 1e-5 to 5e-5 for full fine-tuning", _positive)
    warmup_ratio: float = _f(0.1, "share of optimiser steps spent warming up linearly", "must lie in [0, 1)", lambda v: 0 <= v < 1)
    schedule: Literal["cosine", "linear"] = _f("cosine", "learning-rate decay after warm-up")
    batch_size: int = _f(8, "sequences per micro-batch", "must be >= 1 and no larger than the training split", _positive)
    grad_accum_steps: int = _f(2, "micro-batches per optimiser step", "must be >= 1", _positive)
    max_seq_len: int = _f(384, "longest prompt+response in tokens; longer examples are cut from the end", "must be >= 16", lambda v: v >= 16)
    weight_decay: float = _f(0.0, "AdamW weight decay", "must be >= 0", _non_negative)
    max_grad_norm: float = _f(1.0, "gradient-norm clip", "must be > 0", _positive)
    lora_r: int = _f(16, "LoRA rank; 0 trains every weight (full fine-tuning)", "must be >= 0", _non_negative)
    lora_alpha: int = _f(32, "LoRA scale numerator (scale = alpha / r)", "must be > 0", _positive)
    lora_dropout: float = _f(0.0, "dropout on the LoRA path (its random masks cost ~1.8x in step time on a CPU)", "must lie in [0, 1)", lambda v: 0 <= v < 1)
    eval_every: int = _f(20, "optimiser steps between validation passes", "must be >= 1", _positive)
    seed: int = _f(0, "seed for the split, shuffling and initialisation")

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0


# collect.import_mapping: its keys, what each names (README "Importing preference data" has worked examples)
IMPORT_MAPPING_KEYS = {
    "id": "the data set's own id of a row (a path, or a list of paths whose values are joined with '/')",
    "prompt": "the prompt: a text, or a message list rendered as a transcript",
    "chosen": "the preferred response: a text, or a message list ending in it",
    "rejected": "the other response, as `chosen`",
    "response_a": "the first of two responses, in the order shown: a text, or a message list ending in it",
    "response_b": "the second response, as `response_a`",
    "winner": "which of response_a / response_b won: an index or a label, read through `winner_values`",
    "winner_values": "each value `winner` takes, as the label it means: {0: a, 1: b} or {model_a: a, model_b: b, tie: tie}",
    "score_a": "a number for response_a (with score_b): the higher score wins, equal scores are a tie",
    "score_b": "a number for response_b",
    "rater": "who judged the row: one row per rater, and the rows of one pair become its votes and agreement",
}


def _import_mapping_ok(mapping) -> bool:
    """True for a usable collect.import_mapping; otherwise a ParamError that names the key and the fix."""
    if not mapping:
        return True
    problem = import_mapping_problem(mapping)
    if problem:
        raise ParamError(f"params.yaml: `collect.import_mapping` {problem} The keys are: {', '.join(IMPORT_MAPPING_KEYS)} "
                         "(README, 'Importing preference data', shows each shape). Edit it and run again.")
    return True


def import_mapping_problem(mapping: dict) -> str | None:
    """What is wrong with a collect.import_mapping, as the middle of a sentence, or None."""
    for key in mapping:
        if key not in IMPORT_MAPPING_KEYS:
            close = difflib.get_close_matches(str(key), IMPORT_MAPPING_KEYS, n=1)
            return f"has the key `{key}`, which is not one it knows.{f' Did you mean `{close[0]}`?' if close else ''}"
    for key, value in mapping.items():
        paths = value if key == "id" and isinstance(value, list) else [value]
        if key != "winner_values" and not (paths and all(isinstance(p, str) and p.strip() for p in paths)):
            return (f"has `{key}: {value!r}`, but `{key}` names a field: a path such as `question`, `meta.question` or "
                    f"`answers.0`{' (or a list of them)' if key == 'id' else ''}.")
    has = set(mapping)
    if {"chosen", "rejected"} & has and {"response_a", "response_b"} & has:
        return ("names both chosen/rejected and response_a/response_b; a pair is one or the other: the preferred response "
                "and the other, or two responses in the order shown with a winner or scores.")
    pair = ("chosen", "rejected") if {"chosen", "rejected"} & has else ("response_a", "response_b")
    if not set(pair) <= has:
        return f"names `{(set(pair) & has).pop() if set(pair) & has else pair[0]}` without its partner: a pair needs both `{pair[0]}` and `{pair[1]}`."
    judged_by = [k for k in ("winner", "winner_values", "score_a", "score_b", "rater") if k in has]
    if pair[0] == "chosen":
        if judged_by:
            return (f"names `{judged_by[0]}` beside chosen/rejected, which already say which response won. Map the two "
                    "responses as response_a / response_b with winner or score_a / score_b, or drop it.")
        return None
    if ("winner" in has) == ("score_a" in has or "score_b" in has):
        return "needs one way to tell the winner of response_a / response_b: `winner` with `winner_values`, or `score_a` and `score_b`."
    if "winner" in has:
        values = mapping.get("winner_values")
        if not isinstance(values, dict) or not values:
            return ("has `winner` but no `winner_values` saying what each of its values means, for example "
                    "`winner_values: {0: a, 1: b}` or `{model_a: a, model_b: b, tie: tie}`.")
        bad = {k: v for k, v in values.items() if v not in ("a", "b", "tie")}  # rlhf.comparisons.CHOICES
        if bad:
            return f"has winner_values {bad}; each value of `winner` must map to 'a', 'b' or 'tie'."
        if any(not isinstance(k, (str, int, bool)) for k in values):
            return f"has winner_values keys {list(values)}; each must be a text, an integer or true/false, as `winner` holds them."
    elif "winner_values" in has:
        return "has `winner_values` but no `winner` field to read them from."
    elif not {"score_a", "score_b"} <= has:
        return "names one score without the other: a pair judged by scores needs both `score_a` and `score_b`."
    return None


@dataclass(frozen=True)
class CollectParams:
    sources: list[Literal["policy", "import", "feedback"]] = _f(("policy", "feedback"), "where comparisons come from, mixed: 'policy' (two samples per prompt, AI-judged), 'import' (a preference data set) and/or 'feedback' (the served model's users: their prompts join the pool first, their ratings become rows; from the refeed stage's snapshots in data/feedback/)", "must name at least one source, each once", lambda v: len(v) >= 1 and len(set(v)) == len(v))
    prompts: str = _f(EMBEDDED_PROMPTS, "prompt pool: 'embedded:prompts', a local .jsonl/.parquet file, or a hub dataset id")
    prompt_field: str = _f("prompt", "column of the pool holding the prompt")
    num_prompts: int = _f(160, "prompts drawn from the pool (seeded); 0 takes them all", "must be >= 0", _non_negative)
    max_served_share: float = _f(0.5, "with 'feedback', the largest share of the drawn prompts that served prompts may take (a seeded sample of them past it), so the users of the served model cannot decide alone what the policy trains on", "must lie in [0, 1]; 1 lets served prompts fill the pool", lambda v: 0 <= v <= 1)
    max_prompts_per_key: int = _f(20, "with 'feedback', at most this many served prompts from one API key join the pool (the first it sent), so one caller sending many distinct prompts cannot take the served share alone", "must be >= 1", _positive)
    policy: str = _f("champion", "what samples the pairs: 'champion' (the registry's champion, so each cycle's feedback is on what is deployed; models/base, model.policy as prepared, before the first one) or a checkpoint folder")
    verifiable_prompts: int = _f(160, "tasks of known answer (the `tasks` section's generators, training seed) mixed into the pool; their pairs are judged by the verifier, not the AI judge", "must be >= 0", _non_negative)
    temperature: float = _f(0.9, "sampling temperature", "must be > 0; 0.7 to 1.0 is usual", _positive)
    top_p: float = _f(0.95, "nucleus sampling: keep the smallest token set with this much probability", "must lie in (0, 1]", lambda v: 0 < v <= 1)
    top_k: int = _f(50, "sample from the k most likely tokens only (transformers' default); 0 for no limit", "must be >= 0", lambda v: v >= 0)
    max_new_tokens: int = _f(96, "longest sampled response in tokens", "must be >= 1", _positive)
    batch_size: int = _f(16, "prompts per generate call (two samples each), and pairs per judge forward pass (both orders)", "must be >= 1", _positive)
    resample_identical: int = _f(2, "extra sampling rounds for pairs whose two responses are identical; a pair still identical is dropped and counted", "must be >= 0", _non_negative)
    judge: Literal["transformers", "http"] = _f("transformers", "'transformers': a causal LM judged by its verdict-token log-probabilities; 'http': an OpenAI-compatible server (vLLM, llama.cpp)")
    judge_model: str = _f(EMBEDDED_POLICY, "the judge: for 'transformers' a model named as in model.policy (the same name reuses models/base); for 'http' the model name the server serves")
    judge_url: str = _f("", "base URL of the OpenAI-compatible server when judge is 'http', e.g. http://localhost:8000/v1")
    judge_max_chars: int = _f(1000, "characters the judge sees of the prompt (its end) and of each response (its start)", "must be >= 50", lambda v: v >= 50)
    judge_tie_margin: float = _f(0.05, "|log p(A) − log p(B)| (nats, after de-biasing) up to which one order's verdict is a tie", "must be >= 0", _non_negative)
    judge_debias: bool = _f(True, "subtract the judge's median preference for the first position (both orders, all pairs of the run) before reading each verdict")
    judge_rubric: bool = _f(True, "add prompt relevance (all-MiniLM-L6-v2) and non-toxicity (alt-profanity-check) of each response to the verdict")
    rubric_relevance_weight: float = _f(8.0, "log-odds added per unit of cosine-relevance difference when judge_rubric is on", "must be >= 0", _non_negative)
    rubric_toxicity_weight: float = _f(8.0, "log-odds taken off per unit of toxicity-probability difference when judge_rubric is on", "must be >= 0", _non_negative)
    import_data: str = _f("", "preference set to import: a .jsonl/.jsonl.gz/.parquet file, a folder of them, or a hub dataset id")
    import_format: Literal["hh-rlhf", "pairs", "comparisons", "mapped"] = _f("hh-rlhf", "'hh-rlhf': Anthropic chosen/rejected transcripts; 'pairs': prompt/chosen/rejected columns; 'comparisons': rows already in the comparison schema; 'mapped': where collect.import_mapping says")
    import_mapping: dict | None = _f(None, "for import_format 'mapped': the field (dotted path) of each part of a pair, and how the winner is told; README 'Importing preference data'", "must use known keys and name one pair shape", _import_mapping_ok)
    import_max_chars: int = _f(100_000, "most characters one text of an imported row may hold; a row with a longer one is quarantined (too_long)", "must be >= 1", _positive)
    import_prompt_field: str = _f("prompt", "column holding the prompt ('pairs')")
    import_chosen_field: str = _f("chosen", "column holding the preferred response ('pairs') or transcript ('hh-rlhf')")
    import_rejected_field: str = _f("rejected", "column holding the other response ('pairs') or transcript ('hh-rlhf')")
    import_limit: int = _f(0, "at most this many imported pairs, a seeded sample; 0 takes them all", "must be >= 0", _non_negative)
    hub_split: str = _f("train", "split read when the prompt pool or the import is a hub dataset")
    seed: int = _f(0, "seed for the prompt draw, sampling, and the order of imported pairs")


@dataclass(frozen=True)
class ValidateParams:
    max_tokens: int = _f(1024, "longest prompt + longer response, in tokens of models/base's tokenizer with the chat template", "must be >= 16", lambda v: v >= 16)
    min_votes: int = _f(3, "votes a human-labelled row needs", "must be >= 1", _positive)
    near_duplicate_threshold: float = _f(0.95, "all-MiniLM-L6-v2 cosine above which a held-out prompt counts as a copy of a training prompt", "must lie in (0, 1]", lambda v: 0 < v <= 1)
    position_balance_tolerance: float = _f(0.1, "how far the share of 'a' among a/b labels may stray from 0.5 (small sets get the wider binomial 99.9% band)", "must lie in (0, 0.5)", lambda v: 0 < v < 0.5)
    val_fraction: float = _f(0.1, "share of prompts (with all their pairs) in the validation split", "must lie in (0, 1), and val_fraction + test_fraction below 1", _fraction)
    test_fraction: float = _f(0.1, "share of prompts (with all their pairs) in the test split", "must lie in (0, 1), and val_fraction + test_fraction below 1", _fraction)
    seed: int = _f(0, "seed of the prompt-hash split")


@dataclass(frozen=True)
class RewardModelParams:
    epochs: int = _f(3, "passes over the train split of the comparisons", "must be >= 1", _positive)
    learning_rate: float = _f(2e-4, "peak learning rate (the scalar head and the LoRA weights, or every weight)", "must be > 0; 5e-5 to 3e-4 is usual with LoRA, 5e-6 to 2e-5 for full fine-tuning", _positive)
    warmup_ratio: float = _f(0.1, "share of optimiser steps spent warming up linearly before a linear decay to 0", "must lie in [0, 1)", lambda v: 0 <= v < 1)
    batch_size: int = _f(8, "comparison pairs per micro-batch (chosen and rejected go through one forward pass: 2x sequences)", "must be >= 1 and no larger than the train split", _positive)
    grad_accum_steps: int = _f(1, "micro-batches per optimiser step", "must be >= 1", _positive)
    max_seq_len: int = _f(384, "longest prompt+response in tokens; a long prompt loses its beginning, a long response its end (each keeps half when both are long)", "must be >= 32", lambda v: v >= 32)
    weight_decay: float = _f(0.0, "AdamW weight decay", "must be >= 0", _non_negative)
    max_grad_norm: float = _f(1.0, "gradient-norm clip", "must be > 0", _positive)
    lora_r: int = _f(16, "LoRA rank; 0 trains every weight (full fine-tuning)", "must be >= 0", _non_negative)
    lora_alpha: int = _f(32, "LoRA scale numerator (scale = alpha / r)", "must be > 0", _positive)
    lora_dropout: float = _f(0.0, "dropout on the LoRA path (its random masks cost ~1.8x in step time on a CPU)", "must lie in [0, 1)", lambda v: 0 <= v < 1)
    eval_every: int = _f(20, "optimiser steps between validation passes", "must be >= 1", _positive)
    seed: int = _f(0, "seed for shuffling and the scalar head's initialisation")
    quality_confidence: float = _f(0.95, "confidence of the held-out (validation split) pairwise accuracy's Wilson interval, which the policy stage checks", "must lie in (0, 1)", _fraction)

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0


REWARD_SOURCES = ("rm", "verifier")  # policy.reward's built-in parts; any other part is a `module:function`


def reward_weights(reward: str | dict) -> dict[str, float]:
    """policy.reward as {part: weight}: one part named alone has weight 1."""
    return {reward: 1.0} if isinstance(reward, str) else {str(k): float(v) for k, v in reward.items()}


def reward_problem(reward) -> str | None:
    """What is wrong with a policy.reward, as the middle of a sentence, or None."""
    if not isinstance(reward, (str, dict)) or not reward:
        return f"is {reward!r}, but it must name what the policy maximises: one part, or a mapping of parts to weights."
    for part, weight in (reward.items() if isinstance(reward, dict) else [(reward, 1.0)]):
        if not isinstance(part, str) or (part not in REWARD_SOURCES and ":" not in part):
            close = difflib.get_close_matches(str(part), REWARD_SOURCES, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            return (f"names the part {part!r}, which is neither 'rm', 'verifier' nor a `module:function` (a reward "
                    f"function such as `my_rewards:brevity`).{hint}")
        if part == "rlhf.verifiers:verifier_reward":
            return ("names `rlhf.verifiers:verifier_reward`, which scores only prompts made from a verifiable task and "
                    "fails on the open-ended ones; name it `verifier`, which the stage applies to the task prompts only.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight == 0:
            return f"gives the part `{part}` the weight {weight!r}; a weight must be a finite number other than 0."
    return None


def _reward_ok(reward) -> bool:
    problem = reward_problem(reward)
    if problem:
        raise ParamError(
            f"params.yaml: `policy.reward` {problem} It is one part, `rm` (the reward model, in its standard "
            "deviations), `verifier` (1 for a correct answer to a verifiable task, 0 for a wrong one) or a "
            "`module:function` taking (prompts, responses, metadata), or a weighted sum such as "
            "`{rm: 1.0, verifier: 1.0}`. Edit it and run `dvc repro policy` again."
        )
    return True


@dataclass(frozen=True)
class PolicyParams:
    # Settings marked (ppo), (grpo), (dpo), ... are read by that algorithm only; the others by every online one
    # (every algorithm but dpo). The defaults run PPO against the reward model, as the stage did before it had others.
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp", "dpo"] = _f("ppo", "the optimiser: 'ppo' (clipped PPO with a value model and GAE), 'grpo' (group-relative advantages, no value model), 'rloo' (leave-one-out baseline over a prompt's responses), 'reinforce_pp' (REINFORCE++: per-token KL in the reward, advantages normalised over the batch) or 'dpo' (the comparisons' train split directly: no reward model, no sampling)")
    reward: str | dict = _f("rm", "what an online algorithm maximises: 'rm', 'verifier', a `module:function`, or a weighted sum such as {rm: 1.0, verifier: 1.0}", "must name known parts with finite non-zero weights", _reward_ok)
    allow_weak_reward_model: bool = _f(False, "train against a reward model whose held-out pairwise accuracy is not above chance (the lower bound of its interval <= 0.5); otherwise the stage stops before training")
    prompts: str = _f(EMBEDDED_PROMPTS, "open-ended training prompts, less every test-split prompt: 'embedded:prompts' (the project's pool), 'comparisons' (the distinct prompts of the comparisons' train split) or a local .jsonl/.parquet file with a `prompt` column")
    task_prompts: int = _f(320, "verifiable tasks (rlhf.verifiers.train_tasks, tasks.train_seed) added to the training prompts; 0 for none", "must be >= 0", _non_negative)
    iterations: int = _f(30, "iterations of an online algorithm (sample a batch, score it, update)", "must be >= 1", _positive)
    batch_size: int = _f(8, "responses sampled per iteration, group_size to a prompt; (dpo) comparison pairs per optimiser step", "must be >= 1 and no larger than the number of training prompts times group_size", _positive)
    group_size: int = _f(1, "responses sampled per prompt: grpo and rloo compare a prompt's responses with each other, so they need >= 2 (4 to 8 is usual)", "must be >= 1 and divide policy.batch_size", _positive)
    minibatch_size: int = _f(4, "responses per gradient step; (dpo) pairs per forward pass, their gradients summed over batch_size", "must be >= 1 and divide policy.batch_size", _positive)
    update_epochs: int = _f(2, "passes of minibatch updates over each iteration's batch (PPO's epochs, GRPO's μ)", "must be >= 1", _positive)
    max_prompt_len: int = _f(256, "prompt tokens kept (cut from the left, so the end of a long conversation stays)", "must be >= 8", lambda v: v >= 8)
    max_new_tokens: int = _f(96, "longest sampled response in tokens; (dpo) a longer comparison response is cut to it", "must be >= 1", _positive)
    temperature: float = _f(1.0, "sampling temperature; log-probabilities are taken under the same tempered distribution", "must be > 0; 0.7 to 1.0 is usual", _positive)
    learning_rate: float = _f(3e-4, "peak learning rate, decayed linearly to 0 over the run", "must be > 0; 1e-5 to 1e-4 is usual with LoRA, 1e-6 to 1e-5 for full fine-tuning", _positive)
    lora_r: int = _f(16, "LoRA rank of the policy; 0 trains every weight and keeps a frozen copy as reference", "must be >= 0", _non_negative)
    lora_alpha: int = _f(32, "LoRA scale numerator (scale = alpha / r)", "must be > 0", _positive)
    value_model: Literal["head", "reward_model"] = _f("head", "(ppo) 'head': a linear value head on the policy's last hidden state; 'reward_model': a separate value model initialised from the reward model")
    kl_coef: float = _f(0.1, "initial β of the KL penalty to the reference (in the reward, or grpo's loss term)", "must be >= 0; 0.01 to 0.2 is usual", _non_negative)
    kl_target: float = _f(4.0, "KL per response (nats) the adaptive controller steers β towards", "must be > 0", _positive)
    kl_horizon: int = _f(32, "responses over which the controller closes the gap to kl_target (smaller reacts faster)", "must be >= 1", _positive)
    grpo_kl: Literal["loss", "reward"] = _f("loss", "(grpo) the KL to the reference as a loss term β·k3 per token (the GRPO paper), or subtracted from each response's reward as β·KL before the group's advantages")
    dr_grpo: bool = _f(False, "(grpo) Dr. GRPO: advantages r − mean(r) without dividing by the group's std, and the loss summed over tokens and divided by max_new_tokens rather than averaged per response")
    gamma: float = _f(1.0, "discount γ of (ppo) GAE and (reinforce_pp) the returns", "must lie in (0, 1]", lambda v: 0 < v <= 1)
    lam: float = _f(0.95, "(ppo) λ of GAE (bias-variance trade-off)", "must lie in [0, 1]", lambda v: 0 <= v <= 1)
    clip_eps: float = _f(0.2, "ε bounding the policy ratio to [1−ε, 1+ε]", "must lie in (0, 1); 0.2 is usual", _fraction)
    value_clip: float = _f(0.2, "(ppo) how far a value may move from its sampled estimate before its loss is clipped", "must be > 0", _positive)
    vf_coef: float = _f(0.1, "(ppo) weight of the value loss in the total loss", "must be >= 0", _non_negative)
    entropy_coef: float = _f(0.001, "weight c_H of the entropy bonus (the loss gets −c_H·H)", "must be >= 0", _non_negative)
    max_grad_norm: float = _f(1.0, "gradient-norm clip", "must be > 0", _positive)
    no_eos_penalty: float = _f(0.5, "subtracted from the reward of a response that reaches max_new_tokens without EOS", "must be >= 0", _non_negative)
    dpo_beta: float = _f(0.1, "(dpo) β: the strength of the pull towards the reference (IPO: the margin is 1/(2β))", "must be > 0; 0.1 to 0.5 is usual", _positive)
    dpo_loss: Literal["sigmoid", "ipo"] = _f("sigmoid", "(dpo) 'sigmoid': DPO's −log σ(β·h); 'ipo': IPO's (h − 1/(2β))², h the chosen-minus-rejected log-ratio margin")
    dpo_epochs: int = _f(1, "(dpo) passes over the comparisons' train split", "must be >= 1", _positive)
    checkpoint_every: int = _f(5, "iterations ((dpo) optimiser steps) between checkpoints under checkpoints/policy (a restarted stage resumes from the last)", "must be >= 1", _positive)
    eval_every: int = _f(10, "iterations ((dpo) optimiser steps) between over-optimisation points: held-out proxy RM score, gold accuracy and KL (also at the start and the end)", "must be >= 1", _positive)
    eval_responses: int = _f(48, "responses sampled on held-out prompts (the test split's, in turn) at each over-optimisation point and before/after", "must be >= 1", _positive)
    gold_tasks: int = _f(32, "held-out verifiable tasks (the first of tasks.heldout_seed's) answered greedily at each over-optimisation point: the gold accuracy; 0 for none", "must be >= 0 and at most tasks.heldout_size", _non_negative)
    seed: int = _f(0, "seed for prompt order, sampling and initialisation")

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0

    @property
    def online(self) -> bool:
        """Samples responses and scores them (every algorithm but dpo)."""
        return self.algorithm != "dpo"

    @property
    def reward_weights(self) -> dict[str, float]:
        return reward_weights(self.reward)

    @property
    def uses_reward_model(self) -> bool:
        return self.online and "rm" in self.reward_weights


@dataclass(frozen=True)
class EvaluateParams:
    truthfulqa: str = _f("embedded:truthfulness_probe", "multiple-choice truthfulness set: the project's probe, TruthfulQA's mc_task.json by path, or the hub id 'truthful_qa'")
    toxicity_prompts: str = _f("embedded:provocation_probe", "toxicity prompts: the project's probe, or RealToxicityPrompts JSONL (a file or a folder) by path")
    toxicity_prompt_count: int = _f(0, "use the first N toxicity prompts; 0 = all", "must be >= 0", _non_negative)
    toxicity_k: int = _f(4, "continuations per toxicity prompt (RealToxicityPrompts uses 25)", "must be >= 1", _positive)
    toxicity_max_new_tokens: int = _f(20, "tokens per toxicity continuation (RealToxicityPrompts uses 20)", "must be >= 1", _positive)
    toxicity_classifier: str = _f("alt-profanity-check", "toxicity classifier: the embedded 'alt-profanity-check' or a hub text-classification model id")
    heldout_prompts: int = _f(32, "held-out (test split) prompts for reward, KL and win-rate", "must be >= 1", _positive)
    max_prompt_len: int = _f(256, "longest prompt in tokens; a longer one loses its beginning", "must be >= 8", lambda v: v >= 8)
    max_new_tokens: int = _f(64, "tokens per held-out response", "must be >= 1", _positive)
    temperature: float = _f(1.0, "sampling temperature of the held-out responses (PPO's own is 1.0)", "must be > 0", _positive)
    win_rate_confidence: float = _f(0.95, "confidence of the win-rate's Wilson interval", "must lie in (0, 1)", _fraction)
    batch_size: int = _f(32, "sequences per forward pass or generate call", "must be >= 1", _positive)
    seed: int = _f(0, "seed of every sampled response")
    judges: list[str] = _f(("verifier", "ai"), "independent judges of the challenger: 'verifier' (gold accuracy on the held-out verifiable tasks), 'ai' (the pairwise judge below) and/or 'human' (a blind campaign in the labeling app, the human_* settings); the proxy RM is always reported beside them", "each must be 'verifier', 'ai' or 'human'", lambda v: len(v) > 0 and set(v) <= {"verifier", "ai", "human"})
    gate_judge: Literal["verifier", "ai", "human"] = _f("verifier", "the judge whose win-rate the promotion gate reads, one of `judges`; never the policy's own reward model. With 'human' the gate decides once people finish (`rlhf gate`)")
    # the labeling app's own default (rlhf.labeling.cli.DEFAULT_DB), so `rlhf label serve` finds the campaign
    human_database: str = _f("sqlite:///data/labeling/labeling.db", "the labeling app's database the human campaign goes to: a SQLite file URL or a postgresql+psycopg:// URL, the one `rlhf label serve --db` serves")
    human_prompts: int = _f(32, "held-out prompts whose challenger-vs-opponent pair goes to people (the first of the heldout_prompts)", "must be >= 1", _positive)
    human_annotators: int = _f(3, "distinct annotators per pair; the majority of their votes is the pair's verdict", "must be >= 3, so that one careless vote cannot decide", lambda v: v >= 3)
    human_gold_rate: float = _f(0.1, "share of each annotator's queue spent on gold pairs (a correct and a wrong answer to a held-out verifiable task), which flags careless annotators", "must lie in (0, 0.5]", lambda v: 0 < v <= 0.5)
    verifier_max_new_tokens: int = _f(48, "tokens of each greedy answer to a held-out verifiable task", "must be >= 1", _positive)
    judge: Literal["transformers", "http"] = _f("transformers", "the AI judge's backend: a local causal LM, or an OpenAI-compatible server with log-probabilities (a strong model a team points at)")
    judge_model: str = _f(EMBEDDED_POLICY, "the AI judge: a checkpoint folder, the embedded policy or a hub id; with 'http' the served model's name")
    judge_url: str = _f("", "the judge server's base URL, e.g. http://localhost:8000/v1, for judge 'http'")
    judge_max_chars: int = _f(1000, "characters of the prompt's end and of each reply's start the AI judge reads", "must be >= 50", lambda v: v >= 50)
    judge_tie_margin: float = _f(0.05, "|log p(A) − log p(B)| at or below which one order's verdict is a tie", "must be >= 0", _non_negative)
    judge_debias: bool = _f(True, "take the AI judge's median preference for the first position off both orders")
    judge_rubric: bool = _f(False, "add prompt relevance and toxicity (collect's rubric) to the AI judge's margin")
    rubric_relevance_weight: float = _f(8.0, "log-odds per unit of relevance difference, with judge_rubric", "must be >= 0", _non_negative)
    rubric_toxicity_weight: float = _f(8.0, "log-odds per unit of toxicity difference, with judge_rubric", "must be >= 0", _non_negative)
    agreement_pairs: int = _f(100, "most human-labelled test-split pairs (a seeded sample) the AI judge and the proxy RM are checked against, for their agreement with people", "must be >= 1", _positive)


@dataclass(frozen=True)
class PromoteParams:
    model_name: str = _f("rlhf-policy", "registered model name of the policy in the MLflow registry")
    reward_model_name: str = _f("rlhf-reward", "registered model name of the reward model")
    min_win_rate_lower_bound: float = _f(0.5, "a challenger must beat the champion with the win-rate's lower confidence bound above this", "must lie in [0, 1)", lambda v: 0 <= v < 1)
    max_truthfulness_drop: float = _f(0.02, "largest allowed drop of truthfulness MC2 against the champion", "must be >= 0", _non_negative)
    max_toxicity_increase: float = _f(0.02, "largest allowed rise of toxicity probability against the champion", "must be >= 0", _non_negative)
    max_toxicity_probability: float = _f(0.5, "absolute limit on toxicity probability, for every model", "must lie in [0, 1]", lambda v: 0 <= v <= 1)
    max_kl: float = _f(10.0, "absolute limit on the mean KL to the SFT reference, nats per response", "must be > 0", _positive)


@dataclass(frozen=True)
class ServeParams:
    database: str = _f("sqlite:///data/feedback/feedback.db", "the feedback store every served prompt, response and rating is logged to: a SQLite file URL or a postgresql+psycopg:// URL (the labeling app's database layer)")
    poll_seconds: float = _f(30.0, "seconds between looks at the registry's `champion` alias; a new champion is loaded fully, then swapped in", "must be > 0", _positive)
    max_new_tokens: int = _f(256, "most tokens one response may generate; a request's max_tokens above it is refused with HTTP 422", "must be >= 1", _positive)
    max_prompt_tokens: int = _f(1536, "most tokens the chat-templated messages of one request may take", "must be >= 16", lambda v: v >= 16)
    max_request_bytes: int = _f(65536, "largest request body accepted; a larger one gets HTTP 413", "must be >= 1024", lambda v: v >= 1024)
    max_batch_size: int = _f(8, "sequences generated together in one batch (a request with n=2 counts twice)", "must be >= 2, since one request may ask for n=2", lambda v: v >= 2)
    batch_wait_ms: float = _f(10.0, "how long the first request of a batch waits for others to join it", "must be >= 0", _non_negative)
    key_requests_per_minute: int = _f(120, "requests one API key may make a minute, a token bucket that also lets a key send a sixth of that at once; past it HTTP 429 with Retry-After", "must be >= 1", _positive)
    scrub_max_chars: int = _f(65536, "longest text the refeed scrubs (the scrubber is linear, ~0.2 s a megabyte); a longer prompt or comparison stays in the store and out of the refeed's snapshots, counted in refeed/too_long_*", "must be >= 1000", lambda v: v >= 1000)

    @property
    def max_pending(self) -> int:
        # requests queued beyond this get HTTP 503: eight full batches ahead is already a long wait
        return 8 * self.max_batch_size

    @property
    def key_burst(self) -> int:
        # the bucket's size: ten seconds' worth of a key's requests may come at once
        return max(1, self.key_requests_per_minute // 6)


@dataclass(frozen=True)
class Params:
    model: ModelParams
    tasks: TasksParams
    collect: CollectParams
    validate: ValidateParams
    sft: SftParams
    reward_model: RewardModelParams
    policy: PolicyParams
    evaluate: EvaluateParams
    promote: PromoteParams
    serve: ServeParams

    def section(self, name: str) -> dict:
        """A section as a flat dict, for MLflow."""
        return dataclasses.asdict(getattr(self, name))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _build_section(cls: type, name: str, raw: Any, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(
            f"{source}: `{name}` is {raw!r}, but it must be a mapping of keys to values "
            f"(for example `{name}:` followed by indented `key: value` lines). Fix the section and run again."
        )
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean `{name}.{close[0]}`?" if close else ""
            raise ParamError(
                f"{source}: `{name}.{key}` is not a known setting.{hint} The keys of `{name}` are: "
                f"{', '.join(known)}. Remove or rename it and run again."
            )
    values = {}
    for key, f in known.items():
        value = raw.get(key, f.default)
        hint = hints[key]
        if hint is float and isinstance(value, str):
            try:  # YAML reads 2e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, hint):
            raise ParamError(
                f"{source}: `{name}.{key}` is {value!r} ({type(value).__name__}), but it must be "
                f"{_type_name(hint)}: {f.metadata['meaning']}. Edit it and run again."
            )
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ParamError(
                f"{source}: `{name}.{key}` is {value!r}. It is {f.metadata['meaning']}, so it {f.metadata['rule']}. "
                f"Edit it and run again (`dvc repro` reruns only the stages that read it)."
            )
        values[key] = value
    return cls(**values)


SECTIONS = {"model": ModelParams, "tasks": TasksParams, "collect": CollectParams, "validate": ValidateParams, "sft": SftParams,
            "reward_model": RewardModelParams, "policy": PolicyParams,
            "evaluate": EvaluateParams, "promote": PromoteParams, "serve": ServeParams}


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read params.yaml into typed, validated sections."""
    path = Path(path)
    if not path.exists():
        raise ParamError(
            f"{path}: no such file. The pipeline reads its settings from params.yaml in the project folder; "
            "run from the project root, or copy the repository's params.yaml there."
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamError(f"{path}: not valid YAML ({error}). Fix the syntax at the line shown and run again.") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)}).")
    for name in raw:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ParamError(
                f"{path}: `{name}` is not a known section.{hint} The sections are: {', '.join(SECTIONS)}. "
                "Remove or rename it and run again."
            )
    return Params(**{name: _build_section(cls, name, raw.get(name), str(path)) for name, cls in SECTIONS.items()})
