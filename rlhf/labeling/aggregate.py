"""From annotators' votes to labels and quality figures. Pure functions: no database, no web.

A vote is one annotator's judgement of one pair, already turned back into the pair's own
orientation ('a' means response_a, whatever side it was shown on). Skips are not votes.

The order of work for a campaign (`campaign_figures`):
1. gold accuracy per annotator, on the expert-labelled pairs;
2. annotators under the accuracy threshold are flagged, and their votes weigh
   `flagged_vote_weight` (0 excludes them, between 0 and 1 down-weights them);
3. a weighted majority vote per pair, with splits and too few votes as explicit outcomes;
4. Fleiss' kappa over the counted votes, and each annotator's agreement with the majority.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

VOTE_CHOICES = ("a", "b", "tie", "both_bad")  # what a counted vote can say
SKIP = "skip"  # recorded, so the pair leaves the annotator's queue, but never counted


@dataclass(frozen=True)
class Vote:
    pair_id: str
    annotator: str
    choice: str  # one of VOTE_CHOICES or SKIP, in the pair's own a/b orientation


@dataclass(frozen=True)
class Outcome:
    """The verdict on one pair."""

    status: Literal["majority", "split", "too_few_votes"]
    choice: str | None  # the majority choice when status is 'majority', else None
    votes: int  # votes that counted (weight > 0)
    agreement: float | None  # weighted share of the counted votes that agree with `choice`


@dataclass(frozen=True)
class GoldScore:
    answered: int  # gold pairs this annotator voted on (skips left out)
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


@dataclass(frozen=True)
class QualityPolicy:
    """How gold answers turn into trust in an annotator."""

    gold_accuracy_threshold: float = 0.7  # annotators below this gold accuracy are flagged
    gold_min_answers: int = 3  # no flag before this many gold answers: one miss out of one says little
    flagged_vote_weight: float = 0.0  # weight of a flagged annotator's votes: 0 excludes them, (0, 1) down-weights

    def __post_init__(self) -> None:
        if not 0 <= self.gold_accuracy_threshold <= 1:
            raise ValueError(
                f"gold_accuracy_threshold is {self.gold_accuracy_threshold}. It is a share of gold pairs answered "
                "correctly, so it must lie in [0, 1]; 0.7 is a usual start. Pass a value in that range."
            )
        if self.gold_min_answers < 1:
            raise ValueError(
                f"gold_min_answers is {self.gold_min_answers}. An annotator is judged on at least one gold answer, "
                "so it must be >= 1; 3 is a usual start. Pass a positive integer."
            )
        if not 0 <= self.flagged_vote_weight < 1:
            raise ValueError(
                f"flagged_vote_weight is {self.flagged_vote_weight}. It is the weight of a flagged annotator's votes "
                "against 1 for everyone else, so it must lie in [0, 1): 0 excludes them, 0.5 halves them. "
                "Pass a value in that range."
            )


@dataclass(frozen=True)
class CampaignFigures:
    outcomes: dict[str, Outcome]  # pair_id -> verdict, for every non-gold pair
    kappa: float | None  # Fleiss' kappa over counted votes; None when undefined
    gold: dict[str, GoldScore]  # annotator -> gold score
    flagged: frozenset[str]  # annotators under the gold-accuracy threshold
    weights: dict[str, float]  # annotator -> weight of their votes
    agreement: dict[str, float | None]  # annotator -> share of their votes that match the majority


def majority_vote(choices: Sequence[str], weights: Sequence[float], min_votes: int) -> Outcome:
    """Weighted majority: winner = argmax_c Σ_i w_i·[choice_i = c]; a tie for the top weight is a split.

    Votes with weight 0 do not count. With fewer than `min_votes` counted votes there is no verdict.
    """
    counted = [(choice, weight) for choice, weight in zip(choices, weights, strict=True) if weight > 0]
    if len(counted) < min_votes or not counted:
        return Outcome("too_few_votes", None, len(counted), None)
    totals: dict[str, float] = defaultdict(float)
    for choice, weight in counted:
        totals[choice] += weight
    best = max(totals.values())
    leaders = [choice for choice, total in totals.items() if math.isclose(total, best)]
    if len(leaders) > 1:
        return Outcome("split", None, len(counted), None)
    return Outcome("majority", leaders[0], len(counted), best / sum(totals.values()))


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' κ = (P̄ − P̄_e) / (1 − P̄_e) over items (rows) × categories (columns) of vote counts.

    P_i = (Σ_j n_ij² − n_i) / (n_i (n_i − 1)) is the agreement on item i, P̄ their mean;
    p_j = Σ_i n_ij / Σ_i n_i and P̄_e = Σ_j p_j². Items may have different numbers of raters
    (the usual generalisation); items with fewer than 2 carry no agreement and are left out.
    Returns None when κ is undefined: no item with 2 votes, or every vote in one category (P̄_e = 1).
    """
    rows = [row for row in counts if sum(row) >= 2]
    if not rows:
        return None
    per_item = [(sum(n * n for n in row) - sum(row)) / (sum(row) * (sum(row) - 1)) for row in rows]
    p_bar = sum(per_item) / len(per_item)
    total = sum(sum(row) for row in rows)
    shares = [sum(row[j] for row in rows) / total for j in range(len(rows[0]))]
    p_e = sum(p * p for p in shares)
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1 - p_e)


def category_counts(votes: Iterable[Vote]) -> list[list[int]]:
    """Votes -> one row of counts per pair, one column per VOTE_CHOICES entry (Fleiss' κ input)."""
    by_pair: dict[str, Counter] = defaultdict(Counter)
    for vote in votes:
        by_pair[vote.pair_id][vote.choice] += 1
    return [[counter[choice] for choice in VOTE_CHOICES] for counter in by_pair.values()]


def gold_scores(votes: Iterable[Vote], gold: Mapping[str, str]) -> dict[str, GoldScore]:
    """Per annotator: how many gold pairs they voted on and how many they got right."""
    answered: Counter = Counter()
    correct: Counter = Counter()
    for vote in votes:
        if vote.pair_id in gold and vote.choice != SKIP:
            answered[vote.annotator] += 1
            correct[vote.annotator] += vote.choice == gold[vote.pair_id]
    return {annotator: GoldScore(answered[annotator], correct[annotator]) for annotator in answered}


def is_flagged(score: GoldScore, policy: QualityPolicy) -> bool:
    """Flagged once they have answered enough gold and their accuracy is under the threshold."""
    return score.answered >= policy.gold_min_answers and score.accuracy < policy.gold_accuracy_threshold


def agreement_with_majority(votes: Iterable[Vote], outcomes: Mapping[str, Outcome]) -> dict[str, float | None]:
    """Per annotator: the share of their votes on pairs with a majority that match it (None: no such votes)."""
    matched: Counter = Counter()
    judged: Counter = Counter()
    annotators: set[str] = set()
    for vote in votes:
        annotators.add(vote.annotator)
        outcome = outcomes.get(vote.pair_id)
        if outcome is not None and outcome.status == "majority":
            judged[vote.annotator] += 1
            matched[vote.annotator] += vote.choice == outcome.choice
    return {a: (matched[a] / judged[a] if judged[a] else None) for a in sorted(annotators)}


def campaign_figures(votes: Sequence[Vote], gold: Mapping[str, str], pair_ids: Iterable[str],
                     policy: QualityPolicy, min_votes: int) -> CampaignFigures:
    """Everything the admin page and the export need, from a campaign's raw votes.

    `gold` maps the gold pairs' ids to their expert answer; `pair_ids` lists the non-gold pairs,
    so a pair nobody has voted on yet still gets its 'too_few_votes' outcome.
    """
    cast = [vote for vote in votes if vote.choice != SKIP]
    scores = gold_scores(cast, gold)
    flagged = frozenset(annotator for annotator, score in scores.items() if is_flagged(score, policy))
    annotators = {vote.annotator for vote in cast}
    weights = {a: (policy.flagged_vote_weight if a in flagged else 1.0) for a in sorted(annotators)}

    real = [vote for vote in cast if vote.pair_id not in gold]
    by_pair: dict[str, list[Vote]] = {pair_id: [] for pair_id in pair_ids}
    for vote in real:
        by_pair.setdefault(vote.pair_id, []).append(vote)
    outcomes = {
        pair_id: majority_vote([v.choice for v in pair_votes], [weights[v.annotator] for v in pair_votes], min_votes)
        for pair_id, pair_votes in by_pair.items()
    }
    counted = [vote for vote in real if weights[vote.annotator] > 0]
    return CampaignFigures(
        outcomes=outcomes,
        kappa=fleiss_kappa(category_counts(counted)),
        gold=scores,
        flagged=flagged,
        weights=weights,
        agreement=agreement_with_majority(real, outcomes),
    )
