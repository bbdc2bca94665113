"""The backbone end to end on a tiny model: DVC stages, the Prefect flow, MLflow runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = pytest.mark.slow


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def test_dvc_repro_runs_then_finds_everything_unchanged(tiny_project: Path):
    first = dvc("repro")
    assert first.returncode == 0, first.stdout + first.stderr
    from flows.cycle import PIPELINE

    for stage in PIPELINE:
        assert f"Running stage '{stage}'" in first.stdout
    assert (tiny_project / "models/sft/model.safetensors").exists()
    metrics = json.loads((tiny_project / "metrics/sft.json").read_text())
    assert metrics["sft/val_loss_after"] < metrics["sft/val_loss_before"]

    second = dvc("repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout

    # the DVC hashes we tag MLflow runs with are the ones DVC records
    from rlhf.tracking import dvc_md5

    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    for dep in lock["stages"]["sft"]["deps"]:
        assert dvc_md5(dep["path"]) == dep["md5"], dep["path"]
    outs = {out["path"]: out["md5"] for out in lock["stages"]["sft"]["outs"]}
    assert dvc_md5("models/sft") == outs["models/sft"]

    # changing an SFT param reruns sft only
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["sft"]["learning_rate"] = 0.002
    Path("params.yaml").write_text(yaml.safe_dump(params))
    third = dvc("repro")
    assert "Running stage 'sft'" in third.stdout and "Running stage 'prepare'" not in third.stdout


def test_prefect_flow_runs_stages_under_one_parent_mlflow_run(tiny_project: Path):
    from flows.cycle import PIPELINE, rlhf_cycle
    from rlhf import tracking

    result = rlhf_cycle()
    assert result["ran"] == list(PIPELINE) and result["unchanged"] == []
    assert result["metrics"]["sft"]["sft/steps"] >= 1

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT)
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    children = {r.data.tags["rlhf.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(PIPELINE)
    sft = children["sft"]
    assert sft.data.params["sft.learning_rate"] == "0.003"
    assert "loss/train" in sft.data.metrics and "sft/val_perplexity_after" in sft.data.metrics
    assert sft.data.tags["dvc.dep.models/base"].endswith(".dir")
    assert sft.data.tags["git.commit"]
    history = mlflow.MlflowClient().get_metric_history(sft.info.run_id, "loss/train")
    assert len(history) == result["metrics"]["sft"]["sft/steps"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(sft.info.run_id)}
    assert {"sft.json", "sft_loss.csv"} <= artifacts

    again = rlhf_cycle()
    assert again["ran"] == [] and again["unchanged"] == list(PIPELINE)
