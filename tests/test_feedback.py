"""The refeed: the scrubber, served prompts and user feedback as comparison rows."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session

from rlhf.comparisons import to_table
from rlhf.labeling.db import Base, make_engine, upgrade_database
from rlhf.scrub import scrub
from rlhf.serve_store import Feedback, ServedChoice, ServedCompletion, feedback_comparisons, served_prompts
from tests.labeling.test_databases import database_url, postgres_server  # noqa: F401  (fixtures: SQLite and PostgreSQL)


@pytest.mark.parametrize("text, clean, kinds", [
    ("write to ana.lopez+work@mail.example.org today", "write to [EMAIL] today", ["email"]),
    ("call +1 (555) 123-4567 or 555-123-4567", "call [PHONE] or [PHONE]", ["phone"]),
    ("ring +44 20 7946 0958, or 020-7946-0958, or 555.123.4567", "ring [PHONE], or [PHONE], or [PHONE]", ["phone"]),
    ("card 4111 1111 1111 1111 exp 12/29", "card [CARD] exp 12/29", ["card"]),
    ("pay with 4111-1111-1111-1112 or 378282246310005", "pay with [CARD] or [CARD]", ["card"]),
    ("server 192.168.10.254 and 2001:db8::8a2e:370:7334 and ::1", "server [IP] and [IP] and [IP]", ["ip"]),
    ("mail bob@x.io from 10.0.0.1", "mail [EMAIL] from [IP]", ["email", "ip"]),
])
def test_scrub_replaces_personal_data(text, clean, kinds):
    assert scrub(text) == (clean, kinds)


@pytest.mark.parametrize("text", [
    "on 2026-11-23 at 12:30:45 we shipped v1.2.3",
    "pi is 3.14159 and e is 2.71828",
    "use std::vector and Foo::bar, not abc::def",
    "order 12345678 holds 100 200 300 items",
    "999.999.999.999 is no address",
    "the year 1999 and the range 10-20",
])
def test_scrub_leaves_ordinary_text_alone(text):
    assert scrub(text) == (text, [])


def test_feedback_tables_match_their_migration(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_database(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def served(db: Session, cid: str, prompt: str, texts: list[str], minutes: int, version: str = "1",
           messages: list[dict] | None = None, key: str = "k") -> None:
    messages = messages or [{"role": "user", "content": prompt}]
    db.add(ServedCompletion(
        id=cid, model_name="policy", model_version=version, messages=json.dumps(messages), prompt=prompt,
        single_turn=[m["role"] for m in messages if m["role"] != "system"] == ["user"], temperature=1.0, top_p=1.0,
        max_tokens=16, prompt_tokens=5, api_key_id=key, created_at=T0 + timedelta(minutes=minutes),
        choices=[ServedChoice(index=i, text=t, finish_reason="stop", completion_tokens=3) for i, t in enumerate(texts)]))


def rate(db: Session, cid: str, minutes: int, **fields) -> None:
    kind = "pairwise" if "preferred" in fields else "thumbs"
    db.add(Feedback(completion_id=cid, kind=kind, created_at=T0 + timedelta(minutes=minutes), **fields))


@pytest.fixture
def store(database_url):
    """The same served traffic and feedback in a SQLite file and, where PostgreSQL is installed, on a real server."""
    url = database_url
    engine = make_engine(url)
    upgrade_database(engine)
    with Session(engine) as db:
        served(db, "c1", "Explain rain to me", ["rain falls", "water drops"], 0)
        served(db, "c2", "  explain RAIN to   me ", ["clouds weep"], 1)  # same prompt, other spacing and case
        served(db, "c3", "Call me at 555-123-4567", ["ok"], 2)
        served(db, "c4", "yes, do that", ["done"], 3, messages=[
            {"role": "user", "content": "plan a trip"}, {"role": "assistant", "content": "where?"},
            {"role": "user", "content": "yes, do that"}])
        served(db, "c5", "Explain rain to me", ["from clouds"], 4, version="2")
        served(db, "c6", "What is 2+2?", ["4", "five"], 5)
        db.commit()
        rate(db, "c1", 10, preferred="a")
        rate(db, "c1", 11, preferred="b")       # the user changed their mind: the latest counts
        rate(db, "c1", 12, choice_index=0, rating="up")  # left to the pairwise judgement of c1
        rate(db, "c2", 13, choice_index=0, rating="down")
        rate(db, "c5", 14, choice_index=0, rating="up")  # other version: no partner for c2's down
        rate(db, "c6", 15, choice_index=0, rating="up")
        rate(db, "c6", 16, choice_index=1, rating="down")
        rate(db, "c3", 17, choice_index=0, rating="down")  # no up to pair with
        db.commit()
    engine.dispose()
    return url


MAX_CHARS = 65536


def test_served_prompts_are_scrubbed_deduplicated_single_turn(store):
    prompts, too_long = served_prompts(store, MAX_CHARS)
    assert list(prompts["prompt"]) == ["Explain rain to me", "Call me at [PHONE]", "What is 2+2?"]
    assert list(prompts["times_served"]) == [3, 1, 1]
    assert list(prompts["pii"]) == ["", "phone", ""]
    assert list(prompts["api_key_id"]) == ["k", "k", "k"] and too_long == 0
    assert prompts["model_version"][0] == "policy/1"
    later, _ = served_prompts(store, MAX_CHARS, since=(T0 + timedelta(minutes=2)).isoformat())
    assert list(later["prompt"]) == ["Call me at [PHONE]", "Explain rain to me", "What is 2+2?"]
    # past the cap a text is not scrubbed and not handed on, and is counted: 'Explain rain to me' is 18 characters
    short, too_long = served_prompts(store, 17)
    assert list(short["prompt"]) == ["What is 2+2?"] and too_long == 4
    assert feedback_comparisons(store, 17)[1] == 1  # c1's pairwise row; c6's thumbs pair stays


def test_feedback_becomes_comparison_rows(store):
    rows, too_long = feedback_comparisons(store, MAX_CHARS)
    to_table(rows)  # the comparison schema accepts them
    by_id = {r["pair_id"]: r for r in rows.to_dict("records")}
    assert set(by_id) == {"feedback-c1", "feedback-c6.0-c6.1"} and too_long == 0
    pairwise = by_id["feedback-c1"]
    assert (pairwise["response_a"], pairwise["response_b"], pairwise["chosen"]) == ("rain falls", "water drops", "b")
    assert pairwise["source"] == "feedback:policy/1" and pairwise["policy_version"] == "policy/1"
    thumbs = by_id["feedback-c6.0-c6.1"]
    chosen_text = thumbs["response_a"] if thumbs["chosen"] == "a" else thumbs["response_b"]
    assert chosen_text == "4" and {thumbs["response_a"], thumbs["response_b"]} == {"4", "five"}


def test_reads_do_not_wait_for_the_write_lock(tmp_path):
    """The refeed's reads take a WAL snapshot: a writer holding the lock (the server committing) does not stop them."""
    import sqlite3
    import time

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    upgrade_database(engine)
    with Session(engine) as db:
        served(db, "c1", "Explain rain to me", ["rain falls", "water drops"], 0)
        db.commit()
        rate(db, "c1", 1, preferred="a")
        db.commit()
    engine.dispose()
    writer = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the write lock, held; a reader that wanted it would wait 30 s
    writer.execute("INSERT INTO served_feedback (completion_id, kind, rating, choice_index, created_at) "
                   "VALUES ('c1', 'thumbs', 'up', 0, '2026-11-23 12:05:00')")
    try:
        started = time.monotonic()
        prompts, _ = served_prompts(url, MAX_CHARS)
        rows, _ = feedback_comparisons(url, MAX_CHARS)
        assert time.monotonic() - started < 10
        assert list(prompts["prompt"]) == ["Explain rain to me"] and list(rows["pair_id"]) == ["feedback-c1"]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_missing_store_is_an_error_not_an_empty_refeed(tmp_path):
    with pytest.raises(FileNotFoundError, match="rlhf serve"):
        served_prompts(f"sqlite:///{tmp_path / 'nowhere.db'}", MAX_CHARS)


def test_refeed_snapshots_the_store_for_the_next_cycle(store, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from rlhf.comparisons import SCHEMA, read_comparisons
    from rlhf.refeed import refeed
    from rlhf.serve_store import PROMPT_SCHEMA

    monkeypatch.chdir(tmp_path)  # the registry the champion snapshot reads: an empty one here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prompts_out, comparisons_out = tmp_path / "out" / "prompts.parquet", tmp_path / "out" / "comparisons.parquet"
    champion_out = tmp_path / "out" / "sampling_policy.json"
    counts = refeed(store, MAX_CHARS, "champion", "tiny-policy", str(prompts_out), str(comparisons_out),
                    str(champion_out))
    assert counts == {"refeed/store_found": 1, "refeed/served_prompts": 3, "refeed/prompts_with_pii": 1,
                      "refeed/feedback_comparisons": 2, "refeed/too_long_prompts": 0, "refeed/too_long_comparisons": 0,
                      "refeed/champion_version": 0}
    assert json.loads(champion_out.read_text()) == {"collect.policy": "champion", "model_name": "tiny-policy",
                                                    "version": None}
    assert list(pd.read_parquet(prompts_out)["prompt"]) == ["Explain rain to me", "Call me at [PHONE]", "What is 2+2?"]
    assert set(read_comparisons(comparisons_out)["source"]) == {"feedback:policy/1"}

    # the same store gives the same bytes: DVC then finds collect's inputs unchanged and skips it and what follows
    snapshots = [prompts_out.read_bytes(), comparisons_out.read_bytes()]
    refeed(store, MAX_CHARS, "champion", "tiny-policy", str(prompts_out), str(comparisons_out), str(champion_out))
    assert [prompts_out.read_bytes(), comparisons_out.read_bytes()] == snapshots

    nothing = refeed(f"sqlite:///{tmp_path / 'never-served.db'}", MAX_CHARS, "champion", "tiny-policy", str(prompts_out),
                     str(comparisons_out), str(champion_out))
    assert nothing["refeed/store_found"] == 0 and len(pd.read_parquet(prompts_out)) == 0
    assert not (tmp_path / "never-served.db").exists()  # the snapshot does not create a store
    # a fresh machine's empty snapshots have the columns and types of full ones, and are as stable
    assert pq.read_schema(prompts_out).remove_metadata() == PROMPT_SCHEMA
    assert pq.read_schema(comparisons_out).remove_metadata() == SCHEMA
    empty = [prompts_out.read_bytes(), comparisons_out.read_bytes()]
    refeed(f"sqlite:///{tmp_path / 'never-served.db'}", MAX_CHARS, "champion", "tiny-policy", str(prompts_out),
                     str(comparisons_out), str(champion_out))
    assert [prompts_out.read_bytes(), comparisons_out.read_bytes()] == empty


def test_collect_takes_served_prompts_first_and_feedback_as_rows(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rlhf.collect import collect, load_prompts
    from rlhf.comparisons import read_comparisons
    from rlhf.params import CollectParams, ModelParams, ParamError
    from rlhf.refeed import refeed

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match="python -m rlhf.refeed"):
        load_prompts(CollectParams(sources=["policy", "feedback"]))
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    engine = make_engine(url)
    upgrade_database(engine)
    with Session(engine) as db:
        served(db, "c1", "Explain rain to me", ["rain falls", "water drops"], 0)
        served(db, "c2", "Mail me at bo@example.com", ["ok"], 1)
        db.commit()
        rate(db, "c1", 2, preferred="a")
        db.commit()
    engine.dispose()
    refeed(url, MAX_CHARS, "champion", "tiny-policy")  # data/feedback/*.parquet, where collect looks

    mixed = load_prompts(CollectParams(sources=["policy", "feedback"], num_prompts=5, seed=0))
    assert mixed[:2] == ["Explain rain to me", "Mail me at [EMAIL]"] and len(set(mixed)) == 5
    everything_served = CollectParams(sources=["policy", "feedback"], num_prompts=2, max_served_share=1.0)
    assert sorted(load_prompts(everything_served)) == sorted(mixed[:2])
    assert "Mail me at [EMAIL]" not in load_prompts(CollectParams(sources=["policy"], num_prompts=0))

    params = SimpleNamespace(collect=CollectParams(sources=["feedback"]), model=ModelParams())
    metrics = collect(params, out=str(tmp_path / "collected.parquet"), judgements_out=str(tmp_path / "j.parquet"))
    rows = read_comparisons(tmp_path / "collected.parquet")
    assert metrics["collect/feedback_comparisons"] == 1 and list(rows["source"]) == ["feedback:policy/1"]
    assert list(rows["chosen"]) == ["a"]


def test_one_key_cannot_fill_the_prompt_pool(tmp_path, monkeypatch):
    """A key sending many distinct prompts brings at most max_prompts_per_key; served prompts take at most
    max_served_share of the draw, the rest comes from the project's pool."""
    from rlhf.collect import load_prompts
    from rlhf.params import CollectParams
    from rlhf.refeed import refeed

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    engine = make_engine(url)
    upgrade_database(engine)
    with Session(engine) as db:
        for i in range(30):
            served(db, f"flood{i}", f"buy our pills, variant {i}", ["ok"], i, key="flooder")
        for i in range(3):
            served(db, f"user{i}", f"honest question number {i}", ["ok"], 40 + i, key=f"user{i}")
        db.commit()
    engine.dispose()
    refeed(url, MAX_CHARS, "champion", "tiny-policy")

    def drawn(**caps) -> list[str]:
        return load_prompts(CollectParams(sources=["policy", "feedback"], num_prompts=20, seed=0, **caps))

    flood = lambda prompts: sum(p.startswith("buy our pills") for p in prompts)  # noqa: E731
    honest = lambda prompts: sum(p.startswith("honest question") for p in prompts)  # noqa: E731
    uncapped = drawn(max_prompts_per_key=100, max_served_share=1.0)
    assert flood(uncapped) + honest(uncapped) == 20 and flood(uncapped) >= 15  # one key decided, before the caps
    per_key = drawn(max_prompts_per_key=5, max_served_share=1.0)
    assert flood(per_key) == 5 and honest(per_key) == 3 and len(set(per_key)) == 20
    shared = drawn(max_prompts_per_key=5, max_served_share=0.25)
    assert flood(shared) + honest(shared) == 5 and len(set(shared)) == 20  # 25% of 20; 15 from the project's pool
    everything = load_prompts(CollectParams(sources=["policy", "feedback"], num_prompts=0, max_prompts_per_key=5,
                                            max_served_share=0.5))
    served_count = flood(everything) + honest(everything)
    assert served_count <= (len(everything) - served_count)  # at most half of the whole pool


# -- the scrubber's time: linear, whatever the text --------------------------------------------------------------

ADVERSARIAL = {  # each repeated to 200 KB; the first took 22 s with the e-mail pattern this file's scrubber replaced
    "email": ["%.", "a.", "a@", "a@b.", "x@" + "a-" * 5 + ".", ".@.", "a" * 1000 + "@" + "b." * 1000 + "1 "],
    "card": ["1", "1 ", "1-", "1 1 1 1 1 1 1 1 1 1 1 1 x "],
    "ipv4": ["1.", "255.", "1.1.1 ", "999.999.999.999 "],
    "ipv6": [":", "1:", "1::2 ", "1:2:3 ", "1:2:3:4:5:6:7:8:9 ", "1::1::1 "],
    "phone": [" +1111111111111111111111111x", "+1 ", " +1 (1) (1) (1) (1) (1) (1)x", "55.555.555.5.", "(555) 555-555 "],
    "all": ["1 1 1 1 1 1 1 1 1 1 1 1 x .:@ ", "1.1:1 1-1+1(1) @ ", "a1:b2.c3@d4 "],
}


@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_the_scrubber_is_linear_on_adversarial_text(kind):
    """A quadratic pattern takes seconds on 200 KB (the old e-mail one: 22 s); linear ones take milliseconds
    (benchmarks/serve_load.py --scrub times them). The bound is loose so that a loaded machine passes."""
    import time

    for unit in ADVERSARIAL[kind]:
        text = (unit * (200_000 // len(unit) + 1))[:200_000]
        started = time.process_time()
        scrub(text)
        assert time.process_time() - started < 1.0, unit


def test_the_ipv6_pattern_is_the_ipv6_grammar():
    """IPV6 accepts exactly what `ipaddress` accepts (among runs of hex digits and colons holding a digit)."""
    import ipaddress
    import random

    from rlhf.scrub import IPV6

    def reference(text: str) -> bool:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return any(c.isdigit() for c in text)

    rng = random.Random(0)
    groups = ["", "", "1", "ab", "0db8", "ffff", "12345", "a", "fe"]
    for _ in range(20_000):
        text = ":".join(rng.choice(groups) for _ in range(rng.randint(1, 11)))
        text = text.replace(":", "::", 1) if rng.random() < 0.3 else text
        assert (IPV6.fullmatch(text) is not None) == reference(text), text
