"""Campaigns: pairs in, queues out, votes back.

A campaign is a batch of pairs from a comparisons file, plus expert-labelled gold pairs. Each
annotator's queue is built one item at a time, when they ask for the next pair:
- a real pair still short of `overlap` live assignments is claimed (an atomic conditional UPDATE,
  so concurrent annotators never push a pair past its overlap);
- in each block of round(1 / gold_rate) items, one item at a seeded random position is a gold pair
  the annotator has not seen, so gold arrives at the configured rate and its place cannot be guessed;
- left/right order is drawn per assignment and stored, and votes are turned back into the pair's
  own a/b orientation before they are stored.
Each vote is committed in its own transaction; a second submit of the same item changes nothing.
Skipping is the same for gold and real pairs as the annotator sees it: the same answer, the same next
item (queue positions count skipped items either way) and the same database work.
"""
from __future__ import annotations

import random
import re
import secrets
from datetime import datetime

import pandas as pd
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.comparisons import CHOICES
from rlhf.labeling.aggregate import SKIP
from rlhf.labeling.db import Annotator, Assignment, Campaign, GoldAnswer, Pair, Vote, utc_now

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIN_OVERLAP = 3  # the design asks for at least three judgements per pair
MAX_GOLD_RATE = 0.5  # above this annotators spend more time on gold than on the campaign
MAX_REASON_CHARS = 2000
# what the annotator clicks -> the choice in shown orientation; 'A' is the left response
SHOWN_CHOICES = ("A", "B", "tie", "both_bad", "skip")


class CampaignError(ValueError):
    """A campaign request that cannot be honoured; the message says why and what to do."""


def create_campaign(db: Session, name: str, pairs: pd.DataFrame, gold: pd.DataFrame | None = None, *,
                    overlap: int = MIN_OVERLAP, gold_rate: float = 0.1, seed: int | None = None) -> Campaign:
    """Store a campaign: `pairs` are comparison rows (their `chosen` is ignored), `gold` rows carry the expert
    answer in `chosen`. Commits."""
    gold = gold if gold is not None else pairs.iloc[0:0]
    _check_campaign(db, name, pairs, gold, overlap, gold_rate)
    campaign = Campaign(name=name, overlap=overlap, gold_rate=gold_rate,
                        seed=seed if seed is not None else secrets.randbelow(2**31))
    db.add(campaign)
    db.flush()
    for row in pairs.itertuples(index=False):
        db.add(_pair(campaign, row, is_gold=False))
    for row in gold.itertuples(index=False):
        pair = _pair(campaign, row, is_gold=True)
        db.add(pair)
        db.flush()
        db.add(GoldAnswer(pair_id=pair.id, chosen=row.chosen))
    db.commit()
    return campaign


def _pair(campaign: Campaign, row, is_gold: bool) -> Pair:
    policy_version = row.policy_version if isinstance(row.policy_version, str) else None
    return Pair(campaign_id=campaign.id, pair_id=str(row.pair_id), prompt=row.prompt, response_a=row.response_a,
                response_b=row.response_b, policy_version=policy_version, is_gold=is_gold, claims=0)


def _check_campaign(db: Session, name: str, pairs: pd.DataFrame, gold: pd.DataFrame, overlap: int,
                    gold_rate: float) -> None:
    if not NAME_PATTERN.match(name):
        raise CampaignError(
            f"campaign name {name!r} is not allowed. It becomes the export's source 'human:{name}' and part of "
            "URLs, so it is 1-64 lowercase letters, digits, '_' or '-'. Pick a name like 'pairs-2026-11'."
        )
    if db.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
        raise CampaignError(
            f"a campaign named {name!r} already exists. Campaign names are the export's source, so they are "
            "unique. Pick another name."
        )
    if overlap < MIN_OVERLAP:
        raise CampaignError(
            f"overlap is {overlap}. Each pair needs at least {MIN_OVERLAP} distinct annotators for a majority "
            f"that one careless vote cannot decide. Pass overlap >= {MIN_OVERLAP}."
        )
    if not 0 <= gold_rate <= MAX_GOLD_RATE:
        raise CampaignError(
            f"gold_rate is {gold_rate}. It is the share of each queue spent on gold pairs, so it must lie in "
            f"[0, {MAX_GOLD_RATE}]; 0.1 is usual. Pass a value in that range."
        )
    if len(pairs) == 0:
        raise CampaignError("the comparisons file has no rows. A campaign needs pairs to label; check the file.")
    if gold_rate > 0 and len(gold) == 0:
        raise CampaignError(
            f"gold_rate is {gold_rate} but no gold pairs were given. Gold pairs are what annotators are scored "
            "on. Pass a gold comparisons file (rows with `chosen` set by an expert), or gold_rate 0."
        )
    bad_gold = gold[~gold["chosen"].isin(CHOICES)]
    if len(bad_gold):
        raise CampaignError(
            f"{len(bad_gold)} gold row(s) have no expert answer, e.g. pair {bad_gold['pair_id'].iloc[0]!r} with "
            f"chosen={bad_gold['chosen'].iloc[0]!r}. A gold pair is scored against its answer, so `chosen` must be "
            f"one of {CHOICES}. Fill it in or drop the row."
        )
    ids = pd.concat([pairs["pair_id"], gold["pair_id"]])
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise CampaignError(
            f"pair_id {duplicated.iloc[0]!r} appears more than once across the pairs and gold files. Votes are "
            "tied to a pair by its id, so ids must be unique. Deduplicate the files."
        )


def find_campaign(db: Session, name: str) -> Campaign | None:
    return db.scalar(select(Campaign).where(Campaign.name == name))


def is_gold_turn(seed: int, annotator_id: int, position: int, gold_rate: float) -> bool:
    """One gold slot per block of round(1/gold_rate) queue positions, at a seeded random place in the block."""
    if gold_rate <= 0:
        return False
    block = max(1, round(1 / gold_rate))
    slot = random.Random(f"{seed}:{annotator_id}:{position // block}").randrange(block)
    return position % block == slot


def choice_in_pair_orientation(shown: str, swapped: bool) -> str:
    """What the annotator clicked ('A' = left) -> the pair's own choice ('a' = response_a)."""
    if shown not in SHOWN_CHOICES:
        raise CampaignError(f"choice {shown!r} is unknown. The page sends one of {SHOWN_CHOICES}; reload it.")
    sides = {"A": "b" if swapped else "a", "B": "a" if swapped else "b"}
    return sides.get(shown, shown)


def shown_responses(assignment: Assignment) -> tuple[str, str]:
    """(left, right) as this annotator sees them."""
    pair = assignment.pair
    return (pair.response_b, pair.response_a) if assignment.swapped else (pair.response_a, pair.response_b)


def pending_assignment(db: Session, campaign: Campaign, annotator: Annotator) -> Assignment | None:
    """The oldest item in the annotator's queue that has no vote yet."""
    return db.scalar(
        select(Assignment)
        .outerjoin(Vote, Vote.assignment_id == Assignment.id)
        .where(Assignment.campaign_id == campaign.id, Assignment.annotator_id == annotator.id, Vote.id.is_(None))
        .order_by(Assignment.position)
        .limit(1)
    )


def next_assignment(db: Session, campaign: Campaign, annotator: Annotator) -> Assignment | None:
    """The annotator's current item: the pending one, else a newly queued pair; None when nothing is left.

    A new item is committed before it is returned. Two requests racing for the same annotator (two tabs)
    meet the unique (annotator, campaign, position) constraint; the loser takes the winner's item.
    """
    pending = pending_assignment(db, campaign, annotator)
    if pending is not None:
        return pending
    try:
        return _queue_next_pair(db, campaign, annotator)
    except IntegrityError:
        db.rollback()
        return pending_assignment(db, campaign, annotator)


def _queue_next_pair(db: Session, campaign: Campaign, annotator: Annotator) -> Assignment | None:
    position = db.scalar(select(func.count()).select_from(Assignment).where(
        Assignment.campaign_id == campaign.id, Assignment.annotator_id == annotator.id))
    rng = random.Random(f"{campaign.seed}:{annotator.id}:{position}:order")
    pair = None
    # gold only while real work remains, so the end of a queue is never a run of gold
    if _real_pair_available(db, campaign, annotator) and is_gold_turn(campaign.seed, annotator.id, position,
                                                                     campaign.gold_rate):
        pair = _unseen_gold_pair(db, campaign, annotator, rng)
    if pair is None:
        pair = _claim_real_pair(db, campaign, annotator)
    if pair is None:
        db.rollback()
        return None
    assignment = Assignment(campaign_id=campaign.id, pair_id=pair.id, annotator_id=annotator.id, position=position,
                            swapped=rng.random() < 0.5, created_at=utc_now())
    db.add(assignment)
    db.commit()
    return assignment


def _seen_pairs(campaign: Campaign, annotator: Annotator):
    return select(Assignment.pair_id).where(Assignment.campaign_id == campaign.id,
                                            Assignment.annotator_id == annotator.id)


def _claimable(campaign: Campaign, annotator: Annotator):
    return (select(Pair.id)
            .where(Pair.campaign_id == campaign.id, Pair.is_gold.is_(False), Pair.claims < campaign.overlap,
                   Pair.id.not_in(_seen_pairs(campaign, annotator)))
            # nearly-complete pairs first: finished pairs are usable before the campaign ends
            .order_by(Pair.claims.desc(), Pair.id)
            .limit(1))


def _real_pair_available(db: Session, campaign: Campaign, annotator: Annotator) -> bool:
    return db.scalar(_claimable(campaign, annotator)) is not None


def _claim_real_pair(db: Session, campaign: Campaign, annotator: Annotator) -> Pair | None:
    # Each failed claim means another annotator filled that pair, so the loop ends: pairs only fill up.
    while (pair_id := db.scalar(_claimable(campaign, annotator))) is not None:
        claimed = db.execute(update(Pair).where(Pair.id == pair_id, Pair.claims < campaign.overlap)
                             .values(claims=Pair.claims + 1)).rowcount
        if claimed:
            return db.get(Pair, pair_id)
    return None


def _unseen_gold_pair(db: Session, campaign: Campaign, annotator: Annotator, rng: random.Random) -> Pair | None:
    ids = db.scalars(select(Pair.id).where(Pair.campaign_id == campaign.id, Pair.is_gold.is_(True),
                                           Pair.id.not_in(_seen_pairs(campaign, annotator)))
                     .order_by(Pair.id)).all()
    return db.get(Pair, rng.choice(ids)) if ids else None


def record_vote(db: Session, assignment: Assignment, shown: str, reason: str | None,
                now: datetime | None = None) -> bool:
    """Store the annotator's vote on their own item and commit. Returns False, changing nothing,
    when the item already has a vote (a double submit, a retry after a lost response)."""
    choice = choice_in_pair_orientation(shown, assignment.swapped)
    reason = (reason or "").strip()[:MAX_REASON_CHARS] or None
    if db.scalar(select(Vote.id).where(Vote.assignment_id == assignment.id)) is not None:
        db.rollback()
        return False
    db.add(Vote(assignment_id=assignment.id, pair_id=assignment.pair_id, annotator_id=assignment.annotator_id,
                choice=choice, reason=reason, created_at=now or utc_now()))
    if choice == SKIP:
        # A skip gives a real pair's slot back, so another annotator completes its overlap. Gold pairs are
        # never claimed, so the WHERE leaves them alone; the same statement runs for both, so a skip costs
        # the same work (and time) on gold as on real pairs.
        db.execute(update(Pair).where(Pair.id == assignment.pair_id, Pair.is_gold.is_(False))
                   .values(claims=Pair.claims - 1))
    try:
        db.commit()
    except IntegrityError:  # the same item submitted concurrently: the other request stored it
        db.rollback()
        return False
    return True


def judged_count(db: Session, campaign: Campaign, annotator: Annotator) -> int:
    return db.scalar(select(func.count()).select_from(Vote).join(Assignment, Vote.assignment_id == Assignment.id)
                     .where(Assignment.campaign_id == campaign.id, Vote.annotator_id == annotator.id))
