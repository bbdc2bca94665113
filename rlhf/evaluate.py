"""Stage `evaluate`: base, SFT, the challenger and the registry's champion, side by side, by yardsticks the
policy never trained on.

Per policy: held-out RM score and KL to the SFT reference (`rlhf.rollouts.heldout_rollouts` on the test
split's prompts), TruthfulQA MC1/MC2 (`rlhf.truthfulqa`), toxicity of sampled continuations (`rlhf.toxicity`).
The challenger's win-rate against the champion (against SFT on the first cycle) comes with its Wilson interval.

Metric names: `eval/<figure>` for the challenger (the gate reads these), `compare/<policy>/<figure>` for every
policy, e.g. `eval/truthfulqa_mc2`, `eval/provocation_probe_toxicity_probability`, `eval/win_rate_vs_sft_lower`.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import mlflow

from rlhf import tracking
from rlhf.chat import reply_suffix
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.models import load_causal_lm
from rlhf.params import load_params
from rlhf.paths import BASE_DIR, POLICY_CURVES, POLICY_DIR, REWARD_DIR, SFT_DIR
from rlhf.prompts import held_out_prompts
from rlhf.registry import champion_checkpoint
from rlhf.rewards import load_reward_model, normalised, score_responses
from rlhf.rollouts import Rollouts, eos_ids, heldout_rollouts, kl_per_response, policy_forward, sample_responses
from rlhf.stage import run_stage
from rlhf.toxicity import (expected_maximum_toxicity, load_toxicity_classifier, sample_continuations, score_toxicity,
                           toxicity_probability, toxicity_source)
from rlhf.truthfulqa import truthfulness_source, truthfulqa_scores

log = logging.getLogger(__name__)
STAGE_METRICS = "metrics/evaluate.json"
REPORT_DIR = "reports/evaluate"
CHALLENGER = "challenger"  # the policy stage's output, models/policy


# ------------------------------------------------------------------------------------------------
# Win-rate
# ------------------------------------------------------------------------------------------------

def win_rate(scores_challenger: Sequence[float], scores_champion: Sequence[float]) -> float:
    # win rate = (1/n) Σ_i (1[c_i > h_i] + ½·1[c_i = h_i]), paired by prompt
    if len(scores_challenger) != len(scores_champion) or not scores_challenger:
        raise ValueError(
            f"win_rate pairs scores by prompt, but got {len(scores_challenger)} challenger and {len(scores_champion)} "
            "champion scores. Score both models on the same non-empty list of held-out prompts."
        )
    wins = sum(1.0 if c > h else 0.5 if c == h else 0.0 for c, h in zip(scores_challenger, scores_champion))
    return wins / len(scores_challenger)


def binomial_confidence_interval(wins: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    # Wilson: (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), with p̂ = wins/n and z the normal quantile
    if n <= 0 or not 0 <= wins <= n or not 0 < confidence < 1:
        raise ValueError(
            f"binomial_confidence_interval got wins={wins}, n={n}, confidence={confidence}; it needs n >= 1, "
            "0 <= wins <= n (ties may count as half) and confidence in (0, 1), e.g. 0.95."
        )
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = wins / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def policy_rollouts(model, reference, reward_model, stats: dict, tokenizer, prompts: list[str], params) -> Rollouts:
    """One response per held-out prompt (seeded), scored by the RM in its standard deviations, with its KL to the
    SFT reference."""
    suffix, stop, pad_id = reply_suffix(tokenizer), eos_ids(model, tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device

    def sample(query, query_mask):
        return sample_responses(model, query, query_mask, params.max_new_tokens, params.temperature, stop, pad_id)

    def score(query, query_mask, responses, mask, ended):
        raw = score_responses(reward_model, query, query_mask, responses, mask, ended, suffix, pad_id)
        return normalised(raw, stats)

    def kl(query, query_mask, responses, mask):
        logp = policy_forward(model, query, query_mask, responses, mask, params.temperature)[0]
        logp_ref = policy_forward(reference, query, query_mask, responses, mask, params.temperature)[0]
        return kl_per_response(logp, logp_ref, mask)

    return heldout_rollouts(prompts, tokenizer, sample, score, kl, params.batch_size, params.max_prompt_len,
                            params.seed, device, progress=True)


def policies_to_evaluate(champion_name: str) -> dict[str, Path]:
    """base, sft, the challenger, and the registry's champion when there is one."""
    policies = {"base": Path(BASE_DIR), "sft": Path(SFT_DIR), CHALLENGER: Path(POLICY_DIR)}
    try:
        policies["champion"] = champion_checkpoint(champion_name)
    except Exception as error:  # no registered model or no alias yet: the first cycle
        log.info("no champion to compare with (%s)", error)
    return policies


def evaluate_policies(params, precision: str, champion_name: str) -> dict:
    """Every figure of the stage, per policy, and the challenger's headline metrics for the gate."""
    dtype = resolve_precision(precision)
    tokenizer = load_tokenizer(SFT_DIR)
    reference = load_causal_lm(SFT_DIR, dtype).eval()
    reward_model, stats = load_reward_model(REWARD_DIR, dtype)
    reward_model.eval()
    _, prompts = held_out_prompts([], params.heldout_prompts, params.seed)
    tqa_prefix, questions = truthfulness_source(params.truthfulqa)
    tox_prefix, tox_prompts = toxicity_source(params.toxicity_prompts, params.toxicity_prompt_count)
    classifier = load_toxicity_classifier(params.toxicity_classifier)

    per_policy, rollouts, toxicity = {}, {}, {}
    for name, folder in policies_to_evaluate(champion_name).items():
        model = reference if name == "sft" else load_causal_lm(folder, dtype).eval()
        start = time.perf_counter()
        rollouts[name] = policy_rollouts(model, reference, reward_model, stats, tokenizer, prompts, params)
        tqa = truthfulqa_scores(model, tokenizer, questions, batch_size=params.batch_size)
        figures = {
            "rm_score": sum(rollouts[name].scores) / len(prompts),
            "kl": sum(rollouts[name].kl) / len(prompts),
            "response_length": sum(rollouts[name].lengths) / len(prompts),
            f"{tqa_prefix}_mc1": tqa.mc1_mean,
            f"{tqa_prefix}_mc2": tqa.mc2_mean,
        }
        if name != "base":  # toxicity is the costly part: k samples per prompt; the base model is not a candidate
            continuations = sample_continuations(model, tokenizer, tox_prompts, params.toxicity_k,
                                                 params.toxicity_max_new_tokens, 1.0, 0.9, params.seed, params.batch_size)
            toxicity[name] = score_toxicity(continuations.texts, classifier)
            figures[f"{tox_prefix}_toxicity_emt"] = expected_maximum_toxicity(toxicity[name])
            figures[f"{tox_prefix}_toxicity_probability"] = toxicity_probability(toxicity[name])
            figures["toxicity_tokens_per_s"] = continuations.tokens_per_second
        figures["seconds"] = time.perf_counter() - start
        per_policy[name] = {k: round(v, 5) for k, v in figures.items()}

    headline = {f"eval/{k}": v for k, v in per_policy[CHALLENGER].items() if k != "seconds"}
    opponent = "champion" if "champion" in rollouts else "sft"
    rate = win_rate(rollouts[CHALLENGER].scores, rollouts[opponent].scores)
    lower, upper = binomial_confidence_interval(rate * len(prompts), len(prompts), params.win_rate_confidence)
    headline.update({f"eval/win_rate_vs_{opponent}": round(rate, 4),
                     f"eval/win_rate_vs_{opponent}_lower": round(lower, 4),
                     f"eval/win_rate_vs_{opponent}_upper": round(upper, 4),
                     "eval/heldout_prompts": len(prompts), "eval/truthfulness_questions": len(questions),
                     "eval/toxicity_prompts": len(tox_prompts), "eval/toxicity_k": params.toxicity_k})
    headline.update({f"compare/{name}/{k}": v for name, figures in per_policy.items() for k, v in figures.items()})
    return {"metrics": headline, "per_policy": per_policy, "rollouts": rollouts, "toxicity": toxicity, "prompts": prompts,
            "classifier": params.toxicity_classifier}


def write_report(result: dict, folder: str | Path) -> list[Path]:
    """A markdown report with the side-by-side table, samples and plots; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_policy, rollouts = result["per_policy"], result["rollouts"]
    columns = sorted({k for figures in per_policy.values() for k in figures})
    lines = ["# Evaluation", "", "| figure | " + " | ".join(per_policy) + " |", "|---|" + "---|" * len(per_policy)]
    lines += [f"| {c} | " + " | ".join(str(per_policy[p].get(c, "")) for p in per_policy) + " |" for c in columns]
    lines += ["", "Win-rate and gate figures: " + ", ".join(f"`{k}` = {v}" for k, v in result["metrics"].items()
                                                              if k.startswith("eval/win_rate")), ""]
    lines += ["## Held-out samples (the challenger)", ""]
    for prompt, text, score in list(zip(result["prompts"], rollouts[CHALLENGER].texts, rollouts[CHALLENGER].scores))[:4]:
        lines += [f"**Prompt:** {prompt}", "", f"**Response** (RM {score:+.2f}): {text}", ""]
    files = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in rollouts.items():
        axes[0].hist(r.scores, bins=15, alpha=0.5, label=name)
    axes[0].set(title="held-out RM score (std units)", xlabel="score")
    axes[0].legend()
    for name, scores in result["toxicity"].items():
        axes[1].hist([max(s) for s in scores], bins=15, alpha=0.5, label=name)
    axes[1].set(title=f"max toxicity over k samples ({result['classifier']})", xlabel="toxicity")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(folder / "distributions.png", dpi=90)
    plt.close(figure)
    files.append(folder / "distributions.png")
    if Path(POLICY_CURVES).exists():
        import pandas as pd

        curve = pd.read_csv(POLICY_CURVES)
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        for ax, column in zip(axes, ("objective/rm_score", "objective/kl")):
            if column in curve:
                ax.plot(curve["iteration"], curve[column])
                ax.set(title=f"PPO {column} per iteration", xlabel="iteration")
        figure.tight_layout()
        figure.savefig(folder / "ppo_curves.png", dpi=90)
        plt.close(figure)
        files.append(folder / "ppo_curves.png")
    lines += ["## Plots", ""] + [f"![{f.stem}]({f.name})" for f in files]
    report = folder / "report.md"
    tmp = report.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(report)
    return [report, *files]


def main() -> int:
    params = load_params()
    section = {"evaluate": params.section("evaluate"), "model.precision": params.model.precision,
               "promote.model_name": params.promote.model_name}
    with tracking.stage_run("evaluate", section):
        result = evaluate_policies(params.evaluate, params.model.precision, params.promote.model_name)
        for path in write_report(result, REPORT_DIR):
            mlflow.log_artifact(str(path), artifact_path="report")
        tracking.write_metrics(STAGE_METRICS, result["metrics"])
    m = result["metrics"]
    print("evaluate: " + ", ".join(f"{k.removeprefix('eval/')} {v}" for k, v in m.items() if k.startswith("eval/")))
    return 0


if __name__ == "__main__":
    run_stage(main)
