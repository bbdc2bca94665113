"""The web app over HTTP (FastAPI's TestClient, SQLite file): the security rules and the vote path."""
import io
import re
from datetime import timedelta

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from rlhf.comparisons import SCHEMA
from rlhf.labeling.app import SESSION_COOKIE, create_app
from rlhf.labeling.campaigns import create_campaign
from rlhf.labeling.db import Annotator, LoginSession, Vote, utc_now
from tests.labeling.support import (PASSWORD, create_account, csrf_token, current_item, label_everything, login,
                                    pair_rows, vote)

GOLD = {"g0": "a", "g1": "b", "g2": "a"}


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'labeling.db'}"


@pytest.fixture
def app(database_url):
    app = create_app(database_url, gold_min_answers=2, secure_cookies=False)  # TestClient: plain HTTP to 'testserver'
    with Session(app.state.engine) as db:
        create_campaign(db, "demo", pair_rows({f"p{i}": "ab"[i % 2] for i in range(8)}),
                        pair_rows(GOLD, chosen_is_truth=True), gold_rate=0.25, seed=11)
    for name in ("ann", "bob"):
        create_account(database_url, name)
    create_account(database_url, "boss", role="admin")
    return app


def client_for(app, name: str | None) -> TestClient:
    client = TestClient(app)
    if name:
        login(client, name)
    return client


def stored_votes(app) -> int:
    with Session(app.state.engine) as db:
        return db.scalar(select(func.count()).select_from(Vote))


def test_pages_need_a_login(app):
    anonymous = client_for(app, None)
    for path in ("/", "/campaigns/demo/label", "/admin", "/admin/campaigns/demo/export.parquet"):
        response = anonymous.get(path, follow_redirects=False)
        assert (response.status_code, response.headers["location"]) == (303, "/login")
    assert anonymous.post("/assignments/1/vote", data={"choice": "A"}, follow_redirects=False).status_code == 303
    assert stored_votes(app) == 0


def test_wrong_password_is_refused_without_saying_which_part_was_wrong(app):
    client = client_for(app, None)
    for name, password in (("ann", "wrong password"), ("nobody", PASSWORD)):
        token = csrf_token(client.get("/login").text)
        response = client.post("/login", data={"name": name, "password": password, "csrf_token": token})
        assert response.status_code == 401 and "Unknown name or wrong password." in response.text
    assert SESSION_COOKIE not in client.cookies


def test_csrf_is_required_on_every_post(app):
    ann = client_for(app, "ann")
    item = current_item(ann, "demo")
    for token in ("", "forged-token"):
        response = ann.post(f"/assignments/{item['assignment']}/vote", data={"choice": "A", "csrf_token": token})
        assert response.status_code == 403 and "security token" in response.text
        assert ann.post("/logout", data={"csrf_token": token}).status_code == 403
    assert stored_votes(app) == 0

    boss = client_for(app, "boss")
    assert boss.post("/admin/invite", data={"name": "eve", "csrf_token": "forged"}).status_code == 403

    stranger = client_for(app, None)
    stranger.get("/login")  # has the cookie, but the form field is missing
    assert stranger.post("/login", data={"name": "ann", "password": PASSWORD}).status_code == 403
    other = client_for(app, None)  # a form token from another browser does not match this one's cookie
    other.cookies.set("labeling_login_csrf", "mine")
    token = csrf_token(stranger.get("/login").text)
    assert other.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": token}).status_code == 403


def test_annotators_cannot_touch_another_annotators_queue(app):
    ann, bob = client_for(app, "ann"), client_for(app, "bob")
    ann_item = current_item(ann, "demo")
    bob_item = current_item(bob, "demo")
    forged = {**ann_item, "csrf": bob_item["csrf"]}  # bob's own valid token, ann's item
    response = vote(bob, forged, "B")
    assert response.status_code == 404 and "not in your queue" in response.text
    assert vote(bob, {**forged, "assignment": 99999}, "B").status_code == 404
    assert stored_votes(app) == 0
    assert current_item(ann, "demo")["assignment"] == ann_item["assignment"]  # ann's item still waits for ann


def test_annotators_cannot_reach_admin_pages(app):
    ann = client_for(app, "ann")
    for path in ("/admin", "/admin/campaigns/demo", "/admin/campaigns/demo/export.parquet"):
        response = ann.get(path)
        assert response.status_code == 403 and "for campaign admins" in response.text
    token = current_item(ann, "demo")["csrf"]
    assert ann.post("/admin/invite", data={"name": "eve", "csrf_token": token}).status_code == 403


def annotator_facing_pages(client) -> list[str]:
    """Every page an annotator can fetch while labeling the whole campaign, error pages included."""
    pages = [client.get("/").text, client.get("/login").text, client.get("/nope").text,
             client.get("/campaigns/unknown/label").text, client.get("/admin").text]
    while (item := current_item(client, "demo")) is not None:
        pages.append(item["page"])
        pages.append(vote(client, item, "A").text)
    pages.append(client.get("/campaigns/demo/label").text)
    return pages


def skeleton(page: str) -> str:
    """A label page without its texts, ids and tokens: what is left must not tell gold from real."""
    page = re.sub(r'id="response-(A|B)">.*?</div>', 'id="response-\\1"></div>', page, flags=re.S)
    page = re.sub(r"<div class=\"text\">.*?</div>", "", page, flags=re.S)
    page = re.sub(r"/assignments/\d+/", "/assignments/N/", page)
    page = re.sub(r'value="[^"]{20,}"', 'value="TOKEN"', page)
    return re.sub(r'<span id="judged">\d+</span>', "", page)


def test_no_gold_in_any_page_an_annotator_can_fetch(app):
    ann = client_for(app, "ann")
    pages = annotator_facing_pages(ann)
    label_pages = [p for p in pages if 'id="vote-form"' in p]
    gold_pages = [p for p in label_pages if "Question number g" in p]
    assert len(gold_pages) >= 2 and len(gold_pages) < len(label_pages)
    assert len({skeleton(p) for p in label_pages}) == 1  # gold and real pages are the same page
    for text in pages:
        assert "gold" not in text.lower()
        assert not re.search(r"\b(expected|correct answer|chosen)\b", text, re.I)
        outside_texts = re.sub(r'(Question number|answer for) [pg]\d|value="[^"]{20,}"', "", text)
        assert not re.search(r"\b[pg]\d\b", outside_texts)  # pair ids appear nowhere but in the texts


def test_double_submit_is_idempotent(app):
    ann = client_for(app, "ann")
    item = current_item(ann, "demo")
    first, second = vote(ann, item, "A", "clear"), vote(ann, item, "A", "clear")
    assert first.status_code == second.status_code == 303
    assert first.headers["location"] == second.headers["location"] == "/campaigns/demo/label"
    assert vote(ann, item, "B").status_code == 303  # a late change of mind is not a second vote
    with Session(app.state.engine) as db:
        stored = db.scalars(select(Vote)).all()
    assert len(stored) == 1 and stored[0].reason == "clear"
    assert current_item(ann, "demo")["assignment"] != item["assignment"]


def test_unknown_choice_is_refused(app):
    ann = client_for(app, "ann")
    response = vote(ann, current_item(ann, "demo"), "C")
    assert response.status_code == 400 and "unknown" in response.text
    assert stored_votes(app) == 0


def test_session_expires(app):
    ann = client_for(app, "ann")
    assert ann.get("/", follow_redirects=False).status_code == 200
    with Session(app.state.engine) as db:
        db.execute(update(LoginSession).values(expires_at=utc_now() - timedelta(seconds=1)))
        db.commit()
    response = ann.get("/", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/login")


def test_logout_ends_the_session_on_the_server(app):
    ann = client_for(app, "ann")
    cookie = ann.cookies[SESSION_COOKIE]
    token = csrf_token(ann.get("/").text)
    assert ann.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    replay = client_for(app, None)
    replay.cookies.set(SESSION_COOKIE, cookie)
    assert replay.get("/", follow_redirects=False).status_code == 303


def test_invite_link_sets_a_password_once(app, database_url):
    boss = client_for(app, "boss")
    page = boss.post("/admin/invite", data={"name": "dee", "csrf_token": csrf_token(boss.get("/admin").text)})
    link = re.search(r'<code id="invite-link">http://testserver(/invite/[^<]+)</code>', page.text).group(1)
    dee = client_for(app, None)
    form = dee.get(link)
    assert "Welcome, dee" in form.text
    mismatch = dee.post(link, data={"password": PASSWORD, "confirm": "other", "csrf_token": csrf_token(form.text)})
    assert mismatch.status_code == 400
    short = dee.post(link, data={"password": "short", "confirm": "short", "csrf_token": csrf_token(form.text)})
    assert short.status_code == 400 and "at least 8" in short.text
    done = dee.post(link, data={"password": PASSWORD, "confirm": PASSWORD, "csrf_token": csrf_token(form.text)},
                    follow_redirects=False)
    assert done.status_code == 303 and SESSION_COOKIE in dee.cookies
    assert client_for(app, None).get(link).status_code == 404  # spent
    with Session(app.state.engine) as db:
        stored = db.scalar(select(Annotator.password_hash).where(Annotator.name == "dee"))
    assert stored.startswith("scrypt$") and PASSWORD not in stored


def test_security_headers(app):
    response = client_for(app, None).get("/login")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_admin_sees_figures_and_exports_the_majority(app, database_url):
    ann, bob = client_for(app, "ann"), client_for(app, "bob")
    label_everything(ann, "demo")
    label_everything(bob, "demo")
    create_account(database_url, "carl")
    label_everything(client_for(app, "carl"), "demo")

    boss = client_for(app, "boss")
    page = boss.get("/admin/campaigns/demo").text
    assert re.search(r'id="complete">8 of 8', page)
    assert re.search(r'id="kappa">1\.000', page)
    export = boss.get("/admin/campaigns/demo/export.parquet")
    assert export.headers["content-disposition"] == 'attachment; filename="demo.parquet"'
    table = pd.read_parquet(io.BytesIO(export.content))
    assert list(table.columns) == SCHEMA.names
    assert sorted(table["pair_id"]) == [f"p{i}" for i in range(8)]  # gold left out
    assert list(table.sort_values("pair_id")["chosen"]) == ["a", "b"] * 4
    assert set(table["source"]) == {"human:demo"} and set(table["votes"]) == {3} and set(table["agreement"]) == {1.0}
