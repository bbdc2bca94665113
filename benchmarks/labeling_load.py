"""Load test of the labeling app on loopback: 30 annotators, an admin export every second, a crash in the middle.

30 annotators (each its own HTTP client and login) vote as fast as the server answers for 60 s, over
real sockets to `python -m rlhf.labeling serve` on 127.0.0.1. Meanwhile an admin downloads the campaign's
export every second (the next one starts when the last has answered, if that took longer), as an admin
watching the figures would: the export reads in a read-only transaction, so votes must not wait behind it.
At 30 s the server process is killed with SIGKILL and started again on the same database. A client
whose request fails on the dead server retries the same request until it is answered, as a browser's
user would resubmit; the vote endpoint is idempotent, so a vote committed just before the kill is
acknowledged by the retry and not stored twice.

Prints and writes to benchmarks/results/labeling_load.json: votes/s, p50/p99 latency of the vote
POST and of the next-pair GET, the exports' count and latency, the restart's downtime, and whether the
votes stored in the database are exactly the votes the clients saw acknowledged (same count, same
assignment ids). Bounded: the run lasts --seconds, and a request still failing GIVE_UP_AFTER_S after it
counts as lost.

    .venv/bin/python -m benchmarks.labeling_load            # from the repository root
    .venv/bin/python -m benchmarks.labeling_load --annotators 5 --seconds 10 --kill-at 5   # a quick look
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pandas as pd
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.labeling import accounts
from rlhf.labeling.campaigns import create_campaign
from rlhf.labeling.db import Vote, make_engine, upgrade_database

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "labeling_load.json"
CAMPAIGN = "load"
ADMIN = "load-admin"
PASSWORD = "load-test-password"
CHOICES = ["A", "B", "A", "B", "tie", "both_bad", "skip"]  # mostly preferences, some ties, rare skips
GIVE_UP_AFTER_S = 60  # a request still failing this long after the run ends counts as lost


@dataclass
class Tally:
    acknowledged: set[int] = field(default_factory=set)  # assignment ids whose vote got its 303
    vote_latency: list[float] = field(default_factory=list)  # POST, first attempt to answer, seconds
    calm_vote_latency: list[float] = field(default_factory=list)  # the same, for votes not caught by the restart
    page_latency: list[float] = field(default_factory=list)  # GET of the next pair
    export_latency: list[float] = field(default_factory=list)  # GET of the campaign's export, seconds
    export_bytes: list[int] = field(default_factory=list)
    export_rows: list[int] = field(default_factory=list)  # comparisons in each export
    retries: int = 0  # attempts that hit a dead or restarting server
    errors: list[str] = field(default_factory=list)  # unexpected answers


def synthetic_pairs(count: int, prefix: str, chosen: str | None) -> pd.DataFrame:
    """Pairs of realistic size: a 200-character prompt, two 600-character responses."""
    rng = random.Random(prefix)
    words = "the model answers a question about rivers maths code history with care and some detail".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 6))

    return pd.DataFrame([{
        "pair_id": f"{prefix}{i}", "prompt": text(200), "response_a": text(600), "response_b": text(600),
        "chosen": chosen, "source": "judge:load", "policy_version": "load-v1", "votes": None, "agreement": None,
        "created_at": datetime.now(timezone.utc)} for i in range(count)])


def prepare_database(database_url: str, annotators: int, pairs: int, gold: int) -> list[str]:
    engine = make_engine(database_url)
    upgrade_database(engine)
    with Session(engine) as db:
        create_campaign(db, CAMPAIGN, synthetic_pairs(pairs, "p", None), synthetic_pairs(gold, "g", "a"),
                        overlap=3, gold_rate=0.1, seed=1)
        names = [f"annotator{i:02d}" for i in range(annotators)]
        for name in names:
            accounts.accept_invite(db, accounts.invite(db, name), PASSWORD)
        accounts.accept_invite(db, accounts.invite(db, ADMIN, "admin"), PASSWORD)
    engine.dispose()
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(database_url: str, port: int, log) -> subprocess.Popen:
    # The simulated annotators vote at random and would all be flagged on gold, leaving the export empty;
    # with no threshold nobody is flagged, so the export carries every decided pair and grows as in real use.
    return subprocess.Popen([sys.executable, "-m", "rlhf.labeling", "serve", "--db", database_url, "--port", str(port),
                             "--gold-accuracy-threshold", "0"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


async def wait_until_up(base_url: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url) as probe:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode}; see its log")
            try:
                if (await probe.get("/login")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the server did not answer within {timeout_s} s")


async def send(client: httpx.AsyncClient, method: str, url: str, tally: Tally, give_up_at: float,
               **kwargs) -> tuple[httpx.Response, bool]:
    """One request, resent after transport errors (server down) until answered or give_up_at.
    Returns the answer and whether it needed a resend."""
    resent = False
    while True:
        try:
            return await client.request(method, url, **kwargs), resent
        except httpx.TransportError:
            if time.monotonic() > give_up_at:
                raise
            tally.retries += 1
            resent = True
            await asyncio.sleep(0.05)


async def log_in(client: httpx.AsyncClient, name: str) -> None:
    form = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = await client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    if response.status_code != 303:
        raise RuntimeError(f"login of {name} failed with {response.status_code}")


async def export_every(client: httpx.AsyncClient, interval_s: float, stop_at: float, tally: Tally) -> None:
    """Download the campaign's export every interval_s until stop_at, as the admin page's figures would."""
    give_up_at = stop_at + GIVE_UP_AFTER_S
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        response, _ = await send(client, "GET", f"/admin/campaigns/{CAMPAIGN}/export.parquet", tally, give_up_at)
        took = time.perf_counter() - started
        if response.status_code != 200 or not response.content.startswith(b"PAR1"):
            tally.errors.append(f"GET export: {response.status_code}")
        else:
            tally.export_latency.append(took)
            tally.export_bytes.append(len(response.content))
            tally.export_rows.append(pq.ParquetFile(io.BytesIO(response.content)).metadata.num_rows)
        await asyncio.sleep(max(0.0, interval_s - took))


async def annotate(client: httpx.AsyncClient, seed: int, stop_at: float, tally: Tally) -> None:
    """Fetch the next pair, vote on it, repeat until stop_at. A vote in flight at stop_at is finished."""
    rng = random.Random(seed)
    give_up_at = stop_at + GIVE_UP_AFTER_S
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        page, _ = await send(client, "GET", f"/campaigns/{CAMPAIGN}/label", tally, give_up_at)
        tally.page_latency.append(time.perf_counter() - started)
        action = re.search(r'action="/assignments/(\d+)/vote"', page.text)
        if page.status_code != 200 or action is None:
            tally.errors.append(f"GET next pair: {page.status_code}")
            return
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        started = time.perf_counter()
        response, resent = await send(client, "POST", f"/assignments/{action.group(1)}/vote", tally, give_up_at,
                              data={"choice": rng.choice(CHOICES), "reason": "", "csrf_token": token})
        if response.status_code != 303:
            tally.errors.append(f"POST vote: {response.status_code}")
            continue
        tally.vote_latency.append(time.perf_counter() - started)
        if not resent:
            tally.calm_vote_latency.append(tally.vote_latency[-1])
        tally.acknowledged.add(int(action.group(1)))


async def crash_and_restart(at_s: float, state: dict, database_url: str, port: int, log) -> float:
    """SIGKILL the server at at_s, start a new one; returns the seconds without a server."""
    await asyncio.sleep(at_s)
    state["server"].kill()
    await asyncio.to_thread(state["server"].wait)
    down_since = time.monotonic()
    state["server"] = start_server(database_url, port, log)
    await wait_until_up(f"http://127.0.0.1:{port}", state["server"])
    return time.monotonic() - down_since


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def stored_votes(database_url: str) -> set[int]:
    engine = make_engine(database_url)
    with Session(engine) as db:
        ids = list(db.scalars(select(Vote.assignment_id)))
    engine.dispose()
    if len(ids) != len(set(ids)):
        raise AssertionError("an assignment has two votes: the unique constraint did not hold")
    return set(ids)


async def run(args, database_url: str, names: list[str], log) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    state = {"server": start_server(database_url, port, log)}
    await wait_until_up(base_url, state["server"])
    clients = [httpx.AsyncClient(base_url=base_url, timeout=60) for _ in names]
    admin = httpx.AsyncClient(base_url=base_url, timeout=60)
    # one after another: tries still being checked count against the address (the login throttle), and
    # 30 people on one address logging in within the same 0.1 s is a load test's habit, not an office's
    for client, name in zip([*clients, admin], [*names, ADMIN]):
        await log_in(client, name)

    tally = Tally()
    started = time.monotonic()
    stop_at = started + args.seconds
    crash = asyncio.create_task(crash_and_restart(args.kill_at, state, database_url, port, log))
    exports = asyncio.create_task(export_every(admin, args.export_every, stop_at, tally))
    await asyncio.gather(*(annotate(client, i, stop_at, tally) for i, client in enumerate(clients)))
    elapsed = time.monotonic() - started
    await exports
    downtime = await crash
    for client in [*clients, admin]:
        await client.aclose()
    state["server"].terminate()
    state["server"].wait(timeout=30)

    stored = stored_votes(database_url)
    return {
        "annotators": len(names), "seconds": args.seconds, "killed_at_s": args.kill_at,
        "elapsed_s": round(elapsed, 2), "restart_downtime_s": round(downtime, 2),
        "votes_acknowledged": len(tally.acknowledged), "votes_stored": len(stored),
        "stored_equals_acknowledged": stored == tally.acknowledged,
        "votes_per_s": round(len(tally.acknowledged) / elapsed, 1),
        "vote_latency_ms": {"p50": round(1000 * percentile(tally.vote_latency, 50), 1),
                            "p99": round(1000 * percentile(tally.vote_latency, 99), 1),
                            "max": round(1000 * max(tally.vote_latency), 1)},
        "vote_latency_ms_not_resent": {"p50": round(1000 * percentile(tally.calm_vote_latency, 50), 1),
                                       "p99": round(1000 * percentile(tally.calm_vote_latency, 99), 1)},
        "next_pair_latency_ms": {"p50": round(1000 * percentile(tally.page_latency, 50), 1),
                                 "p99": round(1000 * percentile(tally.page_latency, 99), 1)},
        "export_every_s": args.export_every, "exports": len(tally.export_latency),
        "export_latency_ms": {"p50": round(1000 * percentile(tally.export_latency, 50), 1),
                              "p99": round(1000 * percentile(tally.export_latency, 99), 1),
                              "max": round(1000 * max(tally.export_latency, default=float("nan")), 1)},
        "export_bytes_last": tally.export_bytes[-1] if tally.export_bytes else 0,
        "export_rows_last": tally.export_rows[-1] if tally.export_rows else 0,
        "requests_retried_across_restart": tally.retries,
        "errors": tally.errors[:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kill-at", type=float, default=30, help="seconds into the run to SIGKILL the server")
    parser.add_argument("--export-every", type=float, default=1.0, help="seconds between the admin's exports")
    parser.add_argument("--pairs", type=int, default=6000, help="enough that nobody runs out within the run")
    parser.add_argument("--gold", type=int, default=60)
    parser.add_argument("--db", help="database URL (default: a SQLite file in a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.seconds:
        parser.error(f"--kill-at is {args.kill_at}: the crash must fall inside the run, in (0, {args.seconds}).")
    if args.export_every <= 0:
        parser.error(f"--export-every is {args.export_every}: it is the pause between exports in seconds; pass > 0.")

    with tempfile.TemporaryDirectory(prefix="labeling-load-") as folder:
        database_url = args.db or f"sqlite:///{folder}/labeling.db"
        names = prepare_database(database_url, args.annotators, args.pairs, args.gold)
        with open(Path(folder) / "server.log", "w") as log:
            result = asyncio.run(run(args, database_url, names, log))
        server_log = (Path(folder) / "server.log").read_text()[-2000:]
    from benchmarks.record import command, save

    result.update({"database": database_url.split(":", 1)[0], "cpus": os.cpu_count(),
                   "load_average_after": [round(x, 2) for x in os.getloadavg()],
                   "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command()})
    print(json.dumps(result, indent=2))
    save("labeling_load", result, {k: v for k, v in result.items() if k != "load_average_after"}, out=args.out,
         params=vars(args))
    if not result["stored_equals_acknowledged"] or result["errors"]:
        print(f"FAILED: stored and acknowledged votes differ, or requests failed. Server log tail:\n{server_log}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
