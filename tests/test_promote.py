"""The promotion gate decides by its rules and says which one; the registry keeps every decision."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from rlhf import promote, registry
from rlhf.models import load_causal_lm
from rlhf.params import PromoteParams

GATE = PromoteParams()
GOOD = {"win_rate_lower": 0.56, "truthfulness_mc2": 0.40, "toxicity_probability": 0.10, "kl": 3.0}


def test_first_model_passing_the_absolute_rules_becomes_champion():
    decision = promote.should_promote(GOOD, None, GATE)
    assert decision.promote and decision.rule == "first_champion"


@pytest.mark.parametrize("change, rule", [
    ({"kl": 12.0}, "max_kl"),
    ({"toxicity_probability": 0.6}, "max_toxicity_probability"),
    ({"win_rate_lower": 0.49}, "win_rate"),
    ({"win_rate_lower": 0.5}, "win_rate"),          # the bound must be strictly above 0.5
    ({"truthfulness_mc2": 0.37}, "truthfulness"),   # dropped 0.03 > 0.02
    ({"toxicity_probability": 0.13}, "toxicity"),   # rose 0.03 > 0.02
])
def test_each_rule_can_refuse(change, rule):
    champion = {"truthfulness_mc2": 0.40, "toxicity_probability": 0.10}
    decision = promote.should_promote({**GOOD, **change}, champion, GATE)
    assert not decision.promote and decision.rule == rule, decision


def test_a_challenger_that_beats_the_champion_within_tolerances_is_promoted():
    champion = {"truthfulness_mc2": 0.41, "toxicity_probability": 0.09}
    decision = promote.should_promote(GOOD, champion, GATE)
    assert decision.promote and decision.rule == "beats_champion"
    assert "0.560" in decision.reason


def test_missing_figures_never_promote():
    assert not promote.should_promote({}, None, GATE).promote


@pytest.mark.slow
def test_registry_round_trip_with_gate_decisions_and_overrides(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rlhf import tracking
    import mlflow

    tracking.use_project_store()
    client = MlflowClient()
    name = "tiny-policy"
    versions = []
    for figures in (GOOD, {**GOOD, "win_rate_lower": 0.45}):
        with mlflow.start_run():
            version = promote.register_checkpoint(str(tiny_model_dir), name, "text-generation",
                                                  {**figures, "git.commit": "abc"})
            _, champion = promote.champion_figures(client, name)
            decision = promote.should_promote(figures, champion, GATE)
            promote.record_decision(client, name, version, decision, by="gate")
            versions.append((version, decision))
    (v1, d1), (v2, d2) = versions
    assert d1.rule == "first_champion" and not d2.promote and d2.rule == "win_rate"
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.rule"] == "win_rate" and tags["git.commit"] == "abc" and float(tags["kl"]) == 3.0

    folder = registry.champion_checkpoint(name)
    model = load_causal_lm(folder)
    ids = torch.tensor([[1, 5, 7]])
    reference = load_causal_lm(tiny_model_dir)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)

    promote.set_champion(name, v2, reason="reviewed by hand", by="alice")
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    assert client.get_model_version(name, v2).tags["gate.by"] == "alice"
    assert promote.rollback(name, reason="regression in production", by="bob") == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


def test_gate_reads_the_evaluate_stage_metric_names():
    evaluation = {"eval/win_rate_vs_champion_lower": 0.52, "eval/truthfulness_probe_mc2": 0.4,
                  "eval/provocation_probe_toxicity_probability": 0.1, "eval/kl": 2.5}
    assert promote.gate_figures(evaluation) == {"win_rate_lower": 0.52, "truthfulness_mc2": 0.4,
                                                "toxicity_probability": 0.1, "kl": 2.5}
    real = {"eval/truthfulqa_mc2": 0.3, "eval/realtoxicityprompts_toxicity_probability": 0.2}
    assert promote.gate_figures(real)["truthfulness_mc2"] == 0.3
    assert promote.gate_figures(real)["toxicity_probability"] == 0.2


def test_lineage_tags_name_every_comparison_source_in_a_form_mlflow_accepts(tmp_path, monkeypatch):
    import pandas as pd
    from mlflow.utils.validation import _validate_tag_name

    from rlhf.comparisons import write_comparisons

    sources = ["judge:SmolLM2-135M-Instruct+rubric", "human:nov", "feedback:rlhf-policy/3"]
    rows = [{"pair_id": str(i), "prompt": "p", "response_a": "x", "response_b": "y", "chosen": "a", "source": source,
             "policy_version": None, "votes": None, "agreement": None,
             "created_at": pd.Timestamp("2026-01-01", tz="UTC")} for i, source in enumerate(sources)]
    write_comparisons(pd.DataFrame(rows), tmp_path / "train.parquet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(promote, "COMPARISONS", "train.parquet")
    counts = {k: v for k, v in promote.lineage_tags().items() if k.startswith("comparisons.")}
    assert counts == {"comparisons.judge:SmolLM2-135M-Instruct_rubric": 1, "comparisons.human:nov": 1,
                      "comparisons.feedback:rlhf-policy/3": 1}
    for key in counts:
        _validate_tag_name(key)
