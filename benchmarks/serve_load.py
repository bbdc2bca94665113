"""Load test of the model server on loopback, with a champion switch in the middle of the run.

    nice -n 10 .venv/bin/python benchmarks/serve_load.py            # 8 clients, 60 s, switch at 30 s

The checkpoint (default models/base: `dvc repro prepare`) is registered twice in a temporary MLflow store
(versions 1 and 2; same weights, so the switch costs what a real one costs: download, load, swap), v1 made
champion, and `rlhf serve` started on 127.0.0.1 with a temporary feedback store. `clients` threads then send
chat completions back to back (prompts from the project's prompt pool) for `duration` seconds; at
`switch_at` the champion alias moves to v2. Every request is bounded by a timeout, the run by its duration,
and the server is stopped at the end whatever happens.

Writes benchmarks/results/serve_load.json: requests/s, p50/p99 latency, generated tokens/s, error count,
versions served, when the switch was seen, and whether the feedback store holds every answered request.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
NAME = "rlhf-policy-load"
KEY = "load-test-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def register_twice(checkpoint: Path, store: Path) -> list[str]:
    """Versions 1 and 2 of the checkpoint in a fresh SQLite MLflow store; v1 is champion."""
    import mlflow
    from mlflow import MlflowClient

    from rlhf.promote import register_checkpoint

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("rlhf", artifact_location=(store / "artifacts").as_uri())
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            versions.append(register_checkpoint(str(checkpoint), NAME, "text-generation", {"benchmark": "serve_load"}))
    MlflowClient().set_registered_model_alias(NAME, "champion", versions[0])
    return versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/base")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--switch-at", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    checkpoint = (REPO / args.checkpoint).resolve()
    if not (checkpoint / "config.json").exists():
        sys.exit(f"no checkpoint at {checkpoint}; run `.venv/bin/dvc repro prepare` first (it writes models/base).")

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    store = work / "registry"
    store.mkdir()
    print(f"registering {checkpoint} twice in {store} ...", flush=True)
    started = time.perf_counter()
    versions = register_twice(checkpoint, store)
    print(f"  versions {versions} in {time.perf_counter() - started:.1f} s", flush=True)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["promote"]["model_name"] = NAME
    params["serve"] = {**params.get("serve", {}), "database": f"sqlite:///{work / 'feedback.db'}",
                       "poll_seconds": args.poll_seconds}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "RLHF_API_KEYS": KEY}
    server_log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "--params", str(work / "params.yaml"),
                               "--port", str(port)], cwd=work, env=env, stdout=server_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    prompts = [json.loads(line)["prompt"] for line in (REPO / "rlhf/data/prompts.jsonl").read_text().splitlines()
               if line.strip()]
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited:\n{(work / 'server.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                sys.exit("the server did not answer /health within 180 s")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"server up on {base}; {args.clients} clients for {args.duration:.0f} s, switch at {args.switch_at:.0f} s",
              flush=True)

        results: list[dict] = []
        lock = threading.Lock()
        begin = time.monotonic()
        end = begin + args.duration

        def client(k: int) -> None:
            rng = random.Random(k)
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
                while time.monotonic() < end:
                    sent = time.monotonic()
                    row = {"client": k, "sent": sent - begin}
                    try:
                        response = http.post("/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": rng.choice(prompts)}],
                            "max_tokens": args.max_tokens, "temperature": args.temperature})
                        row["status"] = response.status_code
                        if response.status_code == 200:
                            body = response.json()
                            row["version"] = body["model_version"]
                            row["completion_tokens"] = body["usage"]["completion_tokens"]
                        else:
                            row["error"] = response.text[:300]
                    except httpx.HTTPError as error:
                        row["status"], row["error"] = None, f"{type(error).__name__}: {error}"
                    row["latency"] = time.monotonic() - sent
                    with lock:
                        results.append(row)

        def switch() -> None:
            from mlflow import MlflowClient

            time.sleep(max(0.0, begin + args.switch_at - time.monotonic()))
            MlflowClient(f"sqlite:///{store / 'mlflow.db'}").set_registered_model_alias(NAME, "champion", versions[1])
            switched["at"] = time.monotonic() - begin

        switched: dict = {}
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        threads.append(threading.Thread(target=switch))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.duration + 180)
        wall = time.monotonic() - begin
        health = httpx.get(f"{base}/health", timeout=10).json()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    first_new = min((r["sent"] + r["latency"] for r in ok if r["version"] == versions[1]), default=None)
    tokens = sum(r["completion_tokens"] for r in ok)
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{work / 'feedback.db'}")
    with engine.connect() as connection:
        logged = dict(connection.execute(text(
            "SELECT model_version, COUNT(*) FROM served_completions GROUP BY model_version")).all())
    engine.dispose()
    served = Counter(r["version"] for r in ok)
    report = {
        "command": f"nice -n 10 .venv/bin/python benchmarks/serve_load.py --clients {args.clients} "
                   f"--duration {args.duration:g} --switch-at {args.switch_at:g} --max-tokens {args.max_tokens}",
        "model": f"{args.checkpoint} registered as {NAME} v{versions[0]} and v{versions[1]}",
        "clients": args.clients, "duration_s": round(wall, 1), "max_tokens": args.max_tokens,
        "temperature": args.temperature, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "error_samples": [r.get("error") for r in errors[:5]],
        "requests_per_s": round(len(ok) / wall, 2),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r["latency"] for r in ok], 99), 3),
        "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / wall, 1),
        "champion_switch": {"alias_moved_at_s": round(switched.get("at", float("nan")), 1),
                            "first_v2_response_at_s": None if first_new is None else round(first_new, 1),
                            "served_by_version": dict(served), "server_swaps": health["swaps"]},
        "feedback_store": {"logged_by_version": logged, "every_answer_logged": logged == dict(served)},
        "server_batches": health["batches"],
        "machine": {"cpus": os.cpu_count(), "load_average_after": os.getloadavg(), "python": platform.python_version(),
                    "note": "2 cores shared with other work; the clients run on the same cores as the server"},
    }
    shutil.rmtree(work, ignore_errors=True)  # three copies of the checkpoint: registry, v1 and v2 downloads
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if not errors and report["feedback_store"]["every_answer_logged"] else 1


if __name__ == "__main__":
    sys.exit(main())
