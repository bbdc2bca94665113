"""The gate's decision on a version that waits for people: `rlhf gate --version N` and flows/human_gate.py.

With `evaluate.gate_judge: human`, evaluate opens a campaign in the labeling app and the promote stage registers
the challenger with the rule `awaiting_human_evaluation` (not promoted, judge 'human'), tagged with the campaign
(`human.*`) and the gate's other inputs as they were (`gate.input`). `decide` reads the campaign:
- not complete (a pair short of its votes): nothing is recorded; the reading says how far people are;
- complete: the human win-rate (rlhf.human_eval.human_figures) goes through the same `should_promote` as every
  judge's, the decision is recorded on the version (promoting it when it passes) with the human figures as tags,
  and an MLflow run tagged with the version holds the figures as metrics.
Not a stage: it runs when people are done, which no DVC input can tell.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rlhf import tracking
from rlhf.human_eval import CampaignReading, HumanEvalError, display_url, human_figures, read_campaign
from rlhf.labeling.aggregate import QualityPolicy
from rlhf.params import PromoteParams
from rlhf.promote import AWAITING_HUMAN, Decision, record_decision, should_promote
from rlhf.registry import CHAMPION

NO_VERDICTS = "no_human_verdicts"


@dataclass(frozen=True)
class HumanGate:
    name: str
    version: str
    reading: CampaignReading
    decision: Decision | None  # None: people are not done; nothing was recorded
    figures: dict  # the human judge's eval/human/* figures once complete
    run_id: str | None  # the MLflow run that holds them

    def summary(self) -> str:
        where = f"{self.name} v{self.version}, campaign {self.reading.name}"
        if self.decision is None:
            return f"{where}: not complete, {self.reading.progress_line()}; no decision yet."
        outcome = "is the new champion" if self.decision.promote else "stays challenger"
        return (f"{where}: {self.reading.progress_line()}; {outcome}, judged by {self.decision.judge} "
                f"({self.decision.rule}: {self.decision.reason}) [MLflow run {self.run_id}]")


def awaiting_versions(name: str) -> list[str]:
    """The versions of registered model `name` whose gate decision waits for a human campaign, oldest first."""
    tracking.use_project_store()
    versions = MlflowClient().search_model_versions(f"name='{name}'")
    return sorted((str(v.version) for v in versions if v.tags.get("gate.rule") == AWAITING_HUMAN), key=int)


def _awaiting_version(client: MlflowClient, name: str, version: str):
    try:
        found = client.get_model_version(name, version)
    except MlflowException:
        raise HumanEvalError(
            f"registered model {name!r} has no version {version!r} in {tracking.tracking_uri()}. `rlhf gate` decides a "
            "version the promote stage registered with `evaluate.gate_judge: human`; check the number (the promote "
            "stage prints it, and the MLflow UI lists them), the --model name, and MLFLOW_TRACKING_URI.") from None
    tags = found.tags
    if tags.get("gate.rule") != AWAITING_HUMAN:
        raise HumanEvalError(
            f"{name} v{version} is not awaiting a human decision: its gate decision is '{tags.get('gate.rule')}' by "
            f"the {tags.get('gate.judge')} judge ({tags.get('gate.at')}). `rlhf gate` decides only versions the promote "
            f"stage left at {AWAITING_HUMAN} (evaluate.gate_judge: human); to override a decision by hand, "
            f"`rlhf promote --version {version} --reason ...`.")
    missing = [k for k in ("human.campaign", "human.opponent", "gate.input") if not tags.get(k)]
    if missing:
        raise HumanEvalError(
            f"{name} v{version} awaits a human decision but lacks the tag(s) {missing} the promote stage sets with it, "
            "so the gate cannot tell which campaign decides it. Rerun `dvc repro evaluate promote` to register it "
            "again with them, or decide by hand with `rlhf promote`.")
    return found


def stale_opponent(tags: dict, champion: str | None) -> Decision | None:
    """A campaign against someone other than today's opponent decides nothing: the challenger must beat the
    current champion (SFT while there is none)."""
    then = tags.get("human.opponent_version") or None
    if then == champion:
        return None
    was = f"champion v{then}" if then else "the SFT policy"
    now = f"v{champion} is the champion now" if champion else "there is no champion now"
    return Decision(False, "stale_evaluation",
                    f"people compared this version with {was}, but {now}; a challenger must beat today's opponent. "
                    "Rerun `dvc repro evaluate promote`: it opens a campaign against it.", "human")


def human_decision(challenger: dict, opponent: dict, figures: dict, reading: CampaignReading,
                   gate: PromoteParams) -> Decision:
    """`should_promote` with the human win-rate in place; no verdict at all is a decision of its own."""
    against = challenger["opponent"]
    if not figures.get(f"eval/human/n_vs_{against}"):
        return Decision(False, NO_VERDICTS,
                        f"none of the {len(reading.sides)} pairs of '{reading.name}' has a verdict: the votes of "
                        f"flagged annotators ({', '.join(sorted(reading.flagged)) or 'none'}, gold accuracy below the "
                        "threshold) do not count, and the app gives a pair to no more annotators than its overlap. Point "
                        "evaluate.human_database at a fresh database and rerun `dvc repro evaluate promote`, or decide "
                        "by hand with `rlhf promote`.", "human")
    human = {"win_rate": figures[f"eval/human/win_rate_vs_{against}"],
             "win_rate_lower": figures[f"eval/human/win_rate_vs_{against}_lower"]}
    return should_promote({**challenger, **human, "judge": "human"}, opponent, gate)


def decide(name: str, version: str, database: str, gate: PromoteParams, confidence: float,
           quality: QualityPolicy = QualityPolicy(), by: str = "gate") -> HumanGate:
    """Read the version's campaign; once complete, record the gate's decision and the human figures."""
    tracking.use_project_store()
    client = MlflowClient()
    tags = dict(_awaiting_version(client, name, str(version)).tags)
    reading = read_campaign(database, tags["human.campaign"], quality)
    if not reading.complete:
        return HumanGate(name, str(version), reading, None, {}, None)
    stored = json.loads(tags["gate.input"])
    against = tags["human.opponent"]
    figures = human_figures(reading.outcomes, reading.sides, against, confidence)
    try:
        champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        champion = None
    decision = stale_opponent(tags, champion) or human_decision(stored["challenger"], stored["opponent"], figures,
                                                                reading, gate)
    run_tags = {"rlhf.kind": "human_gate", "registry.model": name, "registry.version": str(version),
                "human.campaign": reading.name, "gate.promote": decision.promote, "gate.rule": decision.rule,
                "gate.reason": decision.reason, "gate.judge": decision.judge, "gate.opponent": against}
    with mlflow.start_run(run_name=f"human-gate-{name}-v{version}", tags=run_tags) as run:
        mlflow.log_params({"human.database": display_url(database), "human.annotators_per_pair": reading.overlap,
                           "quality.gold_accuracy_threshold": quality.gold_accuracy_threshold,
                           "quality.gold_min_answers": quality.gold_min_answers,
                           "quality.flagged_vote_weight": quality.flagged_vote_weight,
                           "win_rate_confidence": confidence})
        mlflow.log_metrics({**figures, "human/annotators": len(reading.gold), "human/flagged": len(reading.flagged),
                            "human/votes": reading.votes_so_far,
                            **({"human/kappa": reading.kappa} if reading.kappa is not None else {})})
        mlflow.log_dict({"pairs": {p: {"challenger_side": s, "outcome": reading.outcomes[p].status,
                                       "choice": reading.outcomes[p].choice, "votes": reading.votes[p]}
                                   for p, s in reading.sides.items()},
                         "flagged": sorted(reading.flagged)}, "human_verdicts.json")
    record_decision(client, name, str(version), decision, by)
    for key, value in {**{k.removeprefix("eval/").replace("/", "."): v for k, v in figures.items()},
                       "gate.mlflow_run": run.info.run_id}.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if f"eval/human/win_rate_vs_{against}" in figures:  # the figures promote left empty while people voted
        client.set_model_version_tag(name, str(version), "win_rate", str(figures[f"eval/human/win_rate_vs_{against}"]))
        client.set_model_version_tag(name, str(version), "win_rate_lower",
                                     str(figures[f"eval/human/win_rate_vs_{against}_lower"]))
    return HumanGate(name, str(version), reading, decision, figures, run.info.run_id)


def decide_when_complete(name: str, version: str, database: str, gate: PromoteParams, confidence: float,
                         wait_seconds: float = 0.0, poll_seconds: float = 60.0, report=print) -> HumanGate:
    """`decide`, again every `poll_seconds` while the campaign is not complete, for at most `wait_seconds`."""
    if wait_seconds < 0 or poll_seconds <= 0:
        raise HumanEvalError(
            f"--wait is {wait_seconds} and --poll {poll_seconds}: --wait is how long to keep looking (0 looks once, so "
            "it is >= 0) and --poll the pause between looks (> 0, e.g. 60). Fix them and run again.")
    deadline = time.monotonic() + wait_seconds
    while True:
        result = decide(name, version, database, gate, confidence)
        if result.decision is not None or time.monotonic() + poll_seconds > deadline:
            return result
        report(f"{result.summary()} Looking again in {poll_seconds:g} s.")
        time.sleep(poll_seconds)
