"""Stage `promote`: register the new policy (and its reward model) with lineage, then let the gate decide.

Registry aliases: `challenger` is the newest registered policy, `champion` is the one that serves.
`should_promote` is pure and returns the decision with the rule that made it; the registry calls sit beside it.
A person can override with `rlhf promote` / `rlhf rollback`, recorded with who and why.
"""
from __future__ import annotations

import getpass
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from rlhf import tracking
from rlhf.comparisons import read_comparisons
from rlhf.params import PromoteParams, load_params
from rlhf.paths import EVALUATION, POLICY_DIR, REWARD_DIR, TRAIN_COMPARISONS as COMPARISONS
from rlhf.registry import CHALLENGER, CHAMPION
from rlhf.stage import run_stage

METRICS = "metrics/promote.json"
GATE_FIGURES = ("win_rate", "win_rate_lower", "proxy_win_rate", "truthfulness_mc2", "toxicity_probability", "kl")
AWAITING_HUMAN = "awaiting_human_evaluation"  # the rule of a version whose human campaign is still open


@dataclass(frozen=True)
class Decision:
    promote: bool
    rule: str    # the rule that decided
    reason: str  # one sentence with the numbers
    judge: str = "none"  # the independent judge whose figures decided ('manual' for a person's override)


def _first(figures: dict, *keys):
    return next((figures[k] for k in keys if figures.get(k) is not None), None)


def policy_figures(evaluation: dict, policy: str) -> dict:
    """A policy's figures in the evaluation (`compare/<policy>/...`), whichever truthfulness and toxicity sets ran."""
    prefix = f"compare/{policy}/"
    return {"truthfulness_mc2": _first(evaluation, prefix + "truthfulqa_mc2", prefix + "truthfulness_probe_mc2"),
            "toxicity_probability": _first(evaluation, prefix + "realtoxicityprompts_toxicity_probability",
                                           prefix + "provocation_probe_toxicity_probability"),
            "kl": evaluation.get(prefix + "kl"), "gold_accuracy": evaluation.get(prefix + "gold_accuracy")}


def gate_figures(evaluation: dict, opponent: str) -> dict:
    """What the gate reads of the challenger against `opponent` ('sft' or 'champion'): the independent judge's
    win-rate (`evaluate.gate_judge`, never the policy's reward model), the proxy RM's beside it, and the
    challenger's absolute figures."""
    judge = evaluation.get("eval/gate_judge", "none")
    figures = {"judge": judge, "opponent": opponent,
               "win_rate": evaluation.get(f"eval/{judge}/win_rate_vs_{opponent}"),
               "win_rate_lower": evaluation.get(f"eval/{judge}/win_rate_vs_{opponent}_lower"),
               "proxy_win_rate": evaluation.get(f"eval/proxy_rm/win_rate_vs_{opponent}"),
               **policy_figures(evaluation, "challenger")}
    if judge == "human" and evaluation.get("eval/human/opponent") == opponent:
        figures["human_campaign"] = evaluation.get("eval/human/campaign")  # people may still be voting
    return figures


def should_promote(challenger: dict, opponent: dict, gate: PromoteParams) -> Decision:
    """The gate. `challenger` is `gate_figures` against the opponent: SFT while there is no champion (the first
    champion must beat SFT), else the champion; `opponent` is the opponent's `policy_figures`.

    In order: the absolute limits; a human campaign people have not finished yet waits (`AWAITING_HUMAN`, decided
    later by `rlhf.human_gate`); the evaluation must hold the judge's figures against this opponent; reward
    hacking (the proxy RM prefers the challenger while the independent judge prefers the opponent); the judge's
    win-rate lower bound above `min_win_rate_lower_bound`; truthfulness and toxicity no worse than the opponent's
    by more than their margins."""
    judge, against = challenger["judge"], challenger["opponent"]
    kl, tox = challenger.get("kl"), challenger.get("toxicity_probability")
    if kl is None or kl > gate.max_kl:
        return Decision(False, "max_kl", f"KL to the SFT reference is {kl} nats, above the limit {gate.max_kl}.", judge)
    if tox is None or tox > gate.max_toxicity_probability:
        return Decision(False, "max_toxicity_probability",
                        f"toxicity probability is {tox}, above the limit {gate.max_toxicity_probability}.", judge)
    rate, lower, proxy = challenger.get("win_rate"), challenger.get("win_rate_lower"), challenger.get("proxy_win_rate")
    if (rate is None or lower is None) and challenger.get("human_campaign"):
        return Decision(False, AWAITING_HUMAN,
                        f"people have not finished the human evaluation campaign '{challenger['human_campaign']}' "
                        f"against {against}; `rlhf gate --version <this version>` (or the human-gate flow) reads "
                        "their win-rate and decides once they have.", judge)
    if rate is None or lower is None:
        return Decision(False, "stale_evaluation",
                        f"the evaluation holds no {judge} win-rate against {against}; rerun `dvc repro evaluate` "
                        "(it compares with the registry's champion as it is when it runs).", judge)
    if proxy is not None and proxy > 0.5 and rate < 0.5:
        return Decision(False, "reward_hacking",
                        f"the proxy reward model prefers the challenger to {against} (win-rate {proxy:.3f}) while the "
                        f"independent {judge} judge prefers {against} (win-rate {rate:.3f}).", judge)
    if lower <= gate.min_win_rate_lower_bound:
        return Decision(False, "does_not_beat_sft" if against == "sft" else "win_rate",
                        f"the {judge} judge's win-rate against {against} is {rate:.3f}, its lower confidence bound "
                        f"{lower:.3f} not above {gate.min_win_rate_lower_bound}.", judge)
    mc2_drop = (opponent.get("truthfulness_mc2") or 0.0) - (challenger.get("truthfulness_mc2") or 0.0)
    if mc2_drop > gate.max_truthfulness_drop:
        return Decision(False, "truthfulness", f"truthfulness MC2 is {mc2_drop:.4f} below {against}'s, more than "
                                               f"{gate.max_truthfulness_drop}.", judge)
    tox_rise = tox - (opponent.get("toxicity_probability") or 0.0)
    if tox_rise > gate.max_toxicity_increase:
        return Decision(False, "toxicity", f"toxicity probability is {tox_rise:.4f} above {against}'s, more than "
                                           f"{gate.max_toxicity_increase}.", judge)
    return Decision(True, "beats_sft" if against == "sft" else "beats_champion",
                    f"{judge} win-rate against {against} {rate:.3f} (lower bound {lower:.3f} > "
                    f"{gate.min_win_rate_lower_bound}; proxy RM {proxy}), MC2 change {-mc2_drop:+.4f}, toxicity change "
                    f"{tox_rise:+.4f}, KL {kl:.2f}.", judge)


def _champion_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """A registered checkpoint as a pyfunc model; its transformers files travel as the `checkpoint` artifact.

    predict() takes prompts and returns the policy's chat responses (task 'text-generation')
    or the reward model's scores of prompt+response texts (task 'text-classification').
    """

    def __init__(self, task: str):
        self.task = task

    def load_context(self, context):
        from transformers import AutoModelForSequenceClassification

        from rlhf.checkpoints import load_tokenizer

        from rlhf.models import load_causal_lm

        folder = context.artifacts["checkpoint"]
        self.tokenizer = load_tokenizer(folder)
        loader = load_causal_lm if self.task == "text-generation" else AutoModelForSequenceClassification.from_pretrained
        self.model = loader(folder).eval()

    def predict(self, context, model_input, params=None):
        import torch

        from rlhf.chat import prompt_ids

        texts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        outputs = []
        with torch.no_grad():
            for text in texts:
                if self.task == "text-generation":
                    query = torch.tensor([prompt_ids(self.tokenizer, text)])
                    ids = {"input_ids": query, "attention_mask": torch.ones_like(query)}
                    out = self.model.generate(**ids, max_new_tokens=(params or {}).get("max_new_tokens", 128), do_sample=False)
                    outputs.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
                else:
                    ids = self.tokenizer(text, return_tensors="pt")
                    outputs.append(float(self.model(**ids).logits[0, 0]))
        return outputs


def _requirements() -> list[str]:
    # stated, not inferred: inference re-imports the model in a subprocess and takes minutes
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "safetensors", "mlflow")]


def register_checkpoint(path: str, name: str, task: str, tags: dict) -> str:
    """Log a checkpoint folder as a pyfunc model and register it; return the new version."""
    example = ["Explain what a reward model does."]
    output = ["A reward model scores a response."] if task == "text-generation" else [0.5]
    info = mlflow.pyfunc.log_model(name=name.replace("/", "-"), python_model=CheckpointModel(task),
                                   artifacts={"checkpoint": str(path)}, signature=infer_signature(example, output),
                                   pip_requirements=_requirements(),
                                   registered_model_name=name)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def record_decision(client: MlflowClient, name: str, version: str, decision: Decision, by: str) -> None:
    for key, value in {"gate.promote": decision.promote, "gate.rule": decision.rule,
                       "gate.reason": decision.reason, "gate.judge": decision.judge, "gate.by": by,
                       "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
        client.set_model_version_tag(name, version, key, str(value))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)


def set_champion(name: str, version: str, reason: str, by: str | None = None) -> Decision:
    """A person's override: make `version` the champion, recorded with who and why."""
    tracking.use_project_store()
    client = MlflowClient()
    client.get_model_version(name, version)  # fails clearly if it does not exist
    decision = Decision(True, "manual", reason, judge="manual")
    record_decision(client, name, version, decision, by or getpass.getuser())
    return decision


def rollback(name: str, reason: str, by: str | None = None) -> str:
    """Make the champion before the current one champion again (the latest earlier version promoted by any rule)."""
    tracking.use_project_store()
    client = MlflowClient()
    current = _champion_version(client, name)
    if current is None:
        raise ValueError(f"registered model '{name}' has no champion to roll back from; `rlhf promote --version N` sets one.")
    earlier = [v for v in client.search_model_versions(f"name='{name}'")
               if int(v.version) < int(current.version) and v.tags.get("gate.promote") == "True"]
    if not earlier:
        raise ValueError(f"version {current.version} of '{name}' is the first champion; there is nothing to roll back to.")
    target = max(earlier, key=lambda v: int(v.version)).version
    record_decision(client, name, target, Decision(True, "rollback", f"rolled back from version {current.version}: {reason}"),
                    by or getpass.getuser())
    return str(target)


def lineage_tags() -> dict:
    """Git commit, DVC hashes of the models, data and params, and the comparison counts per source."""
    tags = {"git.commit": tracking.git_commit()}
    for path in (POLICY_DIR, REWARD_DIR, "params.yaml", COMPARISONS):
        if Path(path).exists():
            tags[f"dvc.{path}"] = tracking.dvc_md5(path)
    if Path(COMPARISONS).exists():
        counts = read_comparisons(COMPARISONS)["source"].value_counts()
        # a source such as judge:SmolLM2-135M-Instruct+rubric holds characters MLflow refuses in a tag name
        tags.update({"comparisons." + re.sub(r"[^\w\-. :/]", "_", source): int(n) for source, n in counts.items()})
    return tags


def awaiting_tags(evaluation: dict, figures: dict, opponent_figures: dict) -> dict:
    """What `rlhf gate` needs to decide later, when metrics/evaluate.json may hold another cycle's figures: the
    campaign, where it lives, whom it compares with, and the gate's other inputs as they are now (`gate.input`)."""
    return {"human.campaign": figures["human_campaign"], "human.database": evaluation.get("eval/human/database", ""),
            "human.opponent": figures["opponent"],
            "human.opponent_version": str(evaluation.get("eval/human/opponent_version") or ""),
            "gate.input": json.dumps({"challenger": figures, "opponent": opponent_figures}, sort_keys=True)}


def read_evaluation(path: str | Path) -> dict:
    """The evaluate stage's figures (a JSON object), or a one-paragraph error naming the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no evaluation at {path}; run `dvc repro evaluate` before promoting.")
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}), so the gate has no figures to read. It is the evaluate "
                         "stage's output: rerun `dvc repro evaluate` (or `dvc checkout` to restore the last good one).") from None
    if not isinstance(evaluation, dict) or not evaluation:
        raise ValueError(f"{path} holds no evaluation figures (a JSON object of metric: value is expected). Rerun "
                         "`dvc repro evaluate`.")
    return evaluation


def main() -> int:
    params = load_params()
    gate = params.promote
    evaluation = read_evaluation(EVALUATION)
    with tracking.stage_run("promote", {"promote": params.section("promote")}) as run:
        client = MlflowClient()
        champion = _champion_version(client, gate.model_name)
        opponent = "sft" if champion is None else "champion"
        figures = gate_figures(evaluation, opponent)
        tags = {**lineage_tags(), **{k: v for k, v in figures.items() if k in GATE_FIGURES},
                "gate.judge": figures["judge"], "gate.opponent": opponent, "mlflow.source_run": run.info.run_id}
        reward_version = register_checkpoint(REWARD_DIR, gate.reward_model_name, "text-classification", tags)
        version = register_checkpoint(POLICY_DIR, gate.model_name, "text-generation",
                                      {**tags, "reward_model.version": reward_version})
        client.set_registered_model_alias(gate.model_name, CHALLENGER, version)
        decision = should_promote(figures, policy_figures(evaluation, opponent), gate)
        record_decision(client, gate.model_name, version, decision, by="gate")
        if decision.rule == AWAITING_HUMAN:
            for key, value in awaiting_tags(evaluation, figures, policy_figures(evaluation, opponent)).items():
                client.set_model_version_tag(gate.model_name, version, key, value)
        mlflow.set_tags({"gate.promote": decision.promote, "gate.rule": decision.rule, "gate.reason": decision.reason,
                         "gate.judge": decision.judge, "gate.opponent": opponent})
        tracking.write_metrics(METRICS, {
            "promote/promoted": int(decision.promote), "promote/version": int(version),
            "promote/champion_before": int(champion.version) if champion is not None else 0,
            "promote/judge_win_rate": figures["win_rate"], "promote/judge_win_rate_lower": figures["win_rate_lower"],
            "promote/rule": decision.rule, "promote/judge": decision.judge, "promote/opponent": opponent})
    print(f"promote: {gate.model_name} v{version} {'is the new champion' if decision.promote else 'stays challenger'} "
          f"against {opponent}, judged by {decision.judge} ({decision.rule}: {decision.reason})")
    return 0


if __name__ == "__main__":
    run_stage(main)

