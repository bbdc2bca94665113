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
GATE_FIGURES = ("win_rate_lower", "truthfulness_mc2", "toxicity_probability", "kl")


@dataclass(frozen=True)
class Decision:
    promote: bool
    rule: str    # the rule that decided
    reason: str  # one sentence with the numbers


def gate_figures(evaluation: dict) -> dict:
    """The evaluation figures the gate reads, whichever truthfulness and toxicity sets were used."""
    def first(*keys):
        return next((evaluation[k] for k in keys if k in evaluation), None)

    return {
        "win_rate_lower": evaluation.get("eval/win_rate_vs_champion_lower"),
        "truthfulness_mc2": first("eval/truthfulqa_mc2", "eval/truthfulness_probe_mc2"),
        "toxicity_probability": first("eval/realtoxicityprompts_toxicity_probability",
                                      "eval/provocation_probe_toxicity_probability"),
        "kl": evaluation.get("eval/kl"),
    }


def should_promote(challenger: dict, champion: dict | None, gate: PromoteParams) -> Decision:
    """Absolute rules first (every model), then the comparison with the champion (when one exists)."""
    kl, tox = challenger.get("kl"), challenger.get("toxicity_probability")
    if kl is None or kl > gate.max_kl:
        return Decision(False, "max_kl", f"KL to the SFT reference is {kl} nats, above the limit {gate.max_kl}.")
    if tox is None or tox > gate.max_toxicity_probability:
        return Decision(False, "max_toxicity_probability",
                        f"toxicity probability is {tox}, above the limit {gate.max_toxicity_probability}.")
    if champion is None:
        return Decision(True, "first_champion", "no champion exists and the challenger passes the absolute rules.")
    lower = challenger.get("win_rate_lower")
    if lower is None or lower <= gate.min_win_rate_lower_bound:
        return Decision(False, "win_rate",
                        f"the win-rate's lower confidence bound against the champion is {lower}, "
                        f"not above {gate.min_win_rate_lower_bound}.")
    mc2_drop = (champion.get("truthfulness_mc2") or 0.0) - (challenger.get("truthfulness_mc2") or 0.0)
    if mc2_drop > gate.max_truthfulness_drop:
        return Decision(False, "truthfulness", f"truthfulness MC2 dropped by {mc2_drop:.4f}, more than {gate.max_truthfulness_drop}.")
    tox_rise = tox - (champion.get("toxicity_probability") or 0.0)
    if tox_rise > gate.max_toxicity_increase:
        return Decision(False, "toxicity", f"toxicity probability rose by {tox_rise:.4f}, more than {gate.max_toxicity_increase}.")
    return Decision(True, "beats_champion",
                    f"win-rate lower bound {lower:.3f} > {gate.min_win_rate_lower_bound}, MC2 change {-mc2_drop:+.4f}, "
                    f"toxicity change {tox_rise:+.4f}, KL {kl:.2f}.")


def _champion_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_figures(client: MlflowClient, name: str) -> tuple[str | None, dict | None]:
    """The champion's version and the gate figures recorded on it when it was registered."""
    version = _champion_version(client, name)
    if version is None:
        return None, None
    return str(version.version), {k: float(v) if v not in ("", "None") else None
                             for k, v in version.tags.items() if k in GATE_FIGURES and v is not None}


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
                       "gate.reason": decision.reason, "gate.by": by,
                       "gate.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():
        client.set_model_version_tag(name, version, key, str(value))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)


def set_champion(name: str, version: str, reason: str, by: str | None = None) -> Decision:
    """A person's override: make `version` the champion, recorded with who and why."""
    tracking.use_project_store()
    client = MlflowClient()
    client.get_model_version(name, version)  # fails clearly if it does not exist
    decision = Decision(True, "manual", reason)
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


def main() -> int:
    params = load_params()
    gate = params.promote
    evaluation = json.loads(Path(EVALUATION).read_text()) if Path(EVALUATION).exists() else {}
    if not evaluation:
        raise FileNotFoundError(f"no evaluation at {EVALUATION}; run `dvc repro evaluate` before promoting.")
    with tracking.stage_run("promote", {"promote": params.section("promote")}) as run:
        client = MlflowClient()
        champion_version, champion = champion_figures(client, gate.model_name)
        figures = gate_figures(evaluation)
        tags = {**lineage_tags(), **figures, "mlflow.source_run": run.info.run_id}
        reward_version = register_checkpoint(REWARD_DIR, gate.reward_model_name, "text-classification", tags)
        version = register_checkpoint(POLICY_DIR, gate.model_name, "text-generation",
                                      {**tags, "reward_model.version": reward_version})
        client.set_registered_model_alias(gate.model_name, CHALLENGER, version)
        decision = should_promote(figures, champion, gate)
        record_decision(client, gate.model_name, version, decision, by="gate")
        mlflow.set_tags({"gate.promote": decision.promote, "gate.rule": decision.rule, "gate.reason": decision.reason})
        tracking.write_metrics(METRICS, {"promote/promoted": int(decision.promote), "promote/version": int(version),
                                         "promote/champion_before": int(champion_version or 0)})
    print(f"promote: {gate.model_name} v{version} {'is the new champion' if decision.promote else 'stays challenger'} "
          f"({decision.rule}: {decision.reason})")
    return 0


if __name__ == "__main__":
    run_stage(main)

