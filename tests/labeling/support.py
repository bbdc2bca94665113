"""What the labeling tests share: pairs whose right answer is readable from their text, accounts,
and what a person does through HTTP (log in, read the current pair, vote).

A pair's truth is written into its responses, so a simulated annotator can judge what it is shown
without knowing the pair's id, its orientation or whether it is gold:
  'a' / 'b'   -> the better response says GOOD, the other bad;
  'tie'       -> both say SAME;
  'both_bad'  -> both say AWFUL.
"""
from __future__ import annotations

import html
import re
from datetime import datetime, timezone

import pandas as pd
from sqlalchemy.orm import Session

from rlhf.labeling import accounts
from rlhf.labeling.db import make_engine, upgrade_database

PASSWORD = "correct horse battery"
SHOWN_FLIP = {"A": "B", "B": "A", "tie": "A", "both_bad": "A"}


def pair_rows(truths: dict[str, str], chosen_is_truth: bool = False, policy_version: str = "policy-v1") -> pd.DataFrame:
    """Comparison rows, one per pair id, with the truth readable in the texts (see module docstring)."""
    rows = []
    for pair_id, truth in truths.items():
        text = {
            "a": (f"GOOD answer for {pair_id}", f"bad answer for {pair_id}"),
            "b": (f"bad answer for {pair_id}", f"GOOD answer for {pair_id}"),
            "tie": (f"SAME answer for {pair_id}, version one", f"SAME answer for {pair_id}, version two"),
            "both_bad": (f"AWFUL answer for {pair_id}", f"AWFUL reply for {pair_id}"),
        }[truth]
        rows.append({
            "pair_id": pair_id, "prompt": f"Question number {pair_id}?", "response_a": text[0],
            "response_b": text[1], "chosen": truth if chosen_is_truth else None, "source": "judge:test",
            "policy_version": policy_version, "votes": None, "agreement": None,
            "created_at": datetime(2026, 11, 1, tzinfo=timezone.utc),
        })
    return pd.DataFrame(rows)


def honest_choice(left: str, right: str) -> str:
    """What a careful annotator clicks for the texts shown on the left (A) and right (B)."""
    if "AWFUL" in left and "AWFUL" in right:
        return "both_bad"
    if "SAME" in left and "SAME" in right:
        return "tie"
    return "A" if "GOOD" in left else "B"


def contrary_choice(left: str, right: str) -> str:
    """A careless annotator: never what the careful one would click."""
    return SHOWN_FLIP[honest_choice(left, right)]


def create_account(database_url: str, name: str, role: str = "annotator", password: str = PASSWORD) -> None:
    engine = make_engine(database_url)
    upgrade_database(engine)
    with Session(engine) as db:
        accounts.accept_invite(db, accounts.invite(db, name, role), password)
    engine.dispose()


def csrf_token(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def login(client, name: str, password: str = PASSWORD) -> None:
    form = client.get("/login")
    response = client.post("/login", data={"name": name, "password": password, "csrf_token": csrf_token(form.text)},
                           follow_redirects=False)
    assert response.status_code == 303, response.text


def current_item(client, campaign: str) -> dict | None:
    """The annotator's current pair as shown: assignment id, CSRF token, prompt, left and right texts."""
    page = client.get(f"/campaigns/{campaign}/label")
    assert page.status_code == 200, page.text
    action = re.search(r'action="/assignments/(\d+)/vote"', page.text)
    if action is None:
        return None
    text = {key: html.unescape(re.search(rf'id="response-{key}">(.*?)</div>', page.text, re.S).group(1))
            for key in ("A", "B")}
    return {"assignment": int(action.group(1)), "csrf": csrf_token(page.text), "left": text["A"],
            "right": text["B"], "page": page.text}


def vote(client, item: dict, choice: str, reason: str = ""):
    return client.post(f"/assignments/{item['assignment']}/vote",
                       data={"choice": choice, "reason": reason, "csrf_token": item["csrf"]}, follow_redirects=False)


def label_everything(client, campaign: str, decide=honest_choice) -> list[dict]:
    """Judge pairs until the queue is empty; returns the items seen, each with the choice made."""
    seen = []
    while (item := current_item(client, campaign)) is not None:
        item["choice"] = decide(item["left"], item["right"])
        assert vote(client, item, item["choice"]).status_code == 303
        seen.append(item)
    return seen
