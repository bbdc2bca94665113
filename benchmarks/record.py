"""Where every benchmark puts its figures: benchmarks/results/<name>.json (atomically) and an MLflow run in
the project's store, experiment `benchmarks`, so `mlflow ui` lists them beside the pipeline's runs."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENT = "benchmarks"


def machine() -> dict:
    """This machine, with its load when the figures were taken (other jobs change them)."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_end": os.getloadavg()}


def command() -> str:
    """The command line that ran this benchmark, with the thread settings that change its figures."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    return " ".join(filter(None, [env, "python", *sys.argv]))


def _numbers(values: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}".replace(" ", "_")
        if isinstance(value, dict):
            flat.update(_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def save(name: str, report: dict, figures: dict, out: str | Path | None = None, params: dict | None = None) -> Path:
    """Write `report` as JSON (to `out`, or benchmarks/results/<name>.json) and log `figures` (nested dicts of
    numbers) to MLflow as the metrics of one run named `name`, with `params` and the JSON as an artifact."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)
    print(f"wrote {path}")

    import mlflow

    from rlhf import tracking

    repo = Path(__file__).resolve().parents[1]
    here = Path.cwd()
    os.chdir(repo)  # the project's store lives at the repository root, whatever the caller's folder
    try:
        mlflow.set_tracking_uri(tracking.tracking_uri())
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            local = "MLFLOW_TRACKING_URI" not in os.environ
            mlflow.create_experiment(EXPERIMENT, artifact_location=(repo / "mlartifacts").as_uri() if local else None)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=name, tags={"rlhf.kind": "benchmark", "git.commit": tracking.git_commit(),
                                                   "command": report.get("command", command())[:5000]}):
            mlflow.log_metrics(_numbers(figures))
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_artifact(str(path))
    finally:
        os.chdir(here)
    return path
