"""The MLflow model registry as the stages and the server read it: aliases and downloaded checkpoints."""
from __future__ import annotations

from pathlib import Path

import mlflow

from rlhf import tracking

CHAMPION, CHALLENGER = "champion", "challenger"  # the serving model; the newest registered one


def download_checkpoint(uri: str, into: str | Path | None = None) -> Path:
    """Download a registered model (`models:/<name>/<version>` or `models:/<name>@<alias>`) and return the folder
    that holds its transformers checkpoint."""
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=None if into is None else str(into)))
    configs = sorted(local.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FileNotFoundError(f"{uri} holds no transformers checkpoint (no config.json in {local}).")
    return configs[0].parent


def champion_checkpoint(name: str, alias: str = CHAMPION) -> Path:
    """The checkpoint of `models:/<name>@<alias>` in the project's tracking store."""
    tracking.use_project_store()
    return download_checkpoint(f"models:/{name}@{alias}")


def champion_version(name: str) -> str | None:
    """The registry version behind `models:/<name>@champion`, or None before any champion (the first cycle)."""
    from mlflow.exceptions import MlflowException

    tracking.use_project_store()
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None
