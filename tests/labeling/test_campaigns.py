"""Campaign queues and votes on a real SQLite file: overlap, gold interleaving, orientation, idempotence."""
from collections import Counter

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.labeling import accounts
from rlhf.labeling.campaigns import (CampaignError, choice_in_pair_orientation, create_campaign, is_gold_turn,
                                     next_assignment, record_vote, shown_responses)
from rlhf.labeling.db import Annotator, Assignment, Pair, Vote, make_engine, upgrade_database
from tests.labeling.support import honest_choice, pair_rows


@pytest.fixture
def db(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'labeling.db'}")
    upgrade_database(engine)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def annotator(db, name: str) -> Annotator:
    accounts.invite(db, name)
    return db.scalar(select(Annotator).where(Annotator.name == name))


def label_queue(db, campaign, person, decide=honest_choice) -> list[Assignment]:
    done = []
    while (item := next_assignment(db, campaign, person)) is not None:
        assert record_vote(db, item, decide(*shown_responses(item)), None)
        done.append(item)
    return done


def test_choice_orientation_undoes_the_swap():
    assert [choice_in_pair_orientation(c, False) for c in ("A", "B", "tie", "both_bad", "skip")] == \
        ["a", "b", "tie", "both_bad", "skip"]
    assert [choice_in_pair_orientation(c, True) for c in ("A", "B", "tie")] == ["b", "a", "tie"]
    with pytest.raises(CampaignError, match="unknown"):
        choice_in_pair_orientation("C", False)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_gold_turns_come_once_per_block_at_varying_places(rate):
    block = round(1 / rate)
    turns = [p for p in range(block * 40) if is_gold_turn(seed=7, annotator_id=3, position=p, gold_rate=rate)]
    assert [p // block for p in turns] == list(range(40))  # exactly one per block
    assert len({p % block for p in turns}) > 1  # not always the same slot
    assert not any(is_gold_turn(7, 3, p, 0.0) for p in range(50))


def test_each_pair_reaches_exactly_overlap_annotators(db):
    campaign = create_campaign(db, "overlap", pair_rows({f"p{i}": "a" for i in range(6)}), gold_rate=0.0, seed=1)
    people = [annotator(db, name) for name in ("ann", "bob", "cy", "dee")]
    for person in people:
        label_queue(db, campaign, person)
    per_pair = Counter(db.scalars(select(Vote.pair_id)))
    assert sorted(per_pair.values()) == [3] * 6
    assert sum(per_pair.values()) == 18  # the fourth annotator got only what others left


def test_a_skip_hands_the_pair_to_another_annotator(db):
    campaign = create_campaign(db, "skips", pair_rows({"p0": "a"}), gold_rate=0.0, seed=1)
    people = [annotator(db, name) for name in ("ann", "bob", "cy", "dee")]
    item = next_assignment(db, campaign, people[0])
    record_vote(db, item, "skip", None)
    assert next_assignment(db, campaign, people[0]) is None  # skipped pairs do not come back
    for person in people[1:]:
        label_queue(db, campaign, person)
    choices = db.scalars(select(Vote.choice).order_by(Vote.id)).all()
    assert choices[0] == "skip" and len(choices) == 4 and "skip" not in choices[1:]


def test_gold_is_interleaved_and_never_ends_a_queue(db):
    gold = pair_rows({f"g{i}": "b" for i in range(4)}, chosen_is_truth=True)
    campaign = create_campaign(db, "gold", pair_rows({f"p{i}": "a" for i in range(12)}), gold, gold_rate=0.25, seed=5)
    person = annotator(db, "ann")
    queue = [item.pair.is_gold for item in label_queue(db, campaign, person)]
    gold_positions = [position for position, is_gold in enumerate(queue) if is_gold]
    assert queue.count(False) == 12
    assert [p // 4 for p in gold_positions] == list(range(len(gold_positions)))  # one per block of 4
    assert len(gold_positions) >= 3
    assert queue[-1] is False  # no gold once the real pairs are done


def test_left_right_order_varies_and_votes_are_stored_in_pair_orientation(db):
    campaign = create_campaign(db, "swap", pair_rows({f"p{i}": "a" for i in range(20)}), gold_rate=0.0, seed=3)
    person = annotator(db, "ann")
    items = label_queue(db, campaign, person)  # honest: always clicks the GOOD side, which is response_a
    assert 0 < sum(item.swapped for item in items) < 20
    assert set(db.scalars(select(Vote.choice))) == {"a"}


def test_double_submit_keeps_the_first_vote(db):
    campaign = create_campaign(db, "double", pair_rows({"p0": "a", "p1": "b"}), gold_rate=0.0, seed=1)
    person = annotator(db, "ann")
    item = next_assignment(db, campaign, person)
    assert record_vote(db, item, "A", "first") is True
    assert record_vote(db, item, "B", "second") is False
    stored = db.scalars(select(Vote).where(Vote.assignment_id == item.id)).all()
    assert len(stored) == 1 and stored[0].reason == "first"
    assert db.scalar(select(Pair.claims).where(Pair.id == item.pair_id)) == 1


@pytest.mark.parametrize("change, message", [
    ({"overlap": 2}, "at least 3"),
    ({"gold_rate": 0.9}, "gold_rate"),
    ({"name": "Bad Name"}, "not allowed"),
    ({"gold_rate": 0.1, "gold": "unlabelled"}, "no expert answer"),
    ({"gold_rate": 0.1, "gold": None}, "no gold pairs"),
    ({"gold_rate": 0.1, "gold": "duplicate"}, "more than once"),
])
def test_campaign_errors_say_what_and_how_to_fix(db, change, message):
    pairs = pair_rows({"p0": "a"})
    golds = {"unlabelled": pair_rows({"g0": "a"}), "duplicate": pair_rows({"p0": "a"}, chosen_is_truth=True),
             None: None}
    args = {"name": "ok", "overlap": 3, "gold_rate": 0.0, **change}
    gold = golds[args.pop("gold", None)]
    with pytest.raises(CampaignError, match=message):
        create_campaign(db, args.pop("name"), pairs, gold, **args)
    assert db.scalar(select(func.count()).select_from(Pair)) == 0
