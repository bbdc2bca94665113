"""The RLHF cycle as a Prefect flow: each stage is one DVC stage, run in pipeline order.

Runs with no Prefect server (a temporary local API), or reports to one when PREFECT_API_URL is set.
"""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import mlflow  # noqa: E402
from prefect import flow, runtime  # noqa: E402

from rlhf import tracking  # noqa: E402
from tasks.stages import run_dvc_stage  # noqa: E402

PIPELINE = ("prepare", "refeed", "collect", "validate", "sft", "reward_model", "policy", "evaluate", "promote")


@flow(name="rlhf-cycle", log_prints=True)
def rlhf_cycle(stages: list[str] | None = None, force: bool = False) -> dict:
    """prepare -> refeed -> collect -> validate -> sft -> reward_model -> policy -> evaluate -> promote,
    each as `dvc repro` of one stage, under one parent MLflow run."""
    selected = [s for s in PIPELINE if stages is None or s in stages]
    unknown = sorted(set(stages or []) - set(PIPELINE))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the pipeline's stages are {list(PIPELINE)}.")
    experiment_id = tracking.use_project_store()
    tracking.end_stale_runs(experiment_id)  # a cycle killed outright leaves its runs RUNNING
    tags = {"rlhf.kind": "cycle", "git.commit": tracking.git_commit(),
            "prefect.flow_run_id": str(runtime.flow_run.id or ""), **tracking.owner_tags()}
    with mlflow.start_run(run_name=f"cycle-{runtime.flow_run.name or 'local'}", tags=tags) as parent:
        results = [run_dvc_stage(stage, parent.info.run_id, force) for stage in selected]
        ran = [r["stage"] for r in results if r["ran"]]
        mlflow.set_tags({"rlhf.stages_ran": ",".join(ran) or "none"})
    return {
        "mlflow_run_id": parent.info.run_id,
        "ran": ran,
        "unchanged": [r["stage"] for r in results if not r["ran"]],
        "metrics": {r["stage"]: r["metrics"] for r in results},
    }


if __name__ == "__main__":
    print(rlhf_cycle())
