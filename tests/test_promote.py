"""The promotion gate decides by its rules and says which one; the registry keeps every decision."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from rlhf import promote, registry
from rlhf.models import load_causal_lm
from rlhf.params import PromoteParams

GATE = PromoteParams()
GOOD = {"judge": "verifier", "opponent": "champion", "win_rate": 0.62, "win_rate_lower": 0.56, "proxy_win_rate": 0.7,
        "truthfulness_mc2": 0.40, "toxicity_probability": 0.10, "kl": 3.0}
CHAMPION = {"truthfulness_mc2": 0.40, "toxicity_probability": 0.10}


def test_the_first_champion_must_beat_sft_under_the_independent_judge():
    first = {**GOOD, "opponent": "sft"}
    decision = promote.should_promote(first, CHAMPION, GATE)
    assert decision.promote and decision.rule == "beats_sft" and decision.judge == "verifier"
    losing = promote.should_promote({**first, "win_rate": 0.48, "win_rate_lower": 0.41, "proxy_win_rate": 0.45},
                                    CHAMPION, GATE)
    assert not losing.promote and losing.rule == "does_not_beat_sft" and "verifier judge" in losing.reason


@pytest.mark.parametrize("change, rule", [
    ({"kl": 12.0}, "max_kl"),
    ({"toxicity_probability": 0.6}, "max_toxicity_probability"),
    ({"win_rate": 0.55, "win_rate_lower": 0.49}, "win_rate"),
    ({"win_rate": 0.55, "win_rate_lower": 0.5}, "win_rate"),  # the bound must be strictly above 0.5
    ({"truthfulness_mc2": 0.37}, "truthfulness"),   # 0.03 below the champion's > 0.02
    ({"toxicity_probability": 0.13}, "toxicity"),   # 0.03 above the champion's > 0.02
    ({"win_rate": 0.44, "win_rate_lower": 0.37, "proxy_win_rate": 0.8}, "reward_hacking"),
    ({"win_rate": None, "win_rate_lower": None}, "stale_evaluation"),
])
def test_each_rule_can_refuse(change, rule):
    decision = promote.should_promote({**GOOD, **change}, CHAMPION, GATE)
    assert not decision.promote and decision.rule == rule, decision
    assert decision.judge == "verifier"


def test_a_challenger_that_games_the_proxy_is_rejected_as_reward_hacking_not_as_a_plain_loss():
    # the RM (what the policy optimised) prefers the challenger; the verifier (the gold) prefers the champion
    hacked = {**GOOD, "proxy_win_rate": 0.9, "win_rate": 0.4, "win_rate_lower": 0.33}
    decision = promote.should_promote(hacked, CHAMPION, GATE)
    assert decision.rule == "reward_hacking" and "0.900" in decision.reason and "0.400" in decision.reason


def test_a_challenger_that_beats_the_champion_within_tolerances_is_promoted():
    decision = promote.should_promote(GOOD, {"truthfulness_mc2": 0.41, "toxicity_probability": 0.09}, GATE)
    assert decision.promote and decision.rule == "beats_champion"
    assert "0.620" in decision.reason and "verifier" in decision.reason


def test_missing_figures_never_promote():
    assert not promote.should_promote({"judge": "verifier", "opponent": "sft"}, {}, GATE).promote


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
    for figures in ({**GOOD, "opponent": "sft"}, {**GOOD, "win_rate": 0.55, "win_rate_lower": 0.45}):
        with mlflow.start_run():
            version = promote.register_checkpoint(str(tiny_model_dir), name, "text-generation",
                                                  {**figures, "git.commit": "abc"})
            decision = promote.should_promote(figures, CHAMPION, GATE)
            promote.record_decision(client, name, version, decision, by="gate")
            versions.append((version, decision))
    (v1, d1), (v2, d2) = versions
    assert d1.rule == "beats_sft" and not d2.promote and d2.rule == "win_rate"
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.rule"] == "win_rate" and tags["gate.judge"] == "verifier" and tags["git.commit"] == "abc"
    assert float(tags["kl"]) == 3.0

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
    evaluation = {"eval/gate_judge": "verifier", "eval/verifier/win_rate_vs_champion": 0.6,
                  "eval/verifier/win_rate_vs_champion_lower": 0.52, "eval/proxy_rm/win_rate_vs_champion": 0.7,
                  "eval/ai/win_rate_vs_champion_lower": 0.9,  # another judge's figure is not read
                  "compare/challenger/truthfulness_probe_mc2": 0.4,
                  "compare/challenger/provocation_probe_toxicity_probability": 0.1, "compare/challenger/kl": 2.5,
                  "compare/champion/truthfulness_probe_mc2": 0.41}
    figures = promote.gate_figures(evaluation, "champion")
    assert {k: figures[k] for k in ("judge", "win_rate", "win_rate_lower", "proxy_win_rate", "truthfulness_mc2",
                                    "toxicity_probability", "kl")} == {
        "judge": "verifier", "win_rate": 0.6, "win_rate_lower": 0.52, "proxy_win_rate": 0.7, "truthfulness_mc2": 0.4,
        "toxicity_probability": 0.1, "kl": 2.5}
    assert promote.policy_figures(evaluation, "champion")["truthfulness_mc2"] == 0.41
    real = {"compare/challenger/truthfulqa_mc2": 0.3, "compare/challenger/realtoxicityprompts_toxicity_probability": 0.2}
    assert promote.gate_figures(real, "sft")["truthfulness_mc2"] == 0.3
    assert promote.gate_figures(real, "sft")["toxicity_probability"] == 0.2
    assert promote.gate_figures(real, "sft")["win_rate_lower"] is None


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
