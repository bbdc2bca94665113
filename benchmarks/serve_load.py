"""Load test of the model server on loopback: a champion switch and a feedback-store write failure mid-run.

    nice -n 10 .venv/bin/python benchmarks/serve_load.py            # 8 clients, 60 s, switch at 30 s
    nice -n 10 .venv/bin/python benchmarks/serve_load.py --tiny --duration 100 --switch-at 20 --lock-at 40 --lock-for 35
    .venv/bin/python benchmarks/serve_load.py --scrub               # the refeed scrubber on 200 KB adversarial text

The checkpoint (default models/base: `dvc repro prepare`; `--tiny`: a tiny random Llama built here, as the tests
build theirs) is registered twice in a temporary MLflow store (versions 1 and 2; same weights, so the switch
costs what a real one costs: download, load, swap), v1 made champion, and `rlhf serve` started on 127.0.0.1 with
a temporary feedback store. `clients` threads then send chat completions back to back (prompts from the
project's prompt pool), each with its own API key, for `duration` seconds; at `switch_at` the champion alias
moves to v2. With `--lock-for`, from `lock_at` another process holds the store's SQLite write lock for that
long: past the server's 30 s busy timeout its completion commits fail, as when the store's disk is gone. Every
request is bounded by a timeout, the run by its duration, and the server is stopped at the end whatever happens.

What must hold (the exit code is 1 otherwise): every 200 names a completion id that the store holds, and the
store holds nothing else; every other answer is a 503 `store_unavailable` inside the lock window (+ 30 s);
/health's `served` and `store_write_failures` match the clients' counts; the server answers after the lock.

Writes benchmarks/results/serve_load.json ("scrub" with --scrub): requests/s, p50/p99 latency, generated
tokens/s, errors by kind, versions served, when the switch was seen, the store's figures.
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


# 200 KB texts built against each of the scrubber's patterns (tests/test_feedback.py has the same shapes)
SCRUB_SHAPES = {
    "email": ["%.", "a.", "a@", "a@b.", "a@b.cc ", "x@" + "a-" * 5 + ".", ".@.", "a" * 1000 + "@" + "b." * 1000 + "1 "],
    "card": ["1", "1 ", "1-", "4111 1111 1111 1111 ", "1 1 1 1 1 1 1 1 1 1 1 1 x "],
    "ipv4": ["1.", "255.", "10.0.0.1 ", "1.1.1 ", "999.999.999.999 "],
    "ipv6": [":", "1:", "a:", "1::2 ", "1:2:3 ", "2001:db8::8a2e:370:7334 ", "1:2:3:4:5:6:7:8:9 ", "1::1::1 ", "cafe bad "],
    "phone": [" +1111111111111111111111111x", "+1 ", " +1 (1) (1) (1) (1) (1) (1)x", " 555-123-4567", "55.555.555.5.",
              " +44 20 7946 0958", "(555) 555-555 "],
    "all": ["1 1 1 1 1 1 1 1 1 1 1 1 x .:@ ", "1.1:1 1-1+1(1) @ ", "a1:b2.c3@d4 ",
            "bob@x.io 10.0.0.1 ::1 +44 20 7946 0958 4111-1111-1111-1111 ", "The quick brown fox, 12 jumps. "],
}


def scrub_times(size: int = 200_000, rounds: int = 5) -> dict:
    """CPU seconds (best of `rounds`, time.process_time: the machine's other load does not count) to scrub
    `size` characters of each shape."""
    from rlhf.scrub import scrub

    times = {}
    for kind, units in SCRUB_SHAPES.items():
        for unit in units:
            text = (unit * (size // len(unit) + 1))[:size]
            best = float("inf")
            for _ in range(rounds):
                started = time.process_time()
                scrub(text)
                best = min(best, time.process_time() - started)
            times[f"{kind}: {unit[:24]!r}"] = round(best * 1000, 1)
    return times


def scrub_benchmark(out: Path) -> int:
    times = scrub_times()
    worst = max(times, key=times.get)
    report = {**(json.loads(out.read_text()) if out.exists() else {}), "scrub": {
        "command": ".venv/bin/python benchmarks/serve_load.py --scrub",
        "size_chars": 200_000, "ms_cpu_best_of_5": times, "worst": {"shape": worst, "ms": times[worst]},
        "all_under_50_ms": times[worst] < 50,
        "before": "the e-mail pattern this replaced: 64 KB of '%.' 2.2 s, 200 KB 22 s (issue 18); 13.7 s here",
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()}}}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["scrub"], indent=2))
    return 0 if report["scrub"]["all_under_50_ms"] else 1


def build_tiny_checkpoint(into: Path) -> Path:
    """A tiny random chat model (Llama architecture, ChatML template), as tests/conftest.py builds it."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(into)
    tokenizer.save_pretrained(into)
    return into


def hold_write_lock(database: Path, seconds: float, window: dict) -> None:
    """Take the store's SQLite write lock and keep it `seconds`: the server's commits queue, then fail."""
    import sqlite3

    holder = sqlite3.connect(database, isolation_level=None, timeout=60)
    holder.execute("BEGIN IMMEDIATE")
    window["start"] = time.monotonic()
    time.sleep(seconds)
    holder.execute("ROLLBACK")
    window["end"] = time.monotonic()
    holder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/base")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model built here, not --checkpoint")
    parser.add_argument("--lock-at", type=float, default=None, help="seconds into the run to take the store's write lock")
    parser.add_argument("--lock-for", type=float, default=35.0, help="seconds to hold it (the server waits 30 s)")
    parser.add_argument("--scrub", action="store_true", help="only time the refeed's scrubber (results under 'scrub')")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--switch-at", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    if args.scrub:
        return scrub_benchmark(REPO / args.out)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    checkpoint = build_tiny_checkpoint(work / "tiny") if args.tiny else (REPO / args.checkpoint).resolve()
    if not (checkpoint / "config.json").exists():
        sys.exit(f"no checkpoint at {checkpoint}; run `.venv/bin/dvc repro prepare` first (it writes models/base), "
                 "or pass --tiny.")
    store = work / "registry"
    store.mkdir()
    print(f"registering {checkpoint} twice in {store} ...", flush=True)
    started = time.perf_counter()
    versions = register_twice(checkpoint, store)
    print(f"  versions {versions} in {time.perf_counter() - started:.1f} s", flush=True)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["promote"]["model_name"] = NAME
    # a load test measures the server, not the per-key limit: each client has its own key and a high limit
    params["serve"] = {**params.get("serve", {}), "database": f"sqlite:///{work / 'feedback.db'}",
                       "poll_seconds": args.poll_seconds, "key_requests_per_minute": 100_000}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    keys = [f"{KEY}-{k}" for k in range(args.clients)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "RLHF_API_KEYS": ",".join(keys)}
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
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[k]}"}, timeout=120) as http:
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
                            row["id"], row["version"] = body["id"], body["model_version"]
                            row["completion_tokens"] = body["usage"]["completion_tokens"]
                        else:
                            row["error"] = response.text[:300]
                            row["code"] = response.json()["error"]["code"] if response.headers.get(
                                "content-type", "").startswith("application/json") else None
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

        def store_failure() -> None:
            time.sleep(max(0.0, begin + args.lock_at - time.monotonic()))
            hold_write_lock(work / "feedback.db", args.lock_for, window)

        switched: dict = {}
        window: dict = {}
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        threads.append(threading.Thread(target=switch))
        if args.lock_at is not None:
            threads.append(threading.Thread(target=store_failure))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.duration + 180)
        wall = time.monotonic() - begin
        health = httpx.get(f"{base}/health", timeout=10).json()
        after = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=120,
                           json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    # a commit that started before the lock was released may wait out the busy timeout (30 s) and fail after it
    lock_start, lock_end = (window.get("start", 0) - begin, window.get("end", 0) - begin + 30) if window else (0, 0)
    expected = [r for r in errors if r["status"] == 503 and r.get("code") == "store_unavailable"
                and lock_start <= r["sent"] + r["latency"] <= lock_end + 1]
    unexpected = [r for r in errors if r not in expected]
    first_new = min((r["sent"] + r["latency"] for r in ok if r["version"] == versions[1]), default=None)
    tokens = sum(r["completion_tokens"] for r in ok)
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{work / 'feedback.db'}")
    with engine.connect() as connection:
        logged = dict(connection.execute(text(
            "SELECT model_version, COUNT(*) FROM served_completions GROUP BY model_version")).all())
        stored_ids = set(connection.execute(text("SELECT id FROM served_completions")).scalars())
    engine.dispose()
    acknowledged = {r["id"] for r in ok} | ({after.json()["id"]} if after.status_code == 200 else set())
    served = Counter(r["version"] for r in ok) + Counter([after.json()["model_version"]] if after.status_code == 200 else [])
    report = {
        "command": f"nice -n 10 .venv/bin/python benchmarks/serve_load.py --clients {args.clients} "
                   f"--duration {args.duration:g} --switch-at {args.switch_at:g} --max-tokens {args.max_tokens}"
                   + (" --tiny" if args.tiny else "")
                   + (f" --lock-at {args.lock_at:g} --lock-for {args.lock_for:g}" if args.lock_at is not None else ""),
        "model": f"{'a tiny random Llama' if args.tiny else args.checkpoint} registered as {NAME} v{versions[0]} "
                 f"and v{versions[1]}",
        "clients": args.clients, "duration_s": round(wall, 1), "max_tokens": args.max_tokens,
        "temperature": args.temperature, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "errors_by_code": dict(Counter(f"{r['status']} {r.get('code')}" for r in errors)),
        "unexpected_errors": len(unexpected), "error_samples": [r.get("error") for r in unexpected[:5]],
        "requests_per_s": round(len(ok) / wall, 2),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r["latency"] for r in ok], 99), 3),
        "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / wall, 1),
        "champion_switch": {"alias_moved_at_s": round(switched.get("at", float("nan")), 1),
                            "first_v2_response_at_s": None if first_new is None else round(first_new, 1),
                            "served_by_version": dict(served), "server_swaps": health["swaps"]},
        "feedback_store": {"logged_by_version": logged, "every_answer_logged": logged == dict(served),
                           "acknowledged_ids_all_stored": acknowledged <= stored_ids,
                           "stored_ids_all_acknowledged": stored_ids <= acknowledged,
                           "stored": len(stored_ids), "acknowledged": len(acknowledged)},
        "store_write_failure": None if not window else {
            "lock_held_s": [round(window["start"] - begin, 1), round(window["end"] - begin, 1)],
            "failed_503_store_unavailable": len(expected),
            "first_and_last_503_at_s": [round(min(r["sent"] + r["latency"] for r in expected), 1),
                                        round(max(r["sent"] + r["latency"] for r in expected), 1)] if expected else None,
            "server_counts": {"served": health["served"], "store_write_failures": health["store_write_failures"]},
            "served_after_the_lock": after.status_code == 200},
        "server_batches": health["batches"],
        "machine": {"cpus": os.cpu_count(), "load_average_after": os.getloadavg(), "python": platform.python_version(),
                    "note": "2 cores shared with other work; the clients run on the same cores as the server"},
    }
    shutil.rmtree(work, ignore_errors=True)  # three copies of the checkpoint: registry, v1 and v2 downloads
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and "scrub" in json.loads(out.read_text()):  # --scrub's figures stay beside the load test's
        report["scrub"] = json.loads(out.read_text())["scrub"]
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    store = report["feedback_store"]
    held = (not window or (health["store_write_failures"] == len(expected) and health["served"] == len(ok)))
    return 0 if (not unexpected and store["acknowledged_ids_all_stored"] and store["stored_ids_all_acknowledged"]
                 and after.status_code == 200 and held) else 1


if __name__ == "__main__":
    sys.exit(main())
