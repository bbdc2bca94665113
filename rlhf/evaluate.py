"""Stage `evaluate`: base, SFT, the challenger and the registry's champion, side by side, by yardsticks the
policy never trained on.

Per policy: held-out RM score and KL to the SFT reference (`rlhf.rollouts.heldout_rollouts` on the test
split's prompts), TruthfulQA MC1/MC2 (`rlhf.truthfulqa`), toxicity of sampled continuations (`rlhf.toxicity`).
The challenger's win-rate against the champion (against SFT on the first cycle) comes with its Wilson interval.

Where the test split holds people's labels, each model judge (the AI judge, the proxy RM) is checked against them.

Metric names: `eval/<figure>` for the challenger (the gate reads these), `compare/<policy>/<figure>` for every
policy, e.g. `eval/truthfulqa_mc2`, `eval/provocation_probe_toxicity_probability`, `eval/win_rate_vs_sft_lower`;
`judge_agreement/<ai|proxy_rm>/<rate|lower|upper|n|...>` for a judge's agreement with people.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

from rlhf import human_eval, outputs, tracking
from rlhf.chat import prompt_and_reply_ids, reply_suffix
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.models import load_causal_lm
from rlhf.params import ParamError, load_params
from rlhf.comparisons import read_comparisons, source_kind
from rlhf.paths import BASE_DIR, POLICY_CURVES, POLICY_DIR, REWARD_DIR, SFT_DIR, TEST_COMPARISONS
from rlhf.prompts import held_out_prompts
from rlhf.registry import champion_checkpoint, champion_version
from rlhf.rewards import load_reward_model, normalised, pad_right, rewards, score_responses
from rlhf.judges import MarginFn, judge_name, judge_pairs, make_judge
from rlhf.rollouts import (Rollouts, eos_ids, greedy_replies, heldout_rollouts, kl_per_response, policy_forward,
                           sample_responses)
from rlhf.stats import agreement_figures, win_rate_figures
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
# source kinds whose `chosen` is people's: labeling campaigns (human:<campaign>) and imported preference sets
# (import:<file>, e.g. hh-rlhf); judge:* and feedback:* rows are not
HUMAN_SOURCES = ("human", "import")


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
    ai_judge = make_judge(e, params.model) if "ai" in e.judges else None  # loaded once, for both uses
    judged = judge_challenger(params, prompts, rollouts, gold, ai_judge)
    headline.update(judged["metrics"])
    agreement = judge_agreement(e, reward_model, tokenizer, ai_judge)
    headline.update(agreement["metrics"])
    human = human_campaign(params, prompts, rollouts) if "human" in e.judges else None
    headline.update(human["metrics"] if human else {})
    headline.update({f"compare/{name}/{k}": v for name, figures in per_policy.items() for k, v in figures.items()})
    return {"metrics": headline, "per_policy": per_policy, "rollouts": rollouts, "toxicity": toxicity, "prompts": prompts,
            "classifier": e.toxicity_classifier, "gold": gold, "ai_verdicts": judged["ai_verdicts"],
            "human": human["mapping"] if human else None, "agreement_sources": agreement["sources"]}


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


def judge_challenger(params, prompts: list[str], rollouts: dict[str, Rollouts], gold: dict,
                     ai_judge: MarginFn | None) -> dict:
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
            judged = judge_pairs(triples, ai_judge, e, judge_name(e))
            ai_verdicts[opponent] = judged
            outcomes["ai"] = [outcome_of_verdict(v) for v in judged["chosen"]]
            metrics[f"eval/ai/inconsistent_vs_{opponent}"] = int((judged["outcome"] == "inconsistent").sum())
        for judge, results in outcomes.items():
            metrics.update({f"eval/{judge}/{k}_vs_{opponent}" if not k.startswith("win_rate") else
                            f"eval/{judge}/win_rate_vs_{opponent}{k.removeprefix('win_rate')}": v
                            for k, v in win_rate_figures(results, confidence).items()})
    return {"metrics": metrics, "ai_verdicts": ai_verdicts}


def human_labelled(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows of a comparisons frame whose label is people's (HUMAN_SOURCES) and has a side, 'a' or 'b'; and how
    many of people's labels were ties, left out (a tie has no side for a judge to agree with)."""
    human = frame[frame["source"].map(source_kind).isin(HUMAN_SOURCES)]
    return human[human["chosen"].isin(("a", "b"))].reset_index(drop=True), int((human["chosen"] == "tie").sum())


@torch.no_grad()
def proxy_picks(reward_model, tokenizer, pairs: pd.DataFrame, max_prompt_len: int, max_new_tokens: int,
                batch_size: int) -> list[str]:
    """The proxy RM as a pairwise judge: 'a' or 'b', whichever response it scores higher ('tie' on equal scores).

    Each response is read as the held-out rollouts are: the chat-templated prompt's last max_prompt_len tokens, then
    the reply with the template's closing tokens, or only its first max_new_tokens where it is longer (unfinished,
    like a rollout that hit the limit).
    """
    closing = len(reply_suffix(tokenizer))
    rows = []
    for column in ("response_a", "response_b"):  # every a first, then every b: one scoring pass for both
        for prompt, reply in zip(pairs["prompt"], pairs[column]):
            prompt_part, reply_part = prompt_and_reply_ids(tokenizer, prompt, reply)
            if len(reply_part) > max_new_tokens + closing:
                reply_part = reply_part[:max_new_tokens]
            rows.append(prompt_part[-max_prompt_len:] + reply_part)
    device = next(reward_model.parameters()).device
    scores = torch.empty(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar length pad little
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = pad_right([rows[i] for i in batch], tokenizer.pad_token_id)
        scores[batch] = rewards(reward_model, input_ids.to(device), attention_mask.to(device)).float().cpu()
    n = len(pairs)
    return [{"win": "a", "loss": "b", "tie": "tie"}[outcome_of_scores(a, b)]
            for a, b in zip(scores[:n].tolist(), scores[n:].tolist())]


def judge_agreement(e, reward_model, tokenizer, ai_judge: MarginFn | None, path: str | Path = TEST_COMPARISONS) -> dict:
    """Each model judge against people on the test split's human-labelled pairs (`human_labelled`; at most
    `agreement_pairs` of them, a seeded sample): `judge_agreement/<ai|proxy_rm>/rate` with `lower`, `upper`, `n` and
    the counts (rlhf.stats.agreement_figures), `judge_agreement/human_pairs` and `human_ties`. The AI judge reads
    each pair in both orders, as it judges the challenger. With no human row in the split there are no metrics.
    Returns {"metrics", "sources": people's labels in the split per source}."""
    frame = read_comparisons(path)
    sided, ties = human_labelled(frame)
    sources = frame.loc[frame["source"].map(source_kind).isin(HUMAN_SOURCES), "source"].value_counts().to_dict()
    if not sources:
        log.info("no human labels in the test split: judge agreement not measured")
        return {"metrics": {}, "sources": {}}
    metrics = {"judge_agreement/human_pairs": len(sided), "judge_agreement/human_ties": ties}
    pairs = sided.sample(n=min(e.agreement_pairs, len(sided)), random_state=e.seed) if len(sided) else sided
    if pairs.empty:
        return {"metrics": metrics, "sources": sources}
    picks = {"proxy_rm": proxy_picks(reward_model, tokenizer, pairs, e.max_prompt_len, e.max_new_tokens, e.batch_size)}
    if ai_judge is not None:
        judged = judge_pairs(list(zip(pairs["prompt"], pairs["response_a"], pairs["response_b"])), ai_judge, e,
                             judge_name(e))
        picks["ai"] = [c if isinstance(c, str) else None for c in judged["chosen"]]  # None: the orders disagreed
    for judge, chosen in picks.items():
        figures = agreement_figures(pairs["chosen"].tolist(), chosen, e.win_rate_confidence)
        metrics.update({f"judge_agreement/{judge}/{k}": v for k, v in figures.items()})
    return {"metrics": metrics, "sources": sources}


def agreement_lines(metrics: dict, sources: dict) -> list[str]:
    """How far each model judge agrees with people on the test split; one line when the split has no human label."""
    if "judge_agreement/human_pairs" not in metrics:
        return ["Judge agreement with people: no human labels in the test split.", ""]
    pairs, ties = metrics["judge_agreement/human_pairs"], metrics["judge_agreement/human_ties"]
    shown = ", ".join(f"`{source}` {n}" for source, n in sorted(sources.items()))
    if not pairs:
        return [f"Judge agreement with people: the test split's {ties} human labels ({shown}) are all ties, so there "
                "is no side to agree with.", ""]
    lines = ["### Do the judges agree with people?", "",
             f"The test split's human labels ({shown}): {pairs} with a side, {ties} ties left out. Agreement is the "
             "share of the pairs a judge decides on which it picks the response people chose, with its Wilson "
             "interval; a tie, or an inconsistent pair (the AI judge's two orders disagree), decides nothing.", "",
             "| judge | agreement | decided / judged | ties | inconsistent |", "|---|---|---|---|---|"]
    for judge, label in (("ai", "ai"), ("proxy_rm", "proxy RM (the policy's own reward)")):
        key = f"judge_agreement/{judge}"
        if f"{key}/pairs" not in metrics:
            continue
        rate = (f"{metrics[f'{key}/rate']:.3f} [{metrics[f'{key}/lower']:.3f}, {metrics[f'{key}/upper']:.3f}]"
                if f"{key}/rate" in metrics else "none decided")
        lines.append(f"| {label} | {rate} | {metrics[f'{key}/n']}/{metrics[f'{key}/pairs']} | "
                     f"{metrics[f'{key}/ties']} | {metrics[f'{key}/inconsistent']} |")
    return lines + [""]


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

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_policy, rollouts = result["per_policy"], result["rollouts"]
    columns = sorted({k for figures in per_policy.values() for k in figures})
    lines = ["# Evaluation", ""] + verdict_lines(result["metrics"]) + agreement_lines(result["metrics"],
                                                                                   result["agreement_sources"])
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
