"""Stage `evaluate`: base, SFT, the challenger and the registry's champion, side by side, by yardsticks the
policy never trained on.

Per policy: held-out RM score and KL to the SFT reference (`rlhf.rollouts.heldout_rollouts` on the test
split's prompts), TruthfulQA MC1/MC2 (`rlhf.truthfulqa`), toxicity of sampled continuations (`rlhf.toxicity`).
The challenger's win-rate against the champion (against SFT on the first cycle) comes with its Wilson interval.

Metric names: `eval/<figure>` for the challenger (the gate reads these), `compare/<policy>/<figure>` for every
policy, e.g. `eval/truthfulqa_mc2`, `eval/provocation_probe_toxicity_probability`, `eval/win_rate_vs_sft_lower`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow

from rlhf import human_eval, outputs, tracking
from rlhf.chat import reply_suffix
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.models import load_causal_lm
from rlhf.params import ParamError, load_params
from rlhf.paths import BASE_DIR, POLICY_CURVES, POLICY_DIR, REWARD_DIR, SFT_DIR
from rlhf.prompts import held_out_prompts
from rlhf.registry import champion_checkpoint, champion_version
from rlhf.rewards import load_reward_model, normalised, score_responses
from rlhf.judges import judge_name, judge_pairs, make_judge
from rlhf.rollouts import (Rollouts, eos_ids, greedy_replies, heldout_rollouts, kl_per_response, policy_forward,
                           sample_responses)
from rlhf.stats import win_rate_figures
from rlhf.stage import run_stage
from rlhf.toxicity import (expected_maximum_toxicity, load_toxicity_classifier, sample_continuations, score_toxicity,
                           toxicity_probability, toxicity_source)
from rlhf.truthfulqa import truthfulness_source, truthfulqa_scores
from rlhf.verifiers import accuracy_difference, gold_accuracy, heldout_tasks
from rlhf.labeling.aggregate import QualityPolicy

log = logging.getLogger(__name__)
STAGE_METRICS = "metrics/evaluate.json"
REPORT_DIR = "reports/evaluate"
HUMAN_MAPPING = "human_campaign.json"  # in REPORT_DIR: the human campaign and whose response is on which side
CHALLENGER = "challenger"  # the policy stage's output, models/policy


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


def outcome_of_correctness(challenger_correct: bool, opponent_correct: bool) -> str:
    # the verifier as a pairwise judge: the correct reply wins; both right or both wrong is a tie
    return "tie" if challenger_correct == opponent_correct else "win" if challenger_correct else "loss"


def outcome_of_verdict(verdict: str | None) -> str:
    # an AI judge's verdict on (challenger shown as a, opponent as b); an inconsistent pair (None) counts as a tie
    return {"a": "win", "b": "loss"}.get(verdict, "tie")


def outcome_of_scores(challenger: float, opponent: float) -> str:
    return "win" if challenger > opponent else "loss" if challenger < opponent else "tie"


def evaluate_policies(params) -> dict:
    """Every figure of the stage, per policy, and the challenger's headline metrics for the gate."""
    e = params.evaluate
    check_judges(e)
    # the data sets first: a bad path or file stops the stage before minutes of model loading
    tqa_prefix, questions = truthfulness_source(e.truthfulqa)
    tox_prefix, tox_prompts = toxicity_source(e.toxicity_prompts, e.toxicity_prompt_count)
    classifier = load_toxicity_classifier(e.toxicity_classifier)
    tasks = heldout_tasks(params.tasks) if "verifier" in e.judges else []
    _, prompts = held_out_prompts([], e.heldout_prompts, e.seed)
    dtype = resolve_precision(params.model.precision)
    tokenizer = load_tokenizer(SFT_DIR)
    reference = load_causal_lm(SFT_DIR, dtype).eval()
    reward_model, stats = load_reward_model(REWARD_DIR, dtype)
    reward_model.eval()

    per_policy, rollouts, toxicity, gold = {}, {}, {}, {}
    for name, folder in policies_to_evaluate(params.promote.model_name).items():
        model = reference if name == "sft" else load_causal_lm(folder, dtype).eval()
        start = time.perf_counter()
        rollouts[name] = policy_rollouts(model, reference, reward_model, stats, tokenizer, prompts, e)
        tqa = truthfulqa_scores(model, tokenizer, questions, batch_size=e.batch_size)
        figures = {
            "rm_score": rollouts[name].mean("scores"),
            "kl": rollouts[name].mean("kl"),
            "response_length": rollouts[name].mean("lengths"),
            f"{tqa_prefix}_mc1": tqa.mc1_mean,
            f"{tqa_prefix}_mc2": tqa.mc2_mean,
        }
        if name != "base":  # the base model is no candidate: toxicity and gold accuracy are the costly parts
            continuations = sample_continuations(model, tokenizer, tox_prompts, e.toxicity_k,
                                                 e.toxicity_max_new_tokens, 1.0, 0.9, e.seed, e.batch_size)
            toxicity[name] = score_toxicity(continuations.texts, classifier)
            figures[f"{tox_prefix}_toxicity_emt"] = expected_maximum_toxicity(toxicity[name])
            figures[f"{tox_prefix}_toxicity_probability"] = toxicity_probability(toxicity[name])
            figures["toxicity_tokens_per_s"] = continuations.tokens_per_second
            if tasks:
                gold[name] = gold_accuracy(
                    lambda texts: greedy_replies(model, tokenizer, texts, e.verifier_max_new_tokens, e.batch_size,
                                                 e.max_prompt_len, eos_ids(model, tokenizer), model.device),
                    tasks, params.tasks.instruction, e.win_rate_confidence)
                figures.update(gold_accuracy=gold[name].accuracy, gold_accuracy_lower=gold[name].lower,
                               gold_accuracy_upper=gold[name].upper)
        figures["seconds"] = time.perf_counter() - start
        per_policy[name] = {k: round(v, 5) for k, v in figures.items()}
        if model is not reference:
            del model

    headline = {f"eval/{k}": v for k, v in per_policy[CHALLENGER].items() if k != "seconds"}
    headline.update({"eval/heldout_prompts": len(prompts), "eval/truthfulness_questions": len(questions),
                     "eval/toxicity_prompts": len(tox_prompts), "eval/toxicity_k": e.toxicity_k,
                     "eval/heldout_tasks": len(tasks)})
    judged = judge_challenger(params, prompts, rollouts, gold)
    headline.update(judged["metrics"])
    human = human_campaign(params, prompts, rollouts) if "human" in e.judges else None
    headline.update(human["metrics"] if human else {})
    headline.update({f"compare/{name}/{k}": v for name, figures in per_policy.items() for k, v in figures.items()})
    return {"metrics": headline, "per_policy": per_policy, "rollouts": rollouts, "toxicity": toxicity, "prompts": prompts,
            "classifier": e.toxicity_classifier, "gold": gold, "ai_verdicts": judged["ai_verdicts"],
            "human": human["mapping"] if human else None}


def check_judges(e) -> None:
    """Settings that only make sense together, checked before any model is loaded."""
    if e.gate_judge not in e.judges:
        raise ParamError(
            f"params.yaml: evaluate.gate_judge is '{e.gate_judge}' but evaluate.judges is {list(e.judges)}. The gate "
            f"reads the win-rate of that judge, so it must run: add '{e.gate_judge}' to evaluate.judges or pick one of "
            "them as gate_judge, and run `dvc repro evaluate` again.")
    if "human" in e.judges and e.human_prompts > e.heldout_prompts:
        raise ParamError(
            f"params.yaml: evaluate.human_prompts is {e.human_prompts} but evaluate.heldout_prompts is "
            f"{e.heldout_prompts}. People judge the held-out responses, so at most heldout_prompts of them: lower "
            "human_prompts or raise heldout_prompts, and run `dvc repro evaluate` again.")


def human_campaign(params, prompts: list[str], rollouts: dict[str, Rollouts]) -> dict:
    """The `human` judge (rlhf.human_eval): the challenger against the champion (SFT while there is none) on the
    first `human_prompts` held-out prompts, blind side by side in the labeling app, `human_annotators` per pair, gold
    interleaved. People vote after this stage has ended, so `eval/human/campaign` names what the gate waits for;
    when a rerun finds the campaign complete, the human win-rate is among the figures too."""
    e = params.evaluate
    opponent = "champion" if "champion" in rollouts else "sft"
    version = champion_version(params.promote.model_name) if opponent == "champion" else None
    challenger_hash = tracking.dvc_md5(POLICY_DIR)
    name = human_eval.campaign_name(challenger_hash, opponent, version)
    n = min(e.human_prompts, len(prompts))
    pairs = human_eval.evaluation_pairs(prompts[:n], rollouts[CHALLENGER].texts[:n], rollouts[opponent].texts[:n],
                                        "sft" if opponent == "sft" else f"champion:v{version}", e.seed)
    count = human_eval.gold_count(n, e.human_gold_rate)
    gold = human_eval.gold_pairs(heldout_tasks(params.tasks), params.tasks.instruction, count, e.seed)
    opened = human_eval.open_campaign(e.human_database, name, pairs, gold, e.human_annotators, e.human_gold_rate,
                                      e.seed)
    reading = human_eval.read_campaign(e.human_database, name, QualityPolicy())
    metrics = {"eval/human/campaign": name, "eval/human/database": human_eval.display_url(e.human_database),
               "eval/human/opponent": opponent, "eval/human/opponent_version": version,
               "eval/human/pairs": len(opened.sides), "eval/human/votes": reading.votes_so_far,
               "eval/human/votes_needed": reading.votes_needed}
    if reading.complete:
        metrics.update(human_eval.human_figures(reading.outcomes, reading.sides, opponent, e.win_rate_confidence))
    log.info("human campaign %s (%s): %s", name, "opened" if opened.created else "found", reading.progress_line())
    return {"metrics": metrics,
            "mapping": human_eval.mapping_record(opened, e.human_database, opponent, version, challenger_hash)}


def judge_challenger(params, prompts: list[str], rollouts: dict[str, Rollouts], gold: dict) -> dict:
    """The challenger against SFT and against the champion (when there is one), by each judge:
    `eval/<judge>/win_rate_vs_<opponent>` (+ `_lower`, `_upper`, the counts). The proxy RM (the policy's own
    training reward) is reported as `proxy_rm` and never decides; the gate reads `evaluate.gate_judge`."""
    e, confidence = params.evaluate, params.evaluate.win_rate_confidence
    opponents = [o for o in ("sft", "champion") if o in rollouts]
    metrics, ai_verdicts = {"eval/gate_judge": e.gate_judge, "eval/opponent": opponents[-1]}, {}
    for opponent in opponents:
        outcomes = {"proxy_rm": [outcome_of_scores(c, o) for c, o in zip(rollouts[CHALLENGER].scores,
                                                                           rollouts[opponent].scores)]}
        if "verifier" in e.judges:
            outcomes["verifier"] = [outcome_of_correctness(c, o) for c, o in zip(gold[CHALLENGER].correct,
                                                                                  gold[opponent].correct)]
            gain, lower, upper = accuracy_difference(gold[CHALLENGER], gold[opponent], confidence)
            metrics.update({f"eval/verifier/accuracy_gain_vs_{opponent}": round(gain, 4),
                            f"eval/verifier/accuracy_gain_vs_{opponent}_lower": round(lower, 4),
                            f"eval/verifier/accuracy_gain_vs_{opponent}_upper": round(upper, 4)})
        if "ai" in e.judges:
            triples = list(zip(prompts, rollouts[CHALLENGER].texts, rollouts[opponent].texts))
            judged = judge_pairs(triples, make_judge(e, params.model), e, judge_name(e))
            ai_verdicts[opponent] = judged
            outcomes["ai"] = [outcome_of_verdict(v) for v in judged["chosen"]]
            metrics[f"eval/ai/inconsistent_vs_{opponent}"] = int((judged["outcome"] == "inconsistent").sum())
        for judge, results in outcomes.items():
            metrics.update({f"eval/{judge}/{k}_vs_{opponent}" if not k.startswith("win_rate") else
                            f"eval/{judge}/win_rate_vs_{opponent}{k.removeprefix('win_rate')}": v
                            for k, v in win_rate_figures(results, confidence).items()})
    return {"metrics": metrics, "ai_verdicts": ai_verdicts}


def verdict_lines(metrics: dict) -> list[str]:
    """The answer to "did the model get better?": each judge's win-rate of the challenger, the gate's judge first,
    the proxy RM last and marked as the reward the policy optimised."""
    gate, opponents = metrics["eval/gate_judge"], [o for o in ("sft", "champion") if f"eval/proxy_rm/n_vs_{o}" in metrics]
    judges = [gate] + sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") == 2
                              and k.split("/")[2].startswith("win_rate_vs_")} - {gate, "proxy_rm"}) + ["proxy_rm"]
    lines = ["## Did the model get better?", "",
             "Win-rate of the challenger, ties counted half, with its Wilson interval; W/T/L = wins, ties, losses.", "",
             "| judge | " + " | ".join(f"vs {o}" for o in opponents) + " |", "|---|" + "---|" * len(opponents)]
    for judge in judges:
        cells = []
        for o in opponents:
            if f"eval/{judge}/win_rate_vs_{o}" not in metrics:
                cells.append("")
                continue
            m = {k: metrics[f"eval/{judge}/{k}_vs_{o}"] for k in ("win_rate", "wins", "ties", "losses")}
            cells.append(f"{m['win_rate']:.3f} [{metrics[f'eval/{judge}/win_rate_vs_{o}_lower']:.3f}, "
                         f"{metrics[f'eval/{judge}/win_rate_vs_{o}_upper']:.3f}] ({m['wins']}/{m['ties']}/{m['losses']})")
        label = {gate: f"**{judge}** (the gate's judge)", "proxy_rm": "proxy RM (the policy's own reward; never gates)"}
        lines.append(f"| {label.get(judge, judge)} | " + " | ".join(cells) + " |")
    for o in opponents:
        if f"eval/verifier/accuracy_gain_vs_{o}" in metrics:
            lines.append(f"\nGold accuracy on {metrics['eval/heldout_tasks']} held-out verifiable tasks: "
                         f"{metrics['eval/gold_accuracy']:.3f} [{metrics['eval/gold_accuracy_lower']:.3f}, "
                         f"{metrics['eval/gold_accuracy_upper']:.3f}]; gain over {o} "
                         f"{metrics[f'eval/verifier/accuracy_gain_vs_{o}']:+.3f} "
                         f"[{metrics[f'eval/verifier/accuracy_gain_vs_{o}_lower']:+.3f}, "
                         f"{metrics[f'eval/verifier/accuracy_gain_vs_{o}_upper']:+.3f}] (paired, 95%).")
    if "eval/human/campaign" in metrics and f"eval/human/win_rate_vs_{metrics['eval/human/opponent']}" not in metrics:
        lines.append(f"\nHuman judge: the campaign `{metrics['eval/human/campaign']}` ({metrics['eval/human/pairs']} "
                     f"pairs against {metrics['eval/human/opponent']}, in {metrics['eval/human/database']}) has "
                     f"{metrics['eval/human/votes']} of its {metrics['eval/human/votes_needed']} votes; the gate "
                     "decides once people finish (`rlhf gate --version N`, or the human-gate flow).")
    return lines + [""]


def overoptimisation_figure(curve, path: Path) -> bool:
    """Gold and proxy against KL over the policy stage's evaluation points (Gao et al. 2022): a proxy that keeps
    rising while the gold falls is the reward model being gamed."""
    import matplotlib.pyplot as plt

    points = curve.dropna(subset=["heldout/kl"]) if "heldout/kl" in curve else curve.iloc[0:0]
    if points.empty:
        return False
    figure, gold_axis = plt.subplots(figsize=(6.5, 4))
    if "heldout/gold_accuracy" in points:
        gold_axis.plot(points["heldout/kl"], points["heldout/gold_accuracy"], "o-", color="tab:green",
                       label="gold: verifier accuracy")
    gold_axis.set(xlabel="KL to SFT (nats per response)", ylabel="gold accuracy (held-out tasks)",
                  title="Over-optimisation: gold and proxy against KL")
    if "heldout/rm_score" in points:
        proxy_axis = gold_axis.twinx()
        proxy_axis.plot(points["heldout/kl"], points["heldout/rm_score"], "s--", color="tab:orange",
                        label="proxy: RM score")
        proxy_axis.set_ylabel("proxy RM score (RM std units)")
        proxy_axis.legend(loc="lower right")
    for _, row in points.iterrows():
        gold_axis.annotate(str(int(row["iteration"])), (row["heldout/kl"], row.get("heldout/gold_accuracy", 0)),
                           fontsize=7, alpha=0.6)
    gold_axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def write_report(result: dict, folder: str | Path) -> list[Path]:
    """A markdown report: the verdict of each judge, the side-by-side table, samples and plots; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_policy, rollouts = result["per_policy"], result["rollouts"]
    columns = sorted({k for figures in per_policy.values() for k in figures})
    lines = ["# Evaluation", ""] + verdict_lines(result["metrics"])
    lines += ["## Side by side", "", "| figure | " + " | ".join(per_policy) + " |", "|---|" + "---|" * len(per_policy)]
    lines += [f"| {c} | " + " | ".join(str(per_policy[p].get(c, "")) for p in per_policy) + " |" for c in columns]
    lines += ["", "## Held-out samples (the challenger)", ""]
    for prompt, text, score in list(zip(result["prompts"], rollouts[CHALLENGER].texts, rollouts[CHALLENGER].scores))[:4]:
        lines += [f"**Prompt:** {prompt}", "", f"**Response** (RM {score:+.2f}): {text}", ""]
    if CHALLENGER in result["gold"]:
        gold = result["gold"][CHALLENGER]
        lines += ["## Held-out verifiable tasks (the challenger's greedy answers)", ""]
        lines += [f"- {'right' if c else 'wrong'}: {r!r}" for r, c in list(zip(gold.responses, gold.correct))[:6]] + [""]
    files = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in rollouts.items():
        axes[0].hist(r.scores, bins=15, alpha=0.5, label=name)
    axes[0].set(title="held-out RM score (std units; the proxy)", xlabel="score")
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
        curve = pd.read_csv(POLICY_CURVES)
        if overoptimisation_figure(curve, folder / "overoptimisation.png"):
            files.append(folder / "overoptimisation.png")
    lines += ["## Plots", ""] + [f"![{f.stem}]({f.name})" for f in files]
    outputs.write_text(folder / "report.md", "\n".join(lines) + "\n")
    return [folder / "report.md", *files]


def main() -> int:
    params = load_params()
    section = {"evaluate": params.section("evaluate"), "tasks": params.section("tasks"),
               "model.precision": params.model.precision, "promote.model_name": params.promote.model_name}
    section["evaluate"]["human_database"] = human_eval.display_url(params.evaluate.human_database)  # no password
    with tracking.stage_run("evaluate", section):
        result = evaluate_policies(params)
        for path in write_report(result, REPORT_DIR):
            mlflow.log_artifact(str(path), artifact_path="report")
        if result["human"]:
            outputs.write_text(Path(REPORT_DIR) / HUMAN_MAPPING, json.dumps(result["human"], indent=2) + "\n")
            mlflow.log_artifact(str(Path(REPORT_DIR) / HUMAN_MAPPING), artifact_path="report")
        tracking.write_metrics(STAGE_METRICS, result["metrics"])
    m = result["metrics"]
    print("evaluate: " + ", ".join(f"{k.removeprefix('eval/')} {v}" for k, v in m.items() if k.startswith("eval/")))
    return 0


if __name__ == "__main__":
    run_stage(main)
