"""The cycle on a schedule, fed by its own model server: a real Prefect server and process worker run
infra/prefect.yaml's deployment twice, and the second cycle learns from what users told the first one's champion.

`prefect server start` on a free loopback port with PREFECT_HOME in a temporary folder, a process work pool,
`prefect deploy --prefect-file infra/prefect.yaml` with a short interval added to the nightly cron, and a worker.
The work pool is unpaused only while the test waits for a cycle to be picked up, so exactly two scheduled runs
happen, one after the other, with the model server in between:

1. the first scheduled cycle runs every stage on a tiny project (no feedback store yet: the refeed is empty)
   and the gate makes version 1 the champion;
2. `rlhf serve` serves models:/tiny-policy@champion on a free loopback port; chat completions over HTTP (n=2
   with a pairwise judgement, n=2 with thumbs up and down, one prompt with an e-mail address) land in the store;
3. the second scheduled cycle's refeed snapshots them, collect samples the served prompts first and adds the
   two judgements as `feedback:tiny-policy/1` rows, and the stages that read comparisons rerun up to promote,
   which registers version 2 with the gate's decision.

The GPU deployment is registered against a Kubernetes pool built from infra/k8s-gpu-job-template.json, which
makes the server check the template and the job variables. Every process started here is killed at the end,
with its children.
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
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from flows.cycle import PIPELINE
from tests.conftest import REPO

INTERVAL_SECONDS = 15
DEADLINE_SECONDS = 1500  # two whole tiny cycles and a model server start on a loaded 2-core machine
API_KEY = "schedule-test-key-0123456789"
# what the served traffic changes: the refeed's snapshots, so collect and every stage that reads comparisons
SECOND_CYCLE = [stage for stage in PIPELINE if stage not in ("prepare", "sft")]
PAIRWISE_PROMPT = "what colour is the rain at night?"
THUMBS_PROMPT = "describe a fox to a child"
PII_PROMPT = "my mail is ana.lopez@example.org, write me a poem"


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
def test_two_scheduled_cycles_the_second_learns_from_the_first_ones_server(tiny_project, tmp_path):
    shutil.copytree(REPO / "infra", tiny_project / "infra", ignore=shutil.ignore_patterns(".env"))
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["collect"]["sources"].append("feedback")
    params["collect"]["max_served_share"] = 1.0  # the tiny pool draws 4 prompts: let all 3 served ones in
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
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
    bin_dir = Path(sys.executable).parent
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str, environment: dict = env) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(list(args), cwd=tiny_project, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process

    def cli(*args: str) -> str:
        done = subprocess.run([str(bin_dir / "prefect"), *args], cwd=tiny_project, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    def wait_until_up(process: subprocess.Popen, name: str, url: str) -> None:
        waited = time.monotonic()
        while True:
            assert process.poll() is None, f"{name} exited:\n{tail(tmp_path / f'{name}.log')}"
            assert time.monotonic() - waited < 180, f"{name} did not answer:\n{tail(tmp_path / f'{name}.log')}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def call(method: str, path: str, **kwargs) -> httpx.Response:
        # the server answers 503 while its SQLite database is locked by a concurrent write; Prefect's client retries
        for attempt in range(10):
            answer = httpx.request(method, f"{api}{path}", timeout=30, **kwargs)
            if answer.status_code != 503:
                return answer.raise_for_status()
            time.sleep(1 + attempt)
        return answer.raise_for_status()

    def set_pool_paused(paused: bool) -> None:
        call("PATCH", "/work_pools/rlhf-process", json={"is_paused": paused})

    def deployment_runs() -> list[dict]:
        return call("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()

    def next_scheduled_cycle(done: list[dict]) -> dict:
        """Unpause the pool until the worker picks up the next scheduled run, then wait for it to complete."""
        set_pool_paused(False)
        picked = None
        while True:
            assert worker.poll() is None, f"the worker exited:\n{tail(tmp_path / 'worker.log')}"
            runs = deployment_runs()
            assert time.monotonic() - begin < DEADLINE_SECONDS, (
                f"{len(done)} scheduled run(s) completed in {DEADLINE_SECONDS} s; runs: "
                f"{[(r['state_name'], r['expected_start_time']) for r in runs[:5]]}\n"
                f"worker log:\n{tail(tmp_path / 'worker.log')}\nserver log:\n{tail(tmp_path / 'server.log')}")
            scheduler_error = any("ERROR" in line and "schedule_deployments" in line
                                  for line in tail(tmp_path / "server.log", 200_000).splitlines())
            assert not scheduler_error, f"the server's scheduler failed:\n{tail(tmp_path / 'server.log')}"
            broken = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not broken, f"{broken[0]['state']}\nworker log:\n{tail(tmp_path / 'worker.log', 6000)}"
            if picked is None:
                taken = [r for r in runs if r["state_type"] in ("PENDING", "RUNNING", "COMPLETED")
                         and r["id"] not in {d["id"] for d in done}]
                if taken:
                    picked = taken[0]["id"]
                    set_pool_paused(True)  # the deployment's concurrency limit keeps the rest waiting meanwhile
            else:
                run = next(r for r in runs if r["id"] == picked)
                if run["state_type"] == "COMPLETED":
                    return run
            time.sleep(2)

    def chat(client: httpx.Client, prompt: str, n: int, seed: int) -> dict:
        answer = client.post("/v1/chat/completions", json={
            "model": "tiny-policy", "messages": [{"role": "user", "content": prompt}], "n": n, "seed": seed,
            "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        return answer.json()

    begin = time.monotonic()
    try:
        server = start("server", str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                       "--port", str(port))
        wait_until_up(server, "server", f"{api}/health")

        cli("work-pool", "create", "rlhf-process", "--type", "process", "--paused")
        cli("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "rlhf-cycle-nightly", "--no-prompt",
            "--interval", str(INTERVAL_SECONDS))
        deployment = call("GET", "/deployments/name/rlhf-cycle/rlhf-cycle-nightly").json()
        schedules = [s["schedule"] for s in deployment["schedules"]]
        crons = [s["cron"] for s in schedules if "cron" in s]
        intervals = [s["interval"] for s in schedules if "interval" in s]
        assert crons == ["0 2 * * *"] and intervals == [INTERVAL_SECONDS], schedules  # infra/prefect.yaml's + ours
        assert deployment["parameters"] == {"stages": None, "force": False}  # every stage
        assert deployment["global_concurrency_limit"]["limit"] == 1  # the others wait while a cycle runs
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(tiny_project)

        # the GPU pool and deployment: registered (the server validates template and job variables), never run here
        cli("work-pool", "create", "rlhf-k8s-gpu", "--type", "kubernetes",
            "--base-job-template", "infra/k8s-gpu-job-template.json")
        cli("deploy", "--prefect-file", "infra/prefect.yaml", "--name", "rlhf-cycle-gpu", "--no-prompt")
        gpu = call("GET", "/deployments/name/rlhf-cycle/rlhf-cycle-gpu").json()
        assert gpu["job_variables"]["image"] == "registry.example.com/rlhf:test" and gpu["job_variables"]["gpus"] == 4
        pool = call("GET", "/work_pools/rlhf-k8s-gpu").json()
        limits = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "{{ gpus }}"

        worker = start("worker", str(bin_dir / "prefect"), "worker", "start", "--pool", "rlhf-process",
                       "--type", "process", environment=flow_env)
        completed = [next_scheduled_cycle([])]
        first_cycle_seconds = time.monotonic() - begin

        # the champion the first cycle promoted, served over real HTTP; its users' traffic lands in the store
        serve_port = free_port()
        model_server = start("model-server", str(bin_dir / "rlhf"), "serve", "--host", "127.0.0.1",
                             "--port", str(serve_port), environment={**flow_env, "RLHF_API_KEYS": API_KEY})
        wait_until_up(model_server, "model-server", f"http://127.0.0.1:{serve_port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            pairwise = chat(client, PAIRWISE_PROMPT, n=2, seed=1)
            thumbs = chat(client, THUMBS_PROMPT, n=2, seed=2)
            single = chat(client, PII_PROMPT, n=1, seed=3)
            assert {pairwise["model_version"], thumbs["model_version"], single["model_version"]} == {"1"}
            for body in ({"id": pairwise["id"], "preferred": 1}, {"id": thumbs["id"], "choice": 0, "rating": "up"},
                         {"id": thumbs["id"], "choice": 1, "rating": "down"}):
                answer = client.post("/v1/feedback", json=body)
                assert answer.status_code == 201, answer.text
        stop(model_server)

        completed.append(next_scheduled_cycle(completed))
        assert all(r["auto_scheduled"] for r in completed)  # started by the schedule, not by hand
        ever_started = [r["id"] for r in deployment_runs() if r["state_type"] != "SCHEDULED"]
        assert ever_started == [r["id"] for r in completed]  # two runs, one after the other, nothing in between
    finally:
        for process in reversed(started):
            if process.returncode is None:  # not stopped (and reaped) already: its pid is still its own
                stop(process)
    for process in started:
        assert process.poll() is not None
    print(f"first cycle done after {first_cycle_seconds:.0f} s, both after {time.monotonic() - begin:.0f} s")

    # MLflow: one cycle run per scheduled run; the first ran every stage, the second what the feedback changed
    client = MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    cycles = client.search_runs([experiment.experiment_id], "tags.`rlhf.kind` = 'cycle'", order_by=["start_time ASC"])
    assert [run.data.tags["prefect.flow_run_id"] for run in cycles] == [r["id"] for r in completed]
    assert [run.data.tags["rlhf.stages_ran"].split(",") for run in cycles] == [list(PIPELINE), SECOND_CYCLE]

    def stage_metrics(cycle, stage: str) -> dict:
        [run] = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{cycle.info.run_id}' "
                                                               f"and tags.`rlhf.stage` = '{stage}'")
        return run.data.metrics

    assert stage_metrics(cycles[0], "refeed")["refeed/store_found"] == 0
    assert stage_metrics(cycles[0], "collect")["collect/feedback_comparisons"] == 0
    assert stage_metrics(cycles[1], "refeed").items() >= {"refeed/store_found": 1, "refeed/served_prompts": 3,
                                                          "refeed/prompts_with_pii": 1,
                                                          "refeed/feedback_comparisons": 2}.items()
    second_collect = stage_metrics(cycles[1], "collect")
    assert second_collect["collect/served_prompts"] == 3 and second_collect["collect/feedback_comparisons"] == 2

    # the second collect's output: the served prompts (scrubbed) sampled first, the two judgements as rows
    collected = pd.read_parquet(tiny_project / "data/comparisons/collected.parquet")
    served = {PAIRWISE_PROMPT, THUMBS_PROMPT, "my mail is [EMAIL], write me a poem"}
    assert served <= set(collected.loc[collected["source"].str.startswith("judge:"), "prompt"])
    assert not collected["prompt"].str.contains("ana.lopez@example.org").any()
    feedback = collected[collected["source"] == "feedback:tiny-policy/1"].set_index("pair_id")
    assert len(feedback) == 2
    rated = feedback.loc[f"feedback-{pairwise['id']}"]
    assert (rated["prompt"], rated["chosen"]) == (PAIRWISE_PROMPT, "b")
    assert (rated["response_a"], rated["response_b"]) == tuple(c["message"]["content"] for c in pairwise["choices"])
    thumbed = feedback.loc[f"feedback-{thumbs['id']}.0-{thumbs['id']}.1"]
    liked = thumbed["response_a"] if thumbed["chosen"] == "a" else thumbed["response_b"]
    assert liked == thumbs["choices"][0]["message"]["content"]

    # the registry: both policy versions, each with the gate's decision; the aliases follow the decisions
    versions = {str(v.version): v for v in client.search_model_versions("name='tiny-policy'")}
    assert set(versions) == {"1", "2"}
    for version in versions.values():
        assert version.tags["gate.by"] == "gate" and version.tags["gate.promote"] in ("True", "False")
        assert version.tags["gate.rule"] and version.tags["gate.reason"]
    # the first champion had to beat SFT, the second challenger the champion, each under the independent judge
    assert (versions["1"].tags["gate.promote"], versions["1"].tags["gate.rule"]) == ("True", "beats_sft")
    assert (versions["1"].tags["gate.opponent"], versions["2"].tags["gate.opponent"]) == ("sft", "champion")
    assert versions["1"].tags["gate.judge"] == versions["2"].tags["gate.judge"] == "verifier"
    # the second cycle sampled its pairs from the champion the first one promoted
    assert set(collected.loc[collected["source"].str.startswith("judge:"), "policy_version"]) == {"tiny-policy/1"}
    assert versions["1"].tags["dvc.data/comparisons/train.parquet"] != versions["2"].tags["dvc.data/comparisons/train.parquet"]
    # version 2 was trained on the users' judgements (both land in the train split of validate's seeded split)
    assert "comparisons.feedback:tiny-policy/1" not in versions["1"].tags
    assert versions["2"].tags["comparisons.feedback:tiny-policy/1"] == "2"
    aliases = {alias: str(version) for alias, version in client.get_registered_model("tiny-policy").aliases.items()}
    assert aliases["challenger"] == "2"
    assert aliases["champion"] == ("2" if versions["2"].tags["gate.promote"] == "True" else "1")
