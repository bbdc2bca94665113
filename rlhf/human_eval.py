"""The `human` judge: a blind side-by-side campaign in the labeling app, and the win-rate people give (not a stage).

The evaluate stage opens the campaign (`evaluation_pairs`, `gold_pairs`, `open_campaign`); people vote in the app
(`rlhf label serve`); the gate reads it back (`read_campaign`, `human_figures`) once every pair has its votes
(`rlhf gate`, flows/human_gate.py).

- One campaign per challenger and opponent, named `human-<12 hex digits of the challenger's DVC hash>-vs-<sft|vN>`
  (N: the champion's registry version). A rerun of evaluate finds it and adds nothing: its pairs and the votes
  already cast are kept, whatever evaluate's sampling settings have become.
- Pair i is held-out prompt i with the challenger's response and the opponent's, the challenger on side a or b by
  a seeded coin. Which side is whose is stored with the pair (its `policy_version`, e.g.
  'a=champion:v3,b=challenger', which no annotator page shows) and in reports/evaluate/human_campaign.json. The
  app then shows each annotator the two sides in an order of its own, so nobody learns where the challenger is.
- Gold: a correct and a wrong answer to a held-out verifiable task, the verifier's verdict as the expert answer
  (rlhf.verifiers.judge_pair), so annotators are calibrated without hand-made gold.
- A pair's verdict is the app's own aggregation (rlhf.labeling.results.figures): gold accuracy per annotator,
  annotators below the threshold flagged and their votes left out, then the majority of the votes that count.
  Majority on the challenger's side: a win; on the opponent's: a loss; 'tie', 'both_bad' and a split: a tie (no
  preference, counted half, as an AI judge's inconsistent verdict is). A pair left with fewer counted votes than
  the campaign's overlap (a flagged annotator's votes removed) has no verdict: it is left out and counted.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from rlhf.labeling.aggregate import SKIP, CampaignFigures, GoldScore, Outcome, QualityPolicy
from rlhf.labeling.campaigns import create_campaign, find_campaign
from rlhf.labeling.db import Campaign, Pair, make_engine, reader, upgrade_database
from rlhf.labeling.results import campaign_votes, figures
from rlhf.stats import win_rate_figures
from rlhf.verifiers import Task, judge_pair, task_prompt

CHALLENGER = "challenger"
MIN_GOLD = QualityPolicy().gold_min_answers  # fewer gold pairs than this and nobody could ever be flagged


class HumanEvalError(ValueError):
    """A human evaluation that cannot go on; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# The campaign evaluate opens
# ------------------------------------------------------------------------------------------------

def campaign_name(challenger_hash: str, opponent: str, opponent_version: str | None) -> str:
    """`human-<12 hex of the challenger's DVC hash>-vs-<sft|vN>`: one campaign per challenger and opponent."""
    digest = challenger_hash.removesuffix(".dir")[:12].lower()
    return f"human-{digest}-vs-{'sft' if opponent == 'sft' else f'v{opponent_version}'}"


def sides_label(challenger_side: str, opponent_label: str) -> str:
    """Whose response is on which side of a pair: 'a=challenger,b=champion:v3'."""
    other = "b" if challenger_side == "a" else "a"
    return ",".join(f"{side}={who}" for side, who in sorted({challenger_side: CHALLENGER, other: opponent_label}.items()))


def challenger_side(label: str | None) -> str | None:
    """'a' or 'b' from a `sides_label`; None when the label is not one."""
    try:
        sides = dict(part.split("=", 1) for part in (label or "").split(","))
    except ValueError:
        return None
    found = [side for side, who in sides.items() if who == CHALLENGER]
    return found[0] if set(sides) == {"a", "b"} and len(found) == 1 else None


def evaluation_pairs(prompts: Sequence[str], challenger_texts: Sequence[str], opponent_texts: Sequence[str],
                     opponent_label: str, seed: int) -> pd.DataFrame:
    """One pair per prompt, the challenger's response on side a or b by a seeded coin (Random(seed), one draw a
    pair in order); rows as `create_campaign` takes them, the sides in `policy_version`."""
    if not len(prompts) == len(challenger_texts) == len(opponent_texts):
        raise ValueError(f"evaluation_pairs got {len(prompts)} prompts, {len(challenger_texts)} challenger and "
                         f"{len(opponent_texts)} opponent responses; it needs one of each per prompt.")
    coin, rows = random.Random(seed), []
    for i, (prompt, mine, theirs) in enumerate(zip(prompts, challenger_texts, opponent_texts)):
        side = "a" if coin.random() < 0.5 else "b"
        a, b = (mine, theirs) if side == "a" else (theirs, mine)
        rows.append({"pair_id": f"q{i:04d}", "prompt": prompt, "response_a": a, "response_b": b, "chosen": None,
                     "policy_version": sides_label(side, opponent_label)})
    return pd.DataFrame(rows)


def gold_count(pairs: int, gold_rate: float) -> int:
    # an annotator who takes every pair meets about pairs·r/(1−r) gold slots; one spare, and at least MIN_GOLD
    return max(MIN_GOLD, math.ceil(pairs * gold_rate / (1 - gold_rate)) + 1)


def wrong_answer(task: Task, others: Sequence[Task], rng: random.Random) -> str:
    """A plausible wrong answer: the right number moved by 1-3 (a numeric answer), else another task's answer."""
    try:
        return str(int(task.answer) + rng.choice((-3, -2, -1, 1, 2, 3)))
    except ValueError:
        return rng.choice([t.answer for t in others if t.answer != task.answer] or [f"not {task.answer}"])


def gold_pairs(tasks: Sequence[Task], instruction: str, count: int, seed: int) -> pd.DataFrame:
    """`count` gold pairs: the right and a wrong answer to held-out tasks, in a seeded order of sides; `chosen` is the
    verifier's verdict. A task whose wrong answer the verifier cannot tell from the right one is passed over."""
    rng, rows = random.Random(seed), []
    for task in tasks:
        if len(rows) == count:
            break
        right, wrong = task.answer, wrong_answer(task, tasks, rng)
        a, b = (right, wrong) if rng.random() < 0.5 else (wrong, right)
        verdict = judge_pair(task, a, b)
        if verdict != "tie":
            rows.append({"pair_id": f"gold-{len(rows):04d}", "prompt": task_prompt(task, instruction),
                         "response_a": a, "response_b": b, "chosen": verdict, "policy_version": "gold:verifier"})
    if len(rows) < count:
        raise HumanEvalError(
            f"only {len(rows)} of the {count} gold pairs the human campaign needs could be made from {len(tasks)} "
            "held-out tasks (a right and a wrong answer the verifier tells apart). Raise tasks.heldout_size, or lower "
            "evaluate.human_gold_rate or evaluate.human_prompts, and run `dvc repro evaluate` again.")
    return pd.DataFrame(rows)


def display_url(database: str) -> str:
    """The database URL without its password, for logs, tags and reports."""
    try:
        return make_url(database).render_as_string(hide_password=True)
    except ArgumentError:
        return database


def _engine(database: str, must_exist: bool) -> Engine:
    """A migrated engine on the labeling database; a missing SQLite file is an error when `must_exist`."""
    try:
        url = make_url(database)
    except ArgumentError:
        raise HumanEvalError(
            f"the labeling database URL {database!r} is not a database URL. It is evaluate.human_database in "
            "params.yaml (or `rlhf gate --db`): a SQLite file such as sqlite:///data/labeling/labeling.db or "
            "postgresql+psycopg://user@host/db. Fix it and run again.") from None
    if must_exist and url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise HumanEvalError(
            f"there is no labeling database at {url.database!r} (from {display_url(database)}, seen from "
            f"{Path.cwd()}). The human campaign lives in the database evaluate opened it in, evaluate.human_database "
            "at the time: run from the project folder (a relative SQLite path is read from the current folder), or "
            "pass that URL with `rlhf gate --db`.")
    try:
        engine = make_engine(database)
        upgrade_database(engine)
    except (SQLAlchemyError, ValueError) as error:
        raise HumanEvalError(
            f"the labeling database {display_url(database)} cannot be opened ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Start it or fix the URL (evaluate.human_database in params.yaml, or "
            "`rlhf gate --db`), and run again.") from None
    return engine


@dataclass(frozen=True)
class OpenedCampaign:
    name: str
    created: bool  # False: a rerun found it and left it as it was
    overlap: int
    gold_rate: float
    gold_pairs: int
    sides: dict[str, str]  # pair_id -> the challenger's side, 'a' | 'b'
    prompts: dict[str, str]  # pair_id -> prompt


def _stored_pairs(db: Session, campaign: Campaign, database: str) -> tuple[dict[str, str], dict[str, str], int]:
    rows = db.execute(select(Pair.pair_id, Pair.prompt, Pair.policy_version, Pair.is_gold)
                      .where(Pair.campaign_id == campaign.id).order_by(Pair.id)).all()
    real = [r for r in rows if not r.is_gold]
    sides = {r.pair_id: challenger_side(r.policy_version) for r in real}
    unmarked = [pair_id for pair_id, side in sides.items() if side is None]
    if unmarked or not real:
        raise HumanEvalError(
            f"the campaign {campaign.name!r} in {display_url(database)} was not opened by evaluate: "
            f"{'it has no pairs' if not real else f'pair {unmarked[0]!r} does not say which side is the challenger'}. "
            "Campaign names starting with 'human-' belong to evaluate's human judge; rename that campaign in the "
            "labeling app's database, or point evaluate.human_database at another database, and run again.")
    return sides, {r.pair_id: r.prompt for r in real}, len(rows) - len(real)


def open_campaign(database: str, name: str, pairs: pd.DataFrame, gold: pd.DataFrame, overlap: int,
                  gold_rate: float, seed: int) -> OpenedCampaign:
    """Create the campaign, or find the one a previous run created under the same name and leave it as it is."""
    engine = _engine(database, must_exist=False)
    try:
        with Session(engine, expire_on_commit=False) as db:
            campaign = find_campaign(db, name)
            created = campaign is None
            if created:
                campaign = create_campaign(db, name, pairs, gold, overlap=overlap, gold_rate=gold_rate, seed=seed)
            sides, prompts, golds = _stored_pairs(db, campaign, database)
            return OpenedCampaign(name, created, campaign.overlap, campaign.gold_rate, golds, sides, prompts)
    finally:
        engine.dispose()


def mapping_record(opened: OpenedCampaign, database: str, opponent: str, opponent_version: str | None,
                   challenger_hash: str) -> dict:
    """reports/evaluate/human_campaign.json: the campaign, where it lives, and whose response is on which side."""
    return {"campaign": opened.name, "database": display_url(database), "created_by_this_run": opened.created,
            "challenger_dvc_hash": challenger_hash, "opponent": opponent, "opponent_version": opponent_version,
            "annotators_per_pair": opened.overlap, "gold_rate": opened.gold_rate, "gold_pairs": opened.gold_pairs,
            "pairs": [{"pair_id": pair_id, "challenger_side": side, "prompt": opened.prompts[pair_id]}
                      for pair_id, side in opened.sides.items()]}


# ------------------------------------------------------------------------------------------------
# Reading it back
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CampaignReading:
    name: str
    overlap: int  # votes each pair needs
    sides: dict[str, str]  # pair_id -> the challenger's side
    votes: dict[str, int]  # pair_id -> votes cast on it (skips left out), gold pairs not included
    outcomes: dict[str, Outcome]  # pair_id -> the app's verdict
    gold: dict[str, GoldScore]  # annotator -> gold score
    flagged: frozenset[str]  # annotators whose votes do not count
    kappa: float | None

    @property
    def complete(self) -> bool:
        """Every pair has its `overlap` votes: people are done, and no more votes will come."""
        return all(self.votes[p] >= self.overlap for p in self.sides)

    @property
    def votes_so_far(self) -> int:
        return sum(min(self.votes[p], self.overlap) for p in self.sides)

    @property
    def votes_needed(self) -> int:
        return self.overlap * len(self.sides)

    def progress_line(self) -> str:
        done = sum(self.votes[p] >= self.overlap for p in self.sides)
        return (f"{self.votes_so_far} of {self.votes_needed} votes ({done} of {len(self.sides)} pairs complete, "
                f"{self.overlap} annotators each)")


def reading_from_votes(name: str, overlap: int, sides: Mapping[str, str], cast: Sequence,
                       result: CampaignFigures) -> CampaignReading:
    """The reading of a campaign from its votes (`rlhf.labeling.results.campaign_votes`) and the app's figures."""
    votes = {pair_id: 0 for pair_id in sides}
    for vote in cast:
        if vote.pair_id in votes and vote.choice != SKIP:
            votes[vote.pair_id] += 1
    return CampaignReading(name, overlap, dict(sides), votes, dict(result.outcomes), dict(result.gold),
                           result.flagged, result.kappa)


def read_campaign(database: str, name: str, policy: QualityPolicy) -> CampaignReading:
    """The campaign's votes and verdicts as the app aggregates them, read without making any vote wait."""
    engine = _engine(database, must_exist=True)
    try:
        with Session(reader(engine)) as db:
            campaign = find_campaign(db, name)
            if campaign is None:
                raise HumanEvalError(
                    f"there is no campaign {name!r} in the labeling database {display_url(database)}. evaluate "
                    "opened it in evaluate.human_database as it was then (the version's tag human.database says "
                    "where): pass that URL with `rlhf gate --db`. If the campaign was deleted, rerun "
                    "`dvc repro evaluate promote` to open a new one, or decide by hand with `rlhf promote`.")
            sides, _, _ = _stored_pairs(db, campaign, database)
            return reading_from_votes(name, campaign.overlap, sides, campaign_votes(db, campaign),
                                      figures(db, campaign, policy))
    finally:
        engine.dispose()


def pair_outcome(outcome: Outcome, side: str) -> str | None:
    """A pair's verdict as the challenger's 'win' | 'loss' | 'tie'; None when it has no verdict (too few votes count)."""
    if outcome.status == "too_few_votes":
        return None
    if outcome.status == "majority" and outcome.choice in ("a", "b"):
        return "win" if outcome.choice == side else "loss"
    return "tie"  # a 'tie' or 'both_bad' majority, or a split: no preference


def human_figures(outcomes: Mapping[str, Outcome], sides: Mapping[str, str], opponent: str,
                  confidence: float) -> dict:
    """The human judge's figures under the names every judge's have: `eval/human/win_rate_vs_<opponent>` (+ `_lower`,
    `_upper`), `eval/human/{wins,ties,losses,n}_vs_<opponent>`, and `eval/human/left_out_vs_<opponent>`, the pairs
    without a verdict. With no verdict at all there is no win-rate, and n is 0."""
    judged = [pair_outcome(outcomes[pair_id], side) for pair_id, side in sides.items()]
    decided = [o for o in judged if o is not None]
    metrics = {f"eval/human/left_out_vs_{opponent}": len(judged) - len(decided)}
    if not decided:
        return {**metrics, f"eval/human/n_vs_{opponent}": 0}
    for key, value in win_rate_figures(decided, confidence).items():
        suffix = key.removeprefix("win_rate")  # win_rate_lower -> win_rate_vs_<opponent>_lower, as every judge's
        name = f"win_rate_vs_{opponent}{suffix}" if key.startswith("win_rate") else f"{key}_vs_{opponent}"
        metrics[f"eval/human/{name}"] = value
    return metrics
