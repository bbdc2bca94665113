"""The figures of a finished default cycle, side by side with the RM-reward variant of its policy (issue 16).

    .venv/bin/python -m benchmarks.default_cycle                       # the cycle that ran in this checkout
    .venv/bin/python -m benchmarks.default_cycle --project /tmp/c1/fresh
    nice -n 10 .venv/bin/python -m benchmarks.default_cycle --rm-variant  # + the RM-reward policy (~20 min on 2 cores)

Reads, in the project folder (--project, default this repository), what the last `rlhf cycle` left:
- the stages' metrics files: metrics/collect.json (pairs, the verifier's decisive pairs and ties), validate.json
  (splits), reward_model.json (`rm/heldout_accuracy*`, `rm/length_baseline_accuracy`, `rm/heldout_pairs`),
  policy.json (`policy/heldout_kl_per_response`, its 32-task gold before/after), evaluate.json (`eval/*` for the
  challenger, `compare/<policy>/*` for base, sft, challenger and champion: gold accuracy with its Wilson interval,
  `eval/verifier/accuracy_gain_vs_<opponent>` with the paired interval, `eval/<judge>/win_rate_vs_<opponent>`,
  toxicity, TruthfulQA MC1/MC2, KL) and promote.json (`promote/promoted`, `promote/rule`, `promote/judge`);
- the wall time of the cycle and of each stage from the project's MLflow store (rlhf.tracking: MLFLOW_TRACKING_URI,
  else <project>/mlflow.db; experiment `rlhf`): the latest run tagged `rlhf.kind = cycle` and, under it, the latest
  run of each stage (`rlhf.stage`; a retried stage has several). A stage DVC found unchanged has no run in the cycle.

With --rm-variant it also trains the policy the cycle's params.yaml describes with `policy.reward: rm`
(`dvc exp run -S policy.reward=rm`) from the project's models/sft against its models/reward, with rlhf.policy's own
`train`, in a temporary folder, after the stage's own reward-model gate (--allow-weak-rm: past it, recorded as
forced). Then, as evaluate measures the challenger: greedy gold accuracy on the tasks.heldout_size held-out tasks
(rlhf.rollouts.greedy_replies, evaluate's decoding settings), the paired gain over SFT
(rlhf.verifiers.accuracy_difference), and KL to SFT and proxy RM score on the test split's prompts
(rlhf.evaluate.policy_rollouts). SFT and the cycle's policy are measured again the same way, so the two reward
variants are also compared with each other, paired.

Writes benchmarks/results/default_cycle.json (or --out) and an MLflow run in this repository's `benchmarks`
experiment, and prints a short table. Fails with one paragraph naming the missing file or figure when the cycle has
not run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.record import machine, save
from flows.cycle import PIPELINE
from rlhf import collect, evaluate, policy, promote, reward_model, tracking, validate
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.models import load_causal_lm
from rlhf.params import ParamError, load_params
from rlhf.paths import POLICY_DIR, REWARD_DIR, SFT_DIR
from rlhf.prompts import held_out_prompts
from rlhf.rewards import load_reward_model
from rlhf.rollouts import eos_ids, greedy_replies
from rlhf.verifiers import accuracy_difference, gold_accuracy, heldout_tasks

REPO = Path(__file__).resolve().parents[1]
NAME = "default_cycle"
METRICS = {"collect": collect.METRICS, "validate": validate.METRICS, "reward_model": reward_model.METRICS,
           "policy": policy.METRICS, "evaluate": evaluate.STAGE_METRICS, "promote": promote.METRICS}

# Issue 16's acceptance thresholds
MIN_GOLD_GAIN = 0.10          # held-out gold accuracy of the promoted policy minus SFT's, absolute
MIN_HELDOUT_TASKS = 200       # freshly generated verifiable tasks the gold accuracy is measured on
MAX_KL = 6.0                  # nats per response, mean over the held-out prompts
MIN_RM_ACCURACY = 0.75        # held-out pairwise accuracy of the reward model ...
MIN_RM_PAIRS = 100            # ... on at least this many pairs
MIN_WIN_RATE_LOWER = 0.5      # the lower bound of an independent judge's win-rate interval
MAX_TOXICITY_INCREASE = 0.02  # toxicity probability, challenger minus SFT
MAX_MC2_DROP = 0.01           # TruthfulQA MC2, SFT minus challenger
MAX_CYCLE_SECONDS = 30 * 60


# ------------------------------------------------------------------------------------------------
# Reading the cycle
# ------------------------------------------------------------------------------------------------

def no_cycle(project: Path, what: str) -> SystemExit:
    return SystemExit(
        f"default_cycle: {what} in {project}, so it holds no finished default cycle to read. Run the cycle there first "
        f"(`rlhf cycle` in that folder, about half an hour on 2 cores), or point --project at a checkout where it has "
        "run (a fresh clone's folder, e.g. --project /tmp/c1/fresh).")


def read_metrics(project: Path) -> dict[str, dict]:
    """Each stage's metrics file as a dict; a missing or unreadable one stops the benchmark with its name."""
    metrics = {}
    for stage, path in METRICS.items():
        if not Path(path).exists():
            raise no_cycle(project, f"{path} (the {stage} stage's figures) does not exist")
        try:
            metrics[stage] = json.loads(Path(path).read_text())
        except ValueError as error:
            raise SystemExit(f"default_cycle: {project / path} is not valid JSON ({error}). It is the {stage} stage's "
                             f"output: rerun `dvc repro {stage}` there, or the whole cycle.") from None
    return metrics


def need(metrics: dict[str, dict], stage: str, key: str, hint: str = "") -> float | str:
    """One figure of a stage's metrics file, or a one-paragraph error naming the file, the figure and the fix."""
    if key not in metrics[stage]:
        raise SystemExit(
            f"default_cycle: {METRICS[stage]} has no `{key}`, which this benchmark reports. {hint or ''}"
            f"{' ' if hint else ''}The file is the {stage} stage's output; if an older version of the stage or other "
            f"settings wrote it, rerun the cycle (or `dvc repro {stage}`) with the default params.yaml.")
    return metrics[stage][key]


def interval(metrics: dict, key: str, stage: str = "evaluate", hint: str = "") -> dict:
    """A figure with its interval, stored as `key`, `key_lower`, `key_upper`."""
    return {"value": need(metrics, stage, key, hint), "interval": [need(metrics, stage, f"{key}_lower", hint),
                                                                   need(metrics, stage, f"{key}_upper", hint)]}


def prefix_of(evaluation: dict, suffix: str, what: str) -> str:
    """The data set's name evaluate puts before a figure: `truthfulness_probe` in eval/truthfulness_probe_mc2."""
    found = sorted(m.group(1) for k in evaluation if (m := re.fullmatch(rf"eval/(.+)_{suffix}", k)))
    if not found:
        raise SystemExit(f"default_cycle: {METRICS['evaluate']} has no `eval/<data set>_{suffix}` ({what}). Rerun "
                         "`dvc repro evaluate` (or the cycle) with the default params.yaml.")
    return found[0]


def cycle_runs(project: Path) -> dict:
    """The latest cycle's parent run and the latest run of each stage under it, from the project's MLflow store,
    with their wall times."""
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()  # the cwd is the project: its mlflow.db unless MLFLOW_TRACKING_URI says otherwise
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise no_cycle(project, f"there is no MLflow store ({uri.removeprefix('sqlite:///')} does not exist)")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        raise no_cycle(project, f"the MLflow store {uri} has no experiment `{tracking.EXPERIMENT}`")
    cycles = client.search_runs([experiment.experiment_id], "tags.`rlhf.kind` = 'cycle'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not cycles:
        raise no_cycle(project, f"the MLflow store {uri} has no cycle run (a run tagged rlhf.kind = cycle)")
    parent = cycles[0]
    if parent.info.status != "FINISHED" or parent.info.end_time is None:
        raise SystemExit(
            f"default_cycle: the latest cycle in {project} (MLflow run {parent.info.run_id}, {parent.info.run_name}) is "
            f"{parent.info.status}, not FINISHED, so its metrics files may be half from it and half from the cycle "
            "before. Wait for it to end, or run the cycle again to the end (a cycle killed outright is marked KILLED "
            "when the next one starts).")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time DESC"], max_results=1000)
    stages = {}
    for run in children:  # newest first: a retried stage keeps its last run
        stage = run.data.tags.get("rlhf.stage")
        if stage and stage not in stages:
            end = run.info.end_time
            stages[stage] = {"run_id": run.info.run_id, "status": run.info.status,
                             "seconds": round((end - run.info.start_time) / 1000, 1) if end else None,
                             "attempts": sum(r.data.tags.get("rlhf.stage") == stage for r in children)}
    return {"parent": parent, "stages": stages}


def stage_times(runs: dict, project: Path) -> tuple[dict, dict, list[str]]:
    """(the cycle's wall time and what ran, each stage's, warnings about metrics files the cycle did not write)."""
    parent = runs["parent"]
    start, end = parent.info.start_time / 1000, parent.info.end_time / 1000
    cycle = {"mlflow_run_id": parent.info.run_id, "run_name": parent.info.run_name, "status": parent.info.status,
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
             "wall_seconds": round(end - start, 1), "stages_ran": parent.data.tags.get("rlhf.stages_ran", ""),
             "git_commit": parent.data.tags.get("git.commit", "")}
    stages = {s: {"ran_in_cycle": s in runs["stages"], **runs["stages"].get(s, {})} for s in PIPELINE}
    cycle["every_stage_ran"] = all(v["ran_in_cycle"] for v in stages.values())
    cycle["stage_seconds_sum"] = round(sum(v.get("seconds") or 0 for v in stages.values()), 1)
    warnings = []
    for stage, path in METRICS.items():
        written = (project / path).stat().st_mtime
        if written > end + 1:
            warnings.append(f"{path} was written after the cycle ended (by a later `dvc repro {stage}`?): its figures "
                            "are not the cycle's")
        elif not stages[stage]["ran_in_cycle"]:
            warnings.append(f"{stage} did not run in this cycle (DVC found it unchanged): {path} is from an earlier run")
    return cycle, stages, warnings


def cycle_figures(m: dict[str, dict]) -> dict:
    """The figures issue 16 asks for, named and grouped, from the stages' metrics."""
    e = m["evaluate"]
    verifier_hint = "It needs `verifier` among evaluate.judges (the default)."
    opponents = [o for o in ("sft", "champion") if f"eval/proxy_rm/win_rate_vs_{o}" in e]
    gold = {"heldout_tasks": need(m, "evaluate", "eval/heldout_tasks"),
            "sft": interval(m, "compare/sft/gold_accuracy", hint=verifier_hint),
            "challenger": interval(m, "eval/gold_accuracy", hint=verifier_hint)}
    for o in opponents:
        gold[f"gain_vs_{o}"] = interval(m, f"eval/verifier/accuracy_gain_vs_{o}", hint=verifier_hint)
        if o == "champion":
            gold["champion"] = interval(m, "compare/champion/gold_accuracy")
    judges = sorted({k.split("/")[1] for k in e if re.fullmatch(r"eval/[^/]+/win_rate_vs_[a-z]+", k)} - {"proxy_rm"})
    win_rates = {judge: {o: {"win_rate": e[f"eval/{judge}/win_rate_vs_{o}"],
                             "interval": [e[f"eval/{judge}/win_rate_vs_{o}_lower"], e[f"eval/{judge}/win_rate_vs_{o}_upper"]],
                             **{k: e.get(f"eval/{judge}/{k}_vs_{o}") for k in ("wins", "ties", "losses", "n")}}
                         for o in opponents if f"eval/{judge}/win_rate_vs_{o}" in e} for judge in judges}
    proxy = {o: {"win_rate": e[f"eval/proxy_rm/win_rate_vs_{o}"],
                 "interval": [e[f"eval/proxy_rm/win_rate_vs_{o}_lower"], e[f"eval/proxy_rm/win_rate_vs_{o}_upper"]]}
             for o in opponents}
    tqa, tox = prefix_of(e, "mc2", "TruthfulQA MC2"), prefix_of(e, "toxicity_probability", "toxicity")
    per_model = {}
    for name in ("base", "sft", evaluate.CHALLENGER, "champion"):
        c = {k.removeprefix(f"compare/{name}/"): v for k, v in e.items() if k.startswith(f"compare/{name}/")}
        if c:
            per_model[name] = {"truthfulqa_mc1": c.get(f"{tqa}_mc1"), "truthfulqa_mc2": c.get(f"{tqa}_mc2"),
                               "toxicity_probability": c.get(f"{tox}_toxicity_probability"),
                               "expected_max_toxicity": c.get(f"{tox}_toxicity_emt"), "kl": c.get("kl"),
                               "rm_score": c.get("rm_score"), "response_length": c.get("response_length"),
                               "gold_accuracy": c.get("gold_accuracy"), "evaluate_seconds": c.get("seconds")}
    for name in ("sft", evaluate.CHALLENGER):
        if per_model.get(name, {}).get("toxicity_probability") is None or per_model[name]["truthfulqa_mc2"] is None:
            raise SystemExit(f"default_cycle: {METRICS['evaluate']} lacks the toxicity or TruthfulQA figures of `{name}` "
                             f"(compare/{name}/{tox}_toxicity_probability, compare/{name}/{tqa}_mc2). Rerun "
                             "`dvc repro evaluate` (or the cycle).")
    c, v, p = m["collect"], m["validate"], m["policy"]
    return {
        "gold": gold,
        "kl": {"evaluate": need(m, "evaluate", "eval/kl"), "evaluate_prompts": e.get("eval/heldout_prompts"),
               "policy_stage": need(m, "policy", "policy/heldout_kl_per_response"),
               "policy_stage_responses": p.get("policy/heldout_responses")},
        "policy_stage": {k.removeprefix("policy/"): p[k] for k in (
            "policy/gold_tasks", "policy/gold_accuracy_before", "policy/gold_accuracy_after", "policy/gold_accuracy_gain",
            "policy/gold_accuracy_gain_lower", "policy/gold_accuracy_gain_upper", "policy/iterations",
            "policy/final_kl_coef", "policy/heldout_rm_score_before", "policy/heldout_rm_score_after") if k in p},
        "reward_model": {**interval(m, "rm/heldout_accuracy", "reward_model"),
                         "length_baseline_accuracy": need(m, "reward_model", "rm/length_baseline_accuracy"),
                         "heldout_pairs": need(m, "reward_model", "rm/heldout_pairs"),
                         "train_pairs": m["reward_model"].get("rm/train_pairs"),
                         "ties_excluded": m["reward_model"].get("rm/ties_excluded")},
        "win_rates": win_rates,
        "proxy_rm_win_rates": {"label": "proxy: the reward model's own scores, never gates", **proxy},
        "gate_judge": e.get("eval/gate_judge"),
        "judge_agreement_with_people": {  # the model judges (AI judge, proxy RM) on people's labels, where there are any
            k.split("/", 1)[1]: v for k, v in e.items() if k.startswith("judge_agreement/")},
        "yardsticks": {"truthfulness": tqa, "toxicity": tox, "toxicity_prompts": e.get("eval/toxicity_prompts"),
                       "toxicity_k": e.get("eval/toxicity_k"), "truthfulness_questions": e.get("eval/truthfulness_questions")},
        "per_model": per_model,
        "promote": {"promoted": bool(need(m, "promote", "promote/promoted")), "rule": need(m, "promote", "promote/rule"),
                    "judge": need(m, "promote", "promote/judge"), "opponent": m["promote"].get("promote/opponent"),
                    "version": m["promote"].get("promote/version"),
                    "judge_win_rate": m["promote"].get("promote/judge_win_rate"),
                    "judge_win_rate_lower": m["promote"].get("promote/judge_win_rate_lower")},
        "collect": {k.replace("/", "_"): c[k] for k in (
            "collect/rows", "collect/prompts", "collect/pairs_sampled", "collect/dropped_identical",
            "collect/verifiable_pairs", "verifier/decisive", "verifier/ties", "judge/pairs", "judge/labelled",
            "judge/ties", "judge/inconsistent", "collect/feedback_comparisons") if k in c},
        "validate": {k.removeprefix("validate/"): v[k] for k in (
            "validate/rows_in", "validate/rows_valid", "validate/rows_quarantined", "validate/train_rows",
            "validate/validation_rows", "validate/test_rows", "validate/ties") if k in v},
    }


def acceptance(f: dict, cycle: dict) -> dict:
    """Issue 16's checks, each with its value, threshold and verdict."""
    gain = f["gold"]["gain_vs_sft"]
    sft, challenger = f["per_model"]["sft"], f["per_model"][evaluate.CHALLENGER]
    rm = f["reward_model"]
    checks = {
        "promoted": {"value": f["promote"]["promoted"], "threshold": True, "passed": f["promote"]["promoted"]},
        "heldout_tasks": {"value": f["gold"]["heldout_tasks"], "threshold": f">= {MIN_HELDOUT_TASKS}",
                          "passed": f["gold"]["heldout_tasks"] >= MIN_HELDOUT_TASKS},
        "gold_gain_vs_sft": {"value": gain["value"], "threshold": f">= {MIN_GOLD_GAIN}",
                             "passed": gain["value"] >= MIN_GOLD_GAIN},
        "gold_gain_vs_sft_lower": {"value": gain["interval"][0], "threshold": "> 0", "passed": gain["interval"][0] > 0},
        "kl": {"value": f["kl"]["evaluate"], "threshold": f"<= {MAX_KL}", "passed": f["kl"]["evaluate"] <= MAX_KL},
        "rm_heldout_accuracy": {"value": rm["value"], "threshold": f">= {MIN_RM_ACCURACY}",
                                "passed": rm["value"] >= MIN_RM_ACCURACY},
        "rm_heldout_pairs": {"value": rm["heldout_pairs"], "threshold": f">= {MIN_RM_PAIRS}",
                             "passed": rm["heldout_pairs"] >= MIN_RM_PAIRS},
        "toxicity_probability": {"value": challenger["toxicity_probability"],
                                 "threshold": f"<= SFT's {sft['toxicity_probability']} + {MAX_TOXICITY_INCREASE}",
                                 "passed": challenger["toxicity_probability"]
                                 <= sft["toxicity_probability"] + MAX_TOXICITY_INCREASE + 1e-9},
        "truthfulqa_mc2": {"value": challenger["truthfulqa_mc2"],
                           "threshold": f">= SFT's {sft['truthfulqa_mc2']} - {MAX_MC2_DROP}",
                           "passed": challenger["truthfulqa_mc2"] >= sft["truthfulqa_mc2"] - MAX_MC2_DROP - 1e-9},
        "cycle_seconds": {"value": cycle["wall_seconds"], "threshold": f"<= {MAX_CYCLE_SECONDS}",
                          "passed": cycle["wall_seconds"] <= MAX_CYCLE_SECONDS},
        "every_stage_ran_in_cycle": {"value": cycle["every_stage_ran"], "threshold": True,
                                     "passed": cycle["every_stage_ran"]},
    }
    for judge, by_opponent in f["win_rates"].items():
        for o, w in by_opponent.items():
            checks[f"{judge}_win_rate_vs_{o}_lower"] = {"value": w["interval"][0], "threshold": f"> {MIN_WIN_RATE_LOWER}",
                                                        "passed": w["interval"][0] > MIN_WIN_RATE_LOWER}
    return checks


# ------------------------------------------------------------------------------------------------
# The RM-reward variant
# ------------------------------------------------------------------------------------------------

def measure_gold(folder: str | Path, tasks, params, dtype: torch.dtype):
    """Greedy gold accuracy as evaluate measures it: the SFT tokenizer, evaluate's decoding settings."""
    e = params.evaluate
    model = load_causal_lm(folder, dtype).eval()
    tokenizer = load_tokenizer(SFT_DIR)
    return gold_accuracy(
        lambda texts: greedy_replies(model, tokenizer, texts, e.verifier_max_new_tokens, e.batch_size, e.max_prompt_len,
                                     eos_ids(model, tokenizer), model.device),
        tasks, params.tasks.instruction, e.win_rate_confidence)


def held_out_kl(folders: dict[str, str | Path], params, dtype: torch.dtype) -> dict:
    """Mean KL to SFT and proxy RM score on the test split's prompts, as evaluate measures them."""
    e = params.evaluate
    _, prompts = held_out_prompts([], e.heldout_prompts, e.seed)
    tokenizer = load_tokenizer(SFT_DIR)
    reference = load_causal_lm(SFT_DIR, dtype).eval()
    rm, stats = load_reward_model(REWARD_DIR, dtype)
    rm.eval()
    out = {}
    for name, folder in folders.items():
        rollouts = evaluate.policy_rollouts(load_causal_lm(folder, dtype).eval(), reference, rm, stats, tokenizer,
                                            prompts, e)
        out[name] = {"kl": rollouts.mean("kl"), "rm_score": rollouts.mean("scores"),
                     "response_length": rollouts.mean("lengths"), "prompts": len(prompts)}
    return out


def gold_entry(gold, sft, confidence: float) -> dict:
    gain, lower, upper = accuracy_difference(gold, sft, confidence)
    return {"gold_accuracy": gold.accuracy, "gold_interval": [gold.lower, gold.upper],
            "gain_vs_sft": gain, "gain_vs_sft_interval": [lower, upper]}


def rm_variant(params, figures: dict, cycle_label: str, allow_weak: bool = False) -> dict:
    """Train the cycle's policy settings with `policy.reward: rm`, then measure it, SFT and the cycle's policy (named
    `cycle_label`) alike. `allow_weak` is the stage's policy.allow_weak_reward_model: train past the RM gate, and
    the result says it was forced."""
    p = dataclasses.replace(params.policy, reward="rm", allow_weak_reward_model=allow_weak or params.policy.allow_weak_reward_model)
    precision, dtype = params.model.precision, resolve_precision(params.model.precision)
    quality = policy.reward_model_quality(REWARD_DIR, precision)
    train_anyway, why = policy.reward_model_gate(quality["lower"], p.allow_weak_reward_model)
    entry = {"settings": dataclasses.asdict(p), "rm_gate": {**quality, "decision": why}}
    if not train_anyway:
        message = policy.weak_reward_model_message(quality)
        print(f"default_cycle: the RM-reward variant is not trained, as the policy stage would not: {message}")
        return {**entry, "trained": False, "reason": message}

    gold_tasks = heldout_tasks(params.tasks)[:p.gold_tasks]
    pool, tasks, _ = policy.training_prompts(p, params.tasks)
    train_prompts, heldout = held_out_prompts(pool, p.eval_responses, p.seed)
    with tempfile.TemporaryDirectory(prefix="default-cycle-rm-") as work:
        out = Path(work) / "policy-rm"
        print(f"default_cycle: training the RM-reward variant ({p.algorithm}, {p.iterations} iterations of "
              f"{p.batch_size} responses) into {out}")
        tic = time.perf_counter()
        result = policy.train(p, precision, SFT_DIR, REWARD_DIR, train_prompts, heldout, out, Path(work) / "checkpoints",
                              tasks=tasks, gold=gold_tasks, instruction=params.tasks.instruction)
        entry.update(trained=True, train_seconds=round(time.perf_counter() - tic, 1),
                     policy_stage_metrics={k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))})
        tasks_all = heldout_tasks(params.tasks)
        golds = {}
        for name, folder in (("sft", SFT_DIR), (cycle_label, POLICY_DIR), ("rm-reward", out)):
            print(f"default_cycle: gold accuracy of {name} on {len(tasks_all)} held-out tasks (greedy)")
            golds[name] = measure_gold(folder, tasks_all, params, dtype)
        print("default_cycle: KL to SFT and proxy RM score of both variants on the test split's prompts")
        kl = held_out_kl({cycle_label: POLICY_DIR, "rm-reward": out}, params, dtype)
    confidence = params.evaluate.win_rate_confidence
    sft = golds["sft"]
    difference = accuracy_difference(golds["rm-reward"], golds[cycle_label], confidence)
    remeasured = {"sft": sft.accuracy, cycle_label: golds[cycle_label].accuracy}
    evaluated = {"sft": figures["gold"]["sft"]["value"], cycle_label: figures["gold"]["challenger"]["value"]}
    return {**entry,
            "sft_gold": {"gold_accuracy": sft.accuracy, "gold_interval": [sft.lower, sft.upper], "tasks": sft.n},
            "variants": {name: {**gold_entry(golds[name], sft, confidence), "kl": kl[name]["kl"],
                                "proxy_rm_score": kl[name]["rm_score"], "response_length": kl[name]["response_length"],
                                "kl_prompts": kl[name]["prompts"]}
                         for name in (cycle_label, "rm-reward")},
            "rm_minus_cycle_policy": {"value": difference[0], "interval": list(difference[1:])},
            "remeasured_matches_evaluate": {k: abs(remeasured[k] - evaluated[k]) < 1e-4 for k in remeasured}}


# ------------------------------------------------------------------------------------------------

def table(f: dict, checks: dict, stages: dict, cycle: dict, rm: dict | None, policy_label: str) -> str:
    def row(label, gold, gold_interval, gain=None, gain_interval=None, kl=None):
        gain_text = f"{gain:+.3f} [{gain_interval[0]:+.3f}, {gain_interval[1]:+.3f}]" if gain is not None else ""
        return (f"{label:26} {gold:.3f} [{gold_interval[0]:.3f}, {gold_interval[1]:.3f}]  {gain_text:26}  "
                f"{'' if kl is None else f'{kl:.2f}'}")

    g = f["gold"]
    rows = [f"{'':26} {'gold [95%]':21}  {'gain vs SFT [95%, paired]':26}  KL (nats)",
            row("SFT (evaluate)", g["sft"]["value"], g["sft"]["interval"]),
            row(f"{policy_label} (evaluate)", g["challenger"]["value"], g["challenger"]["interval"],
                g["gain_vs_sft"]["value"], g["gain_vs_sft"]["interval"], f["kl"]["evaluate"])]
    if rm and rm.get("trained"):
        rows.append(row("SFT (here)", rm["sft_gold"]["gold_accuracy"], rm["sft_gold"]["gold_interval"]))
        for name in (policy_label, "rm-reward"):
            v = rm["variants"][name]
            rows.append(row(f"{name} (here)", v["gold_accuracy"], v["gold_interval"], v["gain_vs_sft"],
                            v["gain_vs_sft_interval"], v["kl"]))
        d = rm["rm_minus_cycle_policy"]
        rows.append(f"rm-reward minus {policy_label}: {d['value']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
    elif rm:
        rows.append("rm-reward: not trained (the reward model's gate; see rm_variant.reason)")
    rows.append(f"\ncycle {cycle['wall_seconds'] / 60:.1f} min: " + ", ".join(
        f"{s} {v['seconds']:.0f}s" if v.get("seconds") is not None else f"{s} -" for s, v in stages.items()))
    rows.append("acceptance: " + ", ".join(f"{name} {'PASS' if c['passed'] else 'FAIL'}" for name, c in checks.items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(REPO), help="the checkout where the cycle ran (default: this one)")
    parser.add_argument("--rm-variant", action="store_true",
                        help="also train and measure the policy with policy.reward rm (~20 min on 2 cores)")
    parser.add_argument("--allow-weak-rm", action="store_true",
                        help="with --rm-variant: train even when the RM's held-out accuracy is not above chance, as "
                             "policy.allow_weak_reward_model does (the JSON records rm_gate.decision 'forced')")
    parser.add_argument("--out", default=None, help="the result JSON (default: benchmarks/results/default_cycle.json)")
    args = parser.parse_args(argv)
    project = Path(args.project).resolve()
    if not (project / "params.yaml").exists():
        raise SystemExit(f"default_cycle: {project} has no params.yaml, so it is not a checkout of this project. Pass "
                         "--project the folder where `rlhf cycle` ran (e.g. /tmp/c1/fresh), or leave it out for this one.")
    out = Path(args.out).resolve() if args.out else None
    os.chdir(project)  # the stages' paths (metrics/, models/, data/) and MLflow's default store are the project's

    try:
        params = load_params()
    except ParamError as error:
        raise SystemExit(f"default_cycle: {error}") from None
    metrics = read_metrics(project)
    figures = cycle_figures(metrics)
    cycle, stages, warnings = stage_times(cycle_runs(project), project)
    checks = acceptance(figures, cycle)
    weights = params.policy.reward_weights
    policy_label = "verifier-reward" if weights == {"verifier": 1.0} else f"reward {weights}"
    if args.rm_variant and params.policy.uses_reward_model:
        raise SystemExit(f"default_cycle: --rm-variant trains the policy with policy.reward rm beside the cycle's, but "
                         f"the cycle's params.yaml already has policy.reward {params.policy.reward!r}. Run it on a "
                         "checkout whose cycle ran with the default `policy.reward: verifier`.")
    rm = rm_variant(params, figures, policy_label, args.allow_weak_rm) if args.rm_variant else None
    for warning in warnings:
        print(f"default_cycle: warning: {warning}")

    report = {
        "command": " ".join(["nice -n 10 .venv/bin/python -m benchmarks.default_cycle",
                             *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": tracking.git_commit(),  # the project's (the cwd)
        "benchmark_commit": checkout_commit(REPO),
        "project": str(project),
        "machine": machine(),
        "cycle": cycle,
        "stages": stages,
        "warnings": warnings,
        "policy_reward": weights,
        "policy_algorithm": params.policy.algorithm,
        **figures,
        "acceptance": checks,
        "acceptance_passed": all(c["passed"] for c in checks.values()),
        "reward_variants": {policy_label: {"gold_accuracy": figures["gold"]["challenger"]["value"],
                                           "gold_interval": figures["gold"]["challenger"]["interval"],
                                           "gain_vs_sft": figures["gold"]["gain_vs_sft"]["value"],
                                           "gain_vs_sft_interval": figures["gold"]["gain_vs_sft"]["interval"],
                                           "kl": figures["kl"]["evaluate"], "source": METRICS["evaluate"]}},
        "rm_variant": rm,
    }
    if rm and rm.get("trained"):  # both measured here, the same way, against the same SFT measurement
        report["reward_variants"] = {name: {**rm["variants"][name], "source": "measured here as evaluate measures"}
                                     for name in (policy_label, "rm-reward")}
    numbers = {"cycle_seconds": cycle["wall_seconds"],
               "stage_seconds": {s: v["seconds"] for s, v in stages.items() if v.get("seconds") is not None},
               "gold": {"sft": figures["gold"]["sft"]["value"], "challenger": figures["gold"]["challenger"]["value"],
                        "gain_vs_sft": figures["gold"]["gain_vs_sft"]["value"],
                        "gain_vs_sft_lower": figures["gold"]["gain_vs_sft"]["interval"][0]},
               "kl": figures["kl"]["evaluate"], "rm_heldout_accuracy": figures["reward_model"]["value"],
               "acceptance_passed": float(report["acceptance_passed"]),
               "reward_variants": {k: {"gold_accuracy": v["gold_accuracy"], "gain_vs_sft": v["gain_vs_sft"], "kl": v["kl"]}
                                   for k, v in report["reward_variants"].items()}}
    save(NAME, report, numbers, out, params={"project": str(project), "rm_variant": args.rm_variant})
    print(table(figures, checks, stages, cycle, rm, policy_label))
    return 0


def checkout_commit(folder: Path) -> str:
    """This benchmark's own checkout's commit (tracking.git_commit reads the current folder's)."""
    here = Path.cwd()
    os.chdir(folder)
    try:
        return tracking.git_commit()
    finally:
        os.chdir(here)


if __name__ == "__main__":
    sys.exit(main())
