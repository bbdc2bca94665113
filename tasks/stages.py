"""One Prefect task that runs one DVC stage. DVC decides what is stale; Prefect adds retries and the UI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import task
from prefect.artifacts import create_markdown_artifact

from rlhf.stage import TRANSIENT_EXIT, USER_ERROR_EXIT
from rlhf.tracking import PARENT_RUN_ENV


class StageFailed(RuntimeError):
    def __init__(self, stage: str, exit_code: int):
        self.stage, self.exit_code = stage, exit_code
        hint = "its error is printed above" if exit_code == USER_ERROR_EXIT else "see the output above"
        super().__init__(f"DVC stage '{stage}' failed with exit code {exit_code}; {hint}. "
                         f"Fix it and run again: DVC reruns only what changed (`dvc repro {stage}` reruns this stage alone).")


def _stage_env(parent_run_id: str | None) -> dict:
    env = dict(os.environ)
    # `python` in dvc.yaml must be this interpreter, also when the venv is not activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def _dvc(*args: str, env: dict | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], env=env, text=True, capture_output=capture)


def stage_is_stale(stage: str) -> bool:
    """True when DVC would rerun the stage (changed deps, params or missing outs)."""
    out = _dvc("status", "--json", stage)
    if out.returncode != 0:
        raise RuntimeError(f"`dvc status {stage}` failed: {out.stderr.strip()}")
    return bool(json.loads(out.stdout or "{}"))


def stage_metrics(stage: str) -> dict:
    """The figures in the metrics files dvc.yaml declares for the stage."""
    spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
    metrics = {}
    for entry in spec.get("metrics", []):
        path = Path(next(iter(entry)) if isinstance(entry, dict) else entry)
        if path.exists():
            metrics.update(json.loads(path.read_text()))
    return metrics


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as error:
        return error.exit_code == TRANSIENT_EXIT
    except Exception:
        return False
    return False


@task(task_run_name="dvc-{stage}", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_retry_transient)
def run_dvc_stage(stage: str, parent_run_id: str | None = None, force: bool = False) -> dict:
    """Run one DVC stage with `dvc repro --single-item`; report whether it ran and its metrics."""
    stale = force or stage_is_stale(stage)
    seconds = 0.0
    if stale:
        start = time.perf_counter()
        args = ["repro", "--single-item", stage] + (["--force"] if force else [])
        done = _dvc(*args, env=_stage_env(parent_run_id), capture=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise StageFailed(stage, done.returncode)
    metrics = stage_metrics(stage)
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        key=f"stage-{stage.replace('_', '-')}",  # Prefect artifact keys allow only a-z, 0-9 and dashes
        markdown=(f"## Stage `{stage}`\n\n"
                  f"{'Ran' if stale else 'Unchanged (DVC found nothing to do)'}"
                  f"{f' in {seconds:.1f} s' if stale else ''}.\n\n| metric | value |\n|---|---|\n{rows}\n"),
        description=f"DVC stage {stage}",
    )
    return {"stage": stage, "ran": stale, "seconds": round(seconds, 1), "metrics": metrics}
