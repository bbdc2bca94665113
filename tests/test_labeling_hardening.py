"""The labeling app under hostile or careless use (issue 18): password-guess throttling, body caps, Secure
cookies, re-invites ending sessions, gold that skipping cannot reveal, and reads that never take the write lock.
"""
import html
import re
import sqlite3
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from rlhf.labeling import accounts, throttle
from rlhf.labeling.app import LOGIN_CSRF_COOKIE, MAX_BODY_BYTES, SESSION_COOKIE, create_app
from rlhf.labeling.campaigns import create_campaign, is_gold_turn
from rlhf.labeling.cli import build_parser, main
from rlhf.labeling.db import Annotator, Assignment, LoginAttempt, LoginSession, Pair, make_engine, upgrade_database
from tests.labeling.support import PASSWORD, create_account, csrf_token, current_item, login, pair_rows, vote
from tests.labeling.test_databases import postgres_server  # noqa: F401  (fixture: a PostgreSQL server)

GOLD = {"g0": "a", "g1": "b", "g2": "a", "g3": "b"}
LOCAL = "http://127.0.0.1"  # the app's own default: cookies without Secure only when reached as localhost


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'labeling.db'}"


@pytest.fixture
def app(database_url):
    app = create_app(database_url, gold_min_answers=2)
    with Session(app.state.engine) as db:
        create_campaign(db, "demo", pair_rows({f"p{i}": "ab"[i % 2] for i in range(8)}),
                        pair_rows(GOLD, chosen_is_truth=True), gold_rate=0.25, seed=11)
    for name in ("ann", "bob"):
        create_account(database_url, name)
    create_account(database_url, "boss", role="admin")
    yield app
    app.state.engine.dispose()


def client(app, name: str | None = None, address: str = "10.0.0.1", base_url: str = LOCAL) -> TestClient:
    browser = TestClient(app, base_url=base_url, client=(address, 50000))
    if name:
        login(browser, name)
    return browser


def try_login(browser: TestClient, name: str, password: str):
    token = csrf_token(browser.get("/login").text)
    return browser.post("/login", data={"name": name, "password": password, "csrf_token": token},
                        follow_redirects=False)


@pytest.fixture
def scrypt_checks(monkeypatch) -> list[int]:
    """Counts calls of accounts.verify_password (each one an scrypt computation), from any thread."""
    calls: list[int] = []
    real = accounts.verify_password

    def counted(password: str, stored: str) -> bool:
        calls.append(1)  # list.append is atomic under the GIL
        return real(password, stored)

    monkeypatch.setattr(accounts, "verify_password", counted)
    return calls


# -- throttling -----------------------------------------------------------------------------------------------


def test_the_11th_wrong_password_in_a_minute_is_refused_without_an_scrypt_check(app, scrypt_checks):
    guesser = client(app)
    answers = [try_login(guesser, "ann", f"guess {i}") for i in range(11)]
    assert [a.status_code for a in answers] == [401] * 10 + [429]
    assert len(scrypt_checks) == 10  # the 11th was refused before any password was checked
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "Too many password tries" in refused.text and "Wait" in refused.text and "invite link" in refused.text
    # the right password is refused too while the account is locked, still unchecked
    assert try_login(client(app, address="10.0.0.9"), "ann", PASSWORD).status_code == 429
    assert len(scrypt_checks) == 10
    assert try_login(client(app, address="10.0.0.9"), "bob", PASSWORD).status_code == 303  # others are unaffected


def test_one_address_guessing_many_names_is_throttled_too(app, scrypt_checks):
    guesser = client(app, address="10.0.0.66")
    answers = [try_login(guesser, name, "guess") for name in [f"user{i}" for i in range(10)] + ["ann"]]
    assert [a.status_code for a in answers] == [401] * 10 + [429]
    assert len(scrypt_checks) == 10  # unknown names cost a (dummy) check like known ones, until refused
    assert try_login(client(app, address="10.0.0.7"), "ann", PASSWORD).status_code == 303


def test_a_successful_login_resets_the_accounts_count(app, scrypt_checks):
    for i in range(9):
        assert try_login(client(app, address=f"10.1.0.{i}"), "ann", "wrong").status_code == 401
    assert try_login(client(app, address="10.2.0.1"), "ann", PASSWORD).status_code == 303
    with Session(app.state.engine) as db:
        assert db.scalar(select(func.count()).select_from(LoginAttempt)
                         .where(LoginAttempt.key == throttle.attempt_key("account", "ann"))) == 0
    # ten more wrong tries (from fresh addresses) are checked before the account locks again
    answers = [try_login(client(app, address=f"10.3.0.{i}"), "ann", "wrong").status_code for i in range(11)]
    assert answers == [401] * 10 + [429]


def test_the_window_slides_and_retry_after_says_when(database_url):
    engine = make_engine(database_url)
    upgrade_database(engine)
    start = accounts.utc_now()
    with Session(engine, expire_on_commit=False) as db:
        for second in range(10):  # one try per second
            assert not throttle.admit(db, "ann", "10.0.0.1", start + timedelta(seconds=second)).refused
        refused = throttle.admit(db, "ann", "10.0.0.2", start + timedelta(seconds=30))
        assert refused.refused and refused.retry_after_s == 30  # the first try leaves the window at 60 s
        assert throttle.admit(db, "ann", "10.0.0.2", start + timedelta(seconds=59.5)).refused
        assert not throttle.admit(db, "ann", "10.0.0.2", start + timedelta(seconds=60.5)).refused
        # refused tries were not counted; the one admitted at 60.5 s took the slot the try at 0 s freed
        assert throttle.admit(db, "ann", "10.0.0.3", start + timedelta(seconds=60.7)).retry_after_s == 1  # (1 s)
        assert not throttle.admit(db, "ann", "10.0.0.3", start + timedelta(seconds=61.1)).refused
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_database_url(request, tmp_path):
    """A SQLite file, or a fresh database on the PostgreSQL server of tests/labeling/test_databases.py."""
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


def test_the_count_holds_across_threads_and_across_server_processes(shared_database_url, scrypt_checks):
    database_url = shared_database_url
    create_account(database_url, "ann")
    app = create_app(database_url)
    browsers = [client(app, address=f"10.4.0.{i}") for i in range(16)]
    tokens = [csrf_token(b.get("/login").text) for b in browsers]
    barrier = threading.Barrier(len(browsers))
    codes: list[int] = []

    def guess(browser, token):
        barrier.wait()
        codes.append(browser.post("/login", data={"name": "ann", "password": "wrong", "csrf_token": token},
                                  follow_redirects=False).status_code)

    threads = [threading.Thread(target=guess, args=pair) for pair in zip(browsers, tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(codes) == [401] * 10 + [429] * 6
    assert len(scrypt_checks) == 10

    other_process = create_app(database_url)  # a second server on the same database shares the count
    assert try_login(client(other_process, address="10.5.0.1"), "ann", "wrong").status_code == 429
    assert len(scrypt_checks) == 10
    other_process.state.engine.dispose()
    app.state.engine.dispose()


def test_invite_links_are_throttled_per_address(app):
    guesser = client(app, address="10.6.0.1")
    answers = [guesser.get(f"/invite/guessed-token-{i}") for i in range(11)]
    assert [a.status_code for a in answers] == [404] * 10 + [429]
    assert "Too many password tries" in answers[-1].text and int(answers[-1].headers["retry-after"]) >= 1
    with Session(app.state.engine) as db:
        token = accounts.invite(db, "dee")
    assert guesser.get(f"/invite/{token}").status_code == 429  # even a real link, from this address, for now
    newcomer = client(app, address="10.6.0.2")
    form = newcomer.get(f"/invite/{token}")
    assert form.status_code == 200
    posts = [newcomer.post(f"/invite/{token}", data={"password": "x" * 8, "confirm": "y" * 8,
                                                    "csrf_token": csrf_token(form.text)}) for _ in range(11)]
    assert [p.status_code for p in posts] == [400] * 10 + [429]
    assert "differ" in posts[0].text


# -- request bodies ------------------------------------------------------------------------------------------


def test_oversized_bodies_are_refused_unread_on_every_post(app, scrypt_checks):
    ann = client(app, "ann")
    item = current_item(ann, "demo")
    huge = "x" * (MAX_BODY_BYTES + 1)
    posts = {
        "/login": {"name": "ann", "password": huge, "csrf_token": "t"},
        f"/invite/{'t' * 43}": {"password": huge, "confirm": huge, "csrf_token": "t"},
        "/logout": {"csrf_token": huge},
        f"/assignments/{item['assignment']}/vote": {"choice": "A", "reason": huge, "csrf_token": item["csrf"]},
        "/admin/invite": {"name": huge, "csrf_token": "t"},
    }
    checks_before = len(scrypt_checks)
    for path, form in posts.items():
        response = ann.post(path, data=form, follow_redirects=False)
        assert response.status_code == 413, path
        assert f"limit of {MAX_BODY_BYTES:,} bytes" in response.text and "shorten" in response.text
        assert response.headers["x-content-type-options"] == "nosniff"  # the refusal is a normal page
    assert len(scrypt_checks) == checks_before
    # without a Content-Length (chunked), the body is counted as it arrives
    streamed = ann.post("/login", content=(b"x" * 4096 for _ in range(20)),
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert streamed.status_code == 413 and "limit of" in streamed.text
    assert vote(ann, item, "A", "a reason within the limit").status_code == 303  # normal forms still work


# -- cookies -------------------------------------------------------------------------------------------------


def session_cookie_header(response) -> str:
    return next(v for v in response.headers.get_list("set-cookie") if v.startswith(SESSION_COOKIE)).lower()


@pytest.mark.parametrize("base_url, forced, secure", [
    ("http://127.0.0.1", None, False),
    ("http://localhost:8000", None, False),
    ("http://[::1]:8000", None, False),
    ("https://labeling.example", None, True),
    ("https://127.0.0.1", None, True),
    ("http://labeling.example", False, False),  # forced off: a closed network without HTTPS
    ("http://127.0.0.1", True, True),  # forced on: behind a proxy that hides the scheme
])
def test_cookies_are_secure_unless_on_localhost(database_url, base_url, forced, secure):
    create_account(database_url, "ann")
    app = create_app(database_url, secure_cookies=forced)
    browser = TestClient(app, base_url=base_url)
    form = browser.get("/login")
    assert ("secure" in form.headers["set-cookie"].lower()) is secure
    token = csrf_token(form.text)
    browser.cookies.set(LOGIN_CSRF_COOKIE, token)  # as the browser sends it (httpx keeps Secure ones to https)
    response = browser.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": token},
                            follow_redirects=False)
    assert response.status_code == 303
    cookie = session_cookie_header(response)
    assert ("; secure" in cookie) is secure
    assert "httponly" in cookie and "samesite=lax" in cookie
    app.state.engine.dispose()


def test_no_login_over_plain_http_away_from_localhost(database_url):
    create_account(database_url, "ann")
    app = create_app(database_url)
    browser = TestClient(app, base_url="http://labeling.example:8000")
    page = browser.get("/login")
    assert page.status_code == 403 and "set-cookie" not in page.headers
    text = html.unescape(page.text)
    assert "'labeling.example' over plain HTTP" in text and "Open the app over HTTPS" in text
    assert "--no-secure-cookies" in text
    response = browser.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": "t"})
    assert response.status_code == 403 and SESSION_COOKIE not in browser.cookies
    app.state.engine.dispose()


def test_serve_flags_force_secure_cookies_either_way():
    parse = build_parser().parse_args
    assert parse(["serve"]).secure_cookies is None
    assert parse(["serve", "--secure-cookies"]).secure_cookies is True
    assert parse(["serve", "--no-secure-cookies"]).secure_cookies is False


# -- re-invites ----------------------------------------------------------------------------------------------


def test_a_reinvite_ends_every_session_of_the_account_and_its_old_password(app):
    laptop, phone = client(app, "ann"), client(app, "ann", address="10.0.0.2")
    bob = client(app, "bob")
    boss = client(app, "boss")
    page = boss.post("/admin/invite", data={"name": "ann", "csrf_token": csrf_token(boss.get("/admin").text)})
    link = re.search(r'<code id="invite-link">http://127\.0\.0\.1(/invite/[^<]+)</code>', page.text).group(1)
    for browser in (laptop, phone):
        response = browser.get("/", follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (303, "/login")
    assert bob.get("/", follow_redirects=False).status_code == 200  # other accounts keep their sessions
    with Session(app.state.engine) as db:
        ann_id = db.scalar(select(Annotator.id).where(Annotator.name == "ann"))
        assert db.scalar(select(func.count()).select_from(LoginSession).where(LoginSession.annotator_id == ann_id)) == 0
    assert try_login(client(app, address="10.0.0.3"), "ann", PASSWORD).status_code == 401  # old password is gone
    fresh = client(app, address="10.0.0.4")
    form = fresh.get(link)
    done = fresh.post(link, data={"password": "a new password", "confirm": "a new password",
                                  "csrf_token": csrf_token(form.text)}, follow_redirects=False)
    assert done.status_code == 303 and fresh.get("/", follow_redirects=False).status_code == 200


def test_the_invite_command_says_when_it_resets_an_account(app, database_url, capsys):
    ann = client(app, "ann")
    assert main(["invite", "ann", "--db", database_url]) == 0
    captured = capsys.readouterr()
    assert "ann already had an account" in captured.err and "/invite/" in captured.out
    assert ann.get("/", follow_redirects=False).status_code == 303
    assert main(["invite", "newcomer", "--db", database_url]) == 0
    assert capsys.readouterr().err == ""


# -- gold and skipping ---------------------------------------------------------------------------------------


def test_skipping_gold_looks_and_works_exactly_like_skipping_a_real_pair(app):
    """Skip every item: the answers, the statements the server runs, and the queue that follows are the same
    for gold and real pairs."""
    engine = app.state.engine
    statements: list[str] = []

    def record(_connection, _cursor, sql, *_rest):
        statements.append(sql)

    event.listen(engine, "before_cursor_execute", record)
    ann = client(app, "ann")
    skips = []  # (is gold, answer without varying parts, statements run by the vote)
    while (item := current_item(ann, "demo")) is not None:
        statements.clear()
        answer = vote(ann, item, "skip")
        run = list(statements)
        skips.append(("Question number g" in item["page"],
                      (answer.status_code, answer.headers["location"], sorted(answer.headers.items()), answer.content),
                      run))
    event.remove(engine, "before_cursor_execute", record)
    gold = [s for s in skips if s[0]]
    real = [s for s in skips if not s[0]]
    assert len(gold) >= 2 and len(real) == 8
    assert len({repr(s[1]) for s in skips}) == 1  # the same answer, byte for byte
    assert len({tuple(s[2]) for s in skips}) == 1  # the same SQL, so the same work and time on the server
    assert "UPDATE pairs SET claims" in " ".join(gold[0][2])

    with Session(engine) as db:
        ann_id = db.scalar(select(Annotator.id).where(Annotator.name == "ann"))
        queue = db.execute(select(Assignment.position, Pair.is_gold).join(Pair, Assignment.pair_id == Pair.id)
                           .where(Assignment.annotator_id == ann_id).order_by(Assignment.position)).all()
        gold_claims = set(db.scalars(select(Pair.claims).where(Pair.is_gold.is_(True))))
        real_claims = set(db.scalars(select(Pair.claims).where(Pair.is_gold.is_(False))))
    # gold came exactly where the seeded schedule puts it, as if every item had been judged
    last_real = max(position for position, is_gold in queue if not is_gold)
    assert [position for position, is_gold in queue if is_gold] == \
        [p for p in range(last_real) if is_gold_turn(11, ann_id, p, 0.25)]
    assert gold_claims == {0} and real_claims == {0}  # every real slot was handed back; gold was never claimed


def test_after_a_gold_skip_and_a_real_skip_the_next_pages_are_the_same_page(app):
    ann = client(app, "ann")
    following = {}
    while (item := current_item(ann, "demo")) is not None:
        is_gold = "Question number g" in item["page"]
        vote(ann, item, "skip")
        after = ann.get("/campaigns/demo/label")
        page = re.sub(r'id="response-(A|B)">.*?</div>', "", after.text, flags=re.S)
        page = re.sub(r"<div class=\"text\">.*?</div>|/assignments/\d+/|value=\"[^\"]{20,}\"|"
                      r"<span id=\"judged\">\d+</span>", "", page, flags=re.S)
        following.setdefault(is_gold, set()).add(page)
    assert following[True] & following[False]  # the page after a gold skip also follows a real skip


# -- reads and the write lock --------------------------------------------------------------------------------


def database_file(app) -> str:
    return app.state.engine.url.database


def test_admin_pages_and_the_export_do_not_wait_for_the_write_lock(app):
    boss = client(app, "boss")
    ann = client(app, "ann")
    vote(ann, current_item(ann, "demo"), "A")
    writer = sqlite3.connect(database_file(app), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock (busy_timeout is 30 s)
    answers: dict[str, int] = {}

    def read_everything():
        for path in ("/", "/admin", "/admin/campaigns/demo", "/admin/campaigns/demo/export.parquet"):
            answers[path] = boss.get(path).status_code

    reading = threading.Thread(target=read_everything)
    started = time.monotonic()
    reading.start()
    reading.join(timeout=10)
    try:
        assert not reading.is_alive(), "a read waited for the write lock"
        assert set(answers.values()) == {200} and len(answers) == 4
        assert time.monotonic() - started < 10
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        reading.join(timeout=60)


def test_a_vote_commits_while_an_export_holds_its_snapshot(app, monkeypatch):
    """The export's read transaction stays open across the vote: the vote does not wait for it."""
    from rlhf.labeling import results

    ann = client(app, "ann")
    boss = client(app, "boss")
    item = current_item(ann, "demo")
    exporting, voted = threading.Event(), threading.Event()
    real_export = results.export_comparisons

    def slow_export(db, campaign, policy):
        exported = real_export(db, campaign, policy)  # the snapshot is taken; the transaction is still open
        exporting.set()
        assert voted.wait(timeout=20), "the vote waited behind the export"
        return exported

    monkeypatch.setattr(results, "export_comparisons", slow_export)
    export = threading.Thread(target=lambda: boss.get("/admin/campaigns/demo/export.parquet"))
    export.start()
    assert exporting.wait(timeout=20)
    started = time.monotonic()
    assert vote(ann, item, "A").status_code == 303
    assert time.monotonic() - started < 5
    voted.set()
    export.join(timeout=30)


# -- paths -----------------------------------------------------------------------------------------------------


def test_ids_that_cannot_exist_are_a_404_with_a_message(app):
    ann = client(app, "ann")
    token = current_item(ann, "demo")["csrf"]
    for assignment in (2**63, 10**30, 0, -1, "abc"):
        response = ann.post(f"/assignments/{assignment}/vote", data={"choice": "A", "csrf_token": token})
        assert response.status_code == 404 and "Go back to your campaign list" in response.text
