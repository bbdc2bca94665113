"""The backbone end to end on a tiny model: one cycle through the Prefect flow, then DVC and MLflow checked."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import make_tiny_project

pytestmark = pytest.mark.slow


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def cycle(tmp_path_factory, tiny_model_dir):
    """One whole cycle of the flow on a tiny project, shared by the tests below (they only read, or rerun cheaply)."""
    from flows.cycle import rlhf_cycle

    project = make_tiny_project(tmp_path_factory.mktemp("cycle") / "project", tiny_model_dir)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["collect"]["sources"].append("feedback")  # as params.yaml's default: no server has run, nothing to add
    # sampling from models/base, not the champion: the cycle promotes one, and a new champion rightly reruns collect
    params["collect"]["policy"] = "models/base"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield project, rlhf_cycle()


def test_the_flow_runs_every_stage_once(cycle):
    from flows.cycle import PIPELINE

    project, result = cycle
    assert result["ran"] == list(PIPELINE) and result["unchanged"] == []
    assert result["metrics"]["sft"]["sft/steps"] >= 1
    assert (project / "models/sft/model.safetensors").exists()
    metrics = json.loads((project / "metrics/sft.json").read_text())
    assert metrics["sft/val_loss_after"] < metrics["sft/val_loss_before"]
    # a fresh machine: no feedback store yet, so the refeed writes empty snapshots and collect adds nothing from them
    assert result["metrics"]["refeed"] == {"refeed/store_found": 0, "refeed/served_prompts": 0,
                                           "refeed/prompts_with_pii": 0, "refeed/feedback_comparisons": 0,
                                           "refeed/too_long_prompts": 0, "refeed/too_long_comparisons": 0,
                                           "refeed/champion_version": 0}
    assert result["metrics"]["collect"]["collect/feedback_comparisons"] == 0
    assert result["metrics"]["collect"]["collect/served_prompts"] == 0
    assert not (project / "data/feedback/feedback.db").exists()


def test_mlflow_holds_one_parent_run_with_a_nested_run_per_stage(cycle):
    from flows.cycle import PIPELINE
    from rlhf import tracking

    _, result = cycle
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
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(sft.info.run_id, "loss/train")) == result["metrics"]["sft"]["sft/steps"]
    assert {"sft.json", "sft_loss.csv"} <= {a.path for a in client.list_artifacts(sft.info.run_id)}


def test_dvc_reruns_only_the_refeed_and_records_the_hashes_we_tag(cycle):
    from flows.cycle import PIPELINE
    from rlhf.tracking import dvc_md5

    snapshots = ("data/feedback/served_prompts.parquet", "data/feedback/comparisons.parquet")
    before = [hashlib.md5(Path(p).read_bytes()).hexdigest() for p in snapshots]
    again = dvc("repro")
    assert again.returncode == 0, again.stdout + again.stderr
    # the refeed reads the feedback store, so it always runs; its unchanged snapshots leave every later stage alone
    assert re.findall(r"Running stage '(\w+)'", again.stdout) == ["refeed"], again.stdout
    skipped = set(re.findall(r"Stage '(\w+)' didn't change, skipping", again.stdout))
    assert skipped == set(PIPELINE) - {"refeed"}, again.stdout
    assert [hashlib.md5(Path(p).read_bytes()).hexdigest() for p in snapshots] == before

    lock = yaml.safe_load(Path("dvc.lock").read_text())
    for dep in lock["stages"]["sft"]["deps"]:
        assert dvc_md5(dep["path"]) == dep["md5"], dep["path"]
    outs = {out["path"]: out["md5"] for out in lock["stages"]["sft"]["outs"]}
    assert dvc_md5("models/sft") == outs["models/sft"]


def test_a_changed_param_reruns_only_the_stage_that_reads_it(cycle):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["promote"]["max_kl"] = 999.0
    Path("params.yaml").write_text(yaml.safe_dump(params))
    status = dvc("status", "--json")
    assert set(json.loads(status.stdout)) == {"refeed", "promote"}, status.stdout  # refeed: always changed
