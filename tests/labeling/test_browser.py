"""End to end in a real headless browser: Debian's chromium driven by Playwright, against uvicorn on 127.0.0.1.

The admin logs in and invites three annotators from the admin page; each opens their invite link,
sets a password and labels the whole campaign with the keyboard alone, gold pairs interleaved.
Two judge carefully; the third clicks the wrong side every time, fails the gold and is flagged, so
their votes weigh 0.5. The admin then downloads the export, which must read back as comparisons.

Screenshots go to $LABELING_SCREENSHOTS, or to the test's tmp_path.
"""
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy.orm import Session

from rlhf.comparisons import CHOICES, read_comparisons, source_kind, to_table
from rlhf.labeling.app import create_app
from rlhf.labeling.campaigns import create_campaign
from tests.labeling.support import PASSWORD, contrary_choice, create_account, honest_choice, pair_rows

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps dialling Google, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REAL = {"p0": "a", "p1": "b", "p2": "a", "p3": "tie", "p4": "both_bad"}
GOLD = {"g0": "a", "g1": "b", "g2": "a"}
KEYS = {"A": "a", "B": "b", "tie": "t", "both_bad": "x", "skip": "s"}


@pytest.fixture
def base_url(tmp_path):
    """uvicorn serving a fresh app with one campaign and one admin, in a thread, on a free loopback port."""
    database_url = f"sqlite:///{tmp_path / 'labeling.db'}"
    app = create_app(database_url, gold_min_answers=2, flagged_vote_weight=0.5)
    with Session(app.state.engine) as db:
        create_campaign(db, "e2e", pair_rows(REAL), pair_rows(GOLD, chosen_is_truth=True), gold_rate=0.34, seed=4)
    create_account(database_url, "boss", role="admin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` provides it")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("LABELING_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_focus(page, element_id: str) -> None:
    """Autofocus lands a moment after load; keys typed before it would go nowhere."""
    page.wait_for_function(f"document.activeElement && document.activeElement.id === {element_id!r}")


def log_in(page, base_url: str, name: str, shot: Path | None = None) -> None:
    page.goto(f"{base_url}/login")
    wait_for_focus(page, "name")
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    if shot:
        page.screenshot(path=shot)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def invite(page, name: str) -> str:
    page.fill("#invite-name", name)
    with page.expect_navigation():
        page.press("#invite-name", "Enter")
    return page.inner_text("#invite-link")


def accept_invite(page, link: str) -> None:
    page.goto(link)
    wait_for_focus(page, "password")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith("/"), page.content()


def label_campaign(page, decide, shots: Path | None, reason: str | None) -> list[str]:
    """Judge with keys only until the done page; returns the prompts seen. Screenshots the first item and the end."""
    for _ in range(20):  # Tab from the top of the home page to the campaign's link
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "e2e":
            break
    with page.expect_navigation():
        page.keyboard.press("Enter")
    prompts = []
    while page.query_selector("#vote-form"):
        left, right = page.inner_text("#response-A"), page.inner_text("#response-B")
        prompts.append(page.inner_text(".prompt .text"))
        if reason and len(prompts) == 1:
            page.keyboard.press("r")
            page.keyboard.type(reason)
            page.keyboard.press("Escape")
        if shots and len(prompts) == 1:
            page.screenshot(path=shots / "03-label-page.png", full_page=True)
        with page.expect_navigation():
            page.keyboard.press(KEYS[decide(left, right)])
    assert page.query_selector("#done")
    if shots:
        page.screenshot(path=shots / "04-done.png", full_page=True)
    return prompts


def test_three_annotators_label_a_campaign_and_the_admin_exports_it(base_url, browser, screenshots, tmp_path):
    admin = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    log_in(admin, base_url, "boss", screenshots / "01-login.png")
    admin.goto(f"{base_url}/admin")
    links = {name: invite(admin, name) for name in ("ann", "bob", "cy")}
    admin.screenshot(path=screenshots / "02-admin-invite.png", full_page=True)

    seen = {}
    for name, decide in (("ann", honest_choice), ("bob", honest_choice), ("cy", contrary_choice)):
        page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
        accept_invite(page, links[name])
        seen[name] = label_campaign(page, decide, screenshots if name == "ann" else None,
                                    reason="B is vague" if name == "ann" else None)
        page.context.close()
    for prompts in seen.values():
        assert sum("number p" in p for p in prompts) == len(REAL)  # every real pair: overlap 3 with 3 annotators
        assert sum("number g" in p for p in prompts) >= 2  # gold interleaved

    admin.goto(f"{base_url}/admin/campaigns/e2e")
    admin.screenshot(path=screenshots / "05-admin-campaign.png", full_page=True)
    assert admin.inner_text("#complete").startswith("5 of 5")
    assert admin.inner_text("#annotators tr.flagged td:first-child") == "cy"
    with admin.expect_download() as download:
        admin.click("#export")
    path = tmp_path / "export.parquet"
    download.value.save_as(path)

    exported = read_comparisons(path).sort_values("pair_id")
    to_table(exported)  # the comparison schema, column for column
    assert list(exported["pair_id"]) == ["p0", "p1", "p2", "p3"]  # p4: a both-bad majority; gold never exported
    assert list(exported["chosen"]) == [REAL[p] for p in exported["pair_id"]]  # original a/b, swaps undone
    assert set(exported["chosen"]) <= set(CHOICES) and {source_kind(s) for s in exported["source"]} == {"human"}
    assert set(exported["source"]) == {"human:e2e"}
    assert list(exported["votes"]) == [3, 3, 3, 3]
    assert list(exported["agreement"]) == pytest.approx([2 / 2.5] * 4)  # cy's dissent weighs 0.5
