"""MLflow for every stage run: params, per-step metrics, artifacts, and lineage tags.

A stage started by the cycle flow becomes a nested run of the cycle's parent run (the flow passes
the parent's id in RLHF_PARENT_RUN_ID); a stage started by plain `dvc repro` is a run of its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import mlflow
import yaml

from rlhf import outputs
from rlhf.stage import Terminated

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf")
PARENT_RUN_ENV = "RLHF_PARENT_RUN_ID"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a team's server), else a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def use_project_store() -> str:
    """Point MLflow at the tracking store and the experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:
        artifact_location = (Path.cwd() / "mlartifacts").as_uri()
    experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for a file or folder in dvc.lock (a folder's is the md5 of its listing + '.dir')."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    entries = [
        {"md5": _file_md5(f), "relpath": f.relative_to(path).as_posix()}
        for f in sorted(path.rglob("*"))
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_deps(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The deps dvc.yaml declares for one stage."""
    dvc_file = Path(dvc_file)
    if not dvc_file.exists():
        return []
    stages = yaml.safe_load(dvc_file.read_text()).get("stages", {})
    return [str(d) for d in stages.get(stage, {}).get("deps", [])]


def _flatten(prefix: str, values: dict) -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(f"{prefix}{key}.", value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def owner_tags() -> dict:
    """Which process on which machine holds a run open, so a later start can tell a dead run from a live one."""
    return {"rlhf.host": socket.gethostname(), "rlhf.pid": str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def end_stale_runs(experiment_id: str) -> list[str]:
    """End as KILLED the runs that a process of this machine left RUNNING and that no longer exists (a SIGKILL,
    a power cut); runs of other machines, and runs without an owner, are left alone. Returns their ids."""
    client = mlflow.MlflowClient()
    host, ended = socket.gethostname(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("rlhf.host") == host and tags.get("rlhf.pid", "").isdigit() and not _process_alive(int(tags["rlhf.pid"])):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def stage_run(stage: str, params: dict):
    """An MLflow run for one stage, tagged with the git commit and the DVC hashes of its deps.

    First it completes any output swap a killed stage left half-done (`rlhf.outputs.finish_interrupted`) and
    ends runs that killed processes left RUNNING. A SIGTERM (`rlhf.stage.Terminated`) ends the run as KILLED.
    Under `accelerate launch` only the main process (RANK 0) records; the others get no run.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    for repaired in outputs.finish_interrupted():
        print(f"{stage}: completed the replacement of {repaired}, which a killed run had left half-done")
    experiment_id = use_project_store()
    for run_id in end_stale_runs(experiment_id):
        print(f"{stage}: MLflow run {run_id} was left RUNNING by a process that no longer exists; ended it as KILLED")
    tags = {"rlhf.stage": stage, "git.commit": git_commit(), **owner_tags()}
    for dep in stage_deps(stage):
        if Path(dep).exists():
            tags[f"dvc.dep.{dep}"] = dvc_md5(dep)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        mlflow.log_params(_flatten("", params))
        try:
            yield run
        except Terminated:
            mlflow.end_run("KILLED")
            raise


def log_outputs(stage: str, outs: dict[str, str | Path]) -> None:
    """Record each output's DVC hash as a tag, so a registered model traces back to its bytes."""
    mlflow.set_tags({f"dvc.out.{name}": dvc_md5(path) for name, path in outs.items() if Path(path).exists()})


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A DVC metrics file (JSON), written atomically, and the same figures to the active MLflow run."""
    path = Path(path)
    outputs.write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in _flatten("", metrics).items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(path))


def write_plot(path: str | Path, rows: list[dict]) -> None:
    """A DVC plot file (CSV with a header), written atomically, and logged to the active MLflow run."""
    path = Path(path)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)] + [",".join("" if row.get(c) is None else f"{row[c]}" for c in columns) for row in rows]
    outputs.write_text(path, "\n".join(lines) + "\n")
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path))
