"""A campaign's results: its votes read from the database, aggregated, and exported as comparisons.

Export rule (one row per non-gold pair whose weighted majority is 'a', 'b' or 'tie'):
- chosen is the majority in the pair's original a/b orientation; votes counts the votes that
  counted (weight > 0); agreement is the weighted share of them agreeing with chosen;
- source is 'human:<campaign>', created_at the time of the last vote on the pair;
- gold pairs are never exported;
- left out, each with its reason: 'too_few_votes' (fewer counted votes than the campaign's
  overlap), 'split' (no single top choice) and 'both_bad' (a majority saying neither response
  is acceptable: there is no preferred response to learn from).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.comparisons import COLUMNS, CHOICES
from rlhf.labeling.aggregate import CampaignFigures, QualityPolicy, Vote as CastVote, campaign_figures
from rlhf.labeling.db import Annotator, Campaign, GoldAnswer, Pair, Vote, utc_now

LEFT_OUT_COLUMNS = ["pair_id", "reason", "votes"]


@dataclass(frozen=True)
class Progress:
    real_pairs: int
    gold_pairs: int
    votes: int  # every stored vote, skips and gold included
    complete_pairs: int  # real pairs with at least `overlap` non-skip votes
    votes_last_hour: int
    first_vote: datetime | None
    last_vote: datetime | None

    @property
    def share_complete(self) -> float:
        return self.complete_pairs / self.real_pairs if self.real_pairs else 0.0

    @property
    def votes_per_hour(self) -> float | None:
        """Average throughput between the first and the last vote."""
        if self.first_vote is None or self.last_vote == self.first_vote:
            return None
        return self.votes / ((self.last_vote - self.first_vote).total_seconds() / 3600)


def campaign_votes(db: Session, campaign: Campaign) -> list[CastVote]:
    rows = db.execute(
        select(Pair.pair_id, Annotator.name, Vote.choice)
        .join(Pair, Vote.pair_id == Pair.id).join(Annotator, Vote.annotator_id == Annotator.id)
        .where(Pair.campaign_id == campaign.id)
        .order_by(Vote.id)
    )
    return [CastVote(pair_id, annotator, choice) for pair_id, annotator, choice in rows]


def gold_answers(db: Session, campaign: Campaign) -> dict[str, str]:
    rows = db.execute(select(Pair.pair_id, GoldAnswer.chosen).join(GoldAnswer, GoldAnswer.pair_id == Pair.id)
                      .where(Pair.campaign_id == campaign.id))
    return dict(rows.all())


def real_pair_ids(db: Session, campaign: Campaign) -> list[str]:
    return list(db.scalars(select(Pair.pair_id).where(Pair.campaign_id == campaign.id, Pair.is_gold.is_(False))
                           .order_by(Pair.id)))


def figures(db: Session, campaign: Campaign, policy: QualityPolicy) -> CampaignFigures:
    return campaign_figures(campaign_votes(db, campaign), gold_answers(db, campaign), real_pair_ids(db, campaign),
                            policy, min_votes=campaign.overlap)


def progress(db: Session, campaign: Campaign, now: datetime | None = None) -> Progress:
    now = now or utc_now()
    pair_counts = dict(db.execute(select(Pair.is_gold, func.count()).where(Pair.campaign_id == campaign.id)
                                  .group_by(Pair.is_gold)).all())
    in_campaign = Vote.pair_id.in_(select(Pair.id).where(Pair.campaign_id == campaign.id))
    votes, first, last = db.execute(select(func.count(Vote.id), func.min(Vote.created_at), func.max(Vote.created_at))
                                    .where(in_campaign)).one()
    recent = db.scalar(select(func.count(Vote.id)).where(in_campaign, Vote.created_at > now - timedelta(hours=1)))
    per_pair = (select(Vote.pair_id).join(Pair, Vote.pair_id == Pair.id)
                .where(Pair.campaign_id == campaign.id, Pair.is_gold.is_(False), Vote.choice != "skip")
                .group_by(Vote.pair_id).having(func.count(Vote.id) >= campaign.overlap).subquery())
    complete = db.scalar(select(func.count()).select_from(per_pair))
    return Progress(real_pairs=pair_counts.get(False, 0), gold_pairs=pair_counts.get(True, 0), votes=votes,
                    complete_pairs=complete, votes_last_hour=recent,
                    first_vote=_as_utc(first), last_vote=_as_utc(last))


def _as_utc(value: datetime | None) -> datetime | None:
    # min()/max() come back through the raw column type, without UtcDateTime's conversion
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=utc_now().tzinfo)


def export_comparisons(db: Session, campaign: Campaign, policy: QualityPolicy) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows in the comparison schema, left-out pairs with their reason); see the module docstring."""
    outcomes = figures(db, campaign, policy).outcomes
    last_vote = dict(db.execute(select(Pair.pair_id, func.max(Vote.created_at)).join(Pair, Vote.pair_id == Pair.id)
                                .where(Pair.campaign_id == campaign.id).group_by(Pair.pair_id)).all())
    pairs = db.scalars(select(Pair).where(Pair.campaign_id == campaign.id, Pair.is_gold.is_(False))
                       .order_by(Pair.id)).all()
    rows, left_out = [], []
    for pair in pairs:
        outcome = outcomes[pair.pair_id]
        if outcome.status != "majority" or outcome.choice not in CHOICES:
            reason = outcome.status if outcome.status != "majority" else outcome.choice
            left_out.append({"pair_id": pair.pair_id, "reason": reason, "votes": outcome.votes})
            continue
        rows.append({
            "pair_id": pair.pair_id, "prompt": pair.prompt, "response_a": pair.response_a,
            "response_b": pair.response_b, "chosen": outcome.choice, "source": f"human:{campaign.name}",
            "policy_version": pair.policy_version, "votes": outcome.votes, "agreement": outcome.agreement,
            "created_at": _as_utc(last_vote[pair.pair_id]),
        })
    exported = pd.DataFrame(rows, columns=list(COLUMNS))
    exported["created_at"] = pd.to_datetime(exported["created_at"], utc=True)
    return exported, pd.DataFrame(left_out, columns=LEFT_OUT_COLUMNS)
