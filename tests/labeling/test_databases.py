"""The same behaviour on a SQLite file and on a real PostgreSQL server started for the test session.

The PostgreSQL server comes from Debian's `postgresql` package: initdb and pg_ctl in a temporary
folder, on 127.0.0.1 and a free port, run as the `postgres` user when the tests run as root.
"""
import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.labeling.app import create_app
from rlhf.labeling.campaigns import create_campaign
from rlhf.labeling.db import Assignment, Base, Pair, Vote, make_engine, upgrade_database
from tests.labeling.support import create_account, current_item, honest_choice, label_everything, login, pair_rows, vote


def postgres_bin_dir() -> Path | None:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return installed[-1].parent if installed else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server; yields the URL of its maintenance database."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are missing: `apt-get install postgresql` provides them")
    run_as: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="labeling-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a `postgres` user to start PostgreSQL as")
        shutil.chown(folder, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def pg(*args: str) -> None:
        subprocess.run([*run_as, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
       "--locale=C")
    # fsync off: a test server that dies takes nothing of value with it, and commits are much faster
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
       f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labeling.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"labeling_{uuid.uuid4().hex[:12]}"
    plain = server.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def only_tables_with_a_model(obj, name, type_, reflected, compare_to) -> bool:
    # Other modules add tables to this migration chain (rlhf/serve_store.py's served_*). Their models join
    # Base only when that module is imported; a table with no model loaded here is not this test's business.
    return not (type_ == "table" and reflected and compare_to is None)


def test_migrations_build_the_models_schema(database_url):
    engine = make_engine(database_url)
    upgrade_database(engine)
    upgrade_database(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                               "include_object": only_tables_with_a_model})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_a_campaign_from_invites_to_export(database_url):
    app = create_app(database_url, gold_min_answers=1, secure_cookies=False)  # TestClient: plain HTTP
    with Session(app.state.engine) as db:
        create_campaign(db, "pg", pair_rows({"p0": "a", "p1": "b", "p2": "tie"}),
                        pair_rows({"g0": "a", "g1": "b"}, chosen_is_truth=True), gold_rate=0.5, seed=2)
    for name in ("ann", "bob", "cy"):
        create_account(database_url, name)
        client = TestClient(app)
        login(client, name)
        label_everything(client, "pg")
    create_account(database_url, "boss", role="admin")
    boss = TestClient(app)
    login(boss, "boss")
    exported = pd.read_parquet(io.BytesIO(boss.get("/admin/campaigns/pg/export.parquet").content))
    assert sorted(zip(exported["pair_id"], exported["chosen"], exported["votes"])) == \
        [("p0", "a", 3), ("p1", "b", 3), ("p2", "tie", 3)]
    app.state.engine.dispose()


def run_together(workers) -> list:
    """Start every worker at the same moment (a barrier) in its own thread; return their results."""
    barrier = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def run(index, work):
        barrier.wait()
        results[index] = work()

    threads = [threading.Thread(target=run, args=(i, work)) for i, work in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_concurrent_annotators_never_push_a_pair_past_its_overlap(database_url):
    app = create_app(database_url, secure_cookies=False)
    with Session(app.state.engine) as db:
        create_campaign(db, "race", pair_rows({"p0": "a", "p1": "b"}), gold_rate=0.0, seed=1)
    clients = []
    for index in range(8):
        create_account(database_url, f"a{index}")
        clients.append(TestClient(app))
        login(clients[-1], f"a{index}")
    items = run_together([lambda c=client: current_item(c, "race") for client in clients])
    assert sum(item is not None for item in items) == 6  # 2 pairs x overlap 3; two annotators find nothing
    with Session(app.state.engine) as db:
        per_pair = dict(db.execute(select(Assignment.pair_id, func.count()).group_by(Assignment.pair_id)).all())
        claims = dict(db.execute(select(Pair.id, Pair.claims)).all())
    assert sorted(per_pair.values()) == [3, 3] and per_pair == claims
    app.state.engine.dispose()


def test_concurrent_double_submit_stores_one_vote(database_url):
    app = create_app(database_url, secure_cookies=False)
    with Session(app.state.engine) as db:
        create_campaign(db, "twice", pair_rows({"p0": "a"}), gold_rate=0.0, seed=1)
    create_account(database_url, "ann")
    tabs = [TestClient(app) for _ in range(4)]
    login(tabs[0], "ann")
    for tab in tabs[1:]:
        tab.cookies = tabs[0].cookies  # four tabs of one browser
    item = current_item(tabs[0], "twice")
    responses = run_together([lambda t=tab: vote(t, item, honest_choice(item["left"], item["right"]))
                              for tab in tabs])
    assert [r.status_code for r in responses] == [303] * 4
    with Session(app.state.engine) as db:
        assert db.scalars(select(Vote.choice)).all() == ["a"]
    app.state.engine.dispose()
