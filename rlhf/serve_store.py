"""The model server's feedback store: its tables, and the reads the refeed stage turns into cycle inputs.

The server (`rlhf/serve.py`) writes one `ServedCompletion` per request, with its choices and the registry
version of the model that wrote them, and one `Feedback` row per thumbs or pairwise judgement. The tables
live in the labeling app's database layer (same `Base`, engine and Alembic chain; SQLite file by default,
PostgreSQL by URL). The store keeps what users sent, unscrubbed, so that it can be audited and re-scrubbed;
everything that leaves it for training goes through `rlhf.scrub.scrub` first.

Reads for the next cycle (the refeed stage, `rlhf/refeed.py`, snapshots both):
- `served_prompts(database_url, since)`: single-turn user prompts, scrubbed, deduplicated;
- `feedback_comparisons(database_url)`: user judgements as rows of the comparison schema
  (`rlhf/comparisons.py`) with source 'feedback:<model name>/<version>'.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from rlhf.comparisons import COLUMNS, empty_comparisons
from rlhf.labeling.db import MIGRATIONS, Base, UtcDateTime, make_engine, reader, upgrade_database, utc_now
from rlhf.scrub import scrub

# -- tables (created by migrations/versions/0002_served_feedback.py) ---------------------------------------


class ServedCompletion(Base):
    """One answered /v1/chat/completions request: what was asked, with which settings, by which model."""

    __tablename__ = "served_completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # 'chatcmpl-<32 hex>', returned to the client
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64), index=True)  # registry version that wrote every choice
    messages: Mapped[str] = mapped_column(Text)  # the request's messages as JSON, as received
    prompt: Mapped[str] = mapped_column(Text)  # the last user message
    single_turn: Mapped[bool] = mapped_column(Boolean)  # one user message (and maybe a system one): the prompt stands alone
    temperature: Mapped[float] = mapped_column(Float)
    top_p: Mapped[float] = mapped_column(Float)
    max_tokens: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    api_key_id: Mapped[str] = mapped_column(String(16))  # sha256 prefix of the caller's key, never the key
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now, index=True)
    choices: Mapped[list[ServedChoice]] = relationship(order_by="ServedChoice.index", lazy="selectin")


class ServedChoice(Base):
    """One sampled response of a completion (n=2 gives two)."""

    __tablename__ = "served_choices"
    completion_id: Mapped[str] = mapped_column(ForeignKey("served_completions.id", ondelete="CASCADE"),
                                               primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))  # 'stop' | 'length'
    completion_tokens: Mapped[int] = mapped_column(Integer)


class Feedback(Base):
    """A user's judgement of a completion: thumbs on one choice, or which of two choices is better."""

    __tablename__ = "served_feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("served_completions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # 'thumbs' | 'pairwise'
    choice_index: Mapped[int | None] = mapped_column(Integer)  # thumbs: the choice rated
    rating: Mapped[str | None] = mapped_column(String(8))  # thumbs: 'up' | 'down'
    preferred: Mapped[str | None] = mapped_column(String(8))  # pairwise: 'a' (choice 0) | 'b' (choice 1) | 'tie'
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now, index=True)


def open_store(database_url: str, must_exist: bool = False):
    """An engine on the store, migrated to the latest schema. must_exist: refuse to create a new SQLite file.

    With must_exist (the refeed's reads) a store already at the latest schema is not touched: checking takes
    a read snapshot, where a migration would take the write lock that the server's completions need."""
    url = make_url(database_url)
    if must_exist and url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise FileNotFoundError(
            f"no feedback store at {url.database}. The model server creates it when it starts (`rlhf serve`, "
            "setting serve.database); point the refeed at the same database URL."
        )
    engine = make_engine(database_url)
    if not (must_exist and _at_latest_schema(engine)):
        upgrade_database(engine)
    return engine


def _at_latest_schema(engine) -> bool:
    with reader(engine).connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current == set(ScriptDirectory(str(MIGRATIONS)).get_heads())


def store_exists(database_url: str) -> bool:
    url = make_url(database_url)
    return url.get_backend_name() != "sqlite" or bool(url.database and Path(url.database).exists())


# -- reads for the refeed ------------------------------------------------------------------------------------
# Each read takes a snapshot of the rows it needs in one read-only transaction (`reader`: on SQLite a DEFERRED
# one that never holds the write lock, so the server's completions do not wait on it), closes it, and only then
# scrubs: the scrubber's CPU time is spent outside any transaction. Text longer than `max_chars`
# (serve.scrub_max_chars) is not scrubbed and is left out of what the refeed hands on, and counted.


# the served-prompts snapshot; typed, so an empty snapshot has the same columns and types as a full one
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),  # '<model name>/<version>' of the first request
    pa.field("first_seen", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("times_served", pa.int64(), nullable=False),
    pa.field("pii", pa.string(), nullable=False),  # kinds scrubbed, comma-separated; '' for none
    pa.field("api_key_id", pa.string(), nullable=False),  # the caller of the first request (collect caps each key's share)
])


def _normalised(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def _as_utc(since: datetime | str | None) -> datetime | None:
    if since is None or since == "":
        return None
    moment = datetime.fromisoformat(since) if isinstance(since, str) else since
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def served_prompts(database_url: str, max_chars: int, since: datetime | str | None = None) -> tuple[pd.DataFrame, int]:
    """Prompts users sent to the server since `since` (ISO time or datetime; None: all), scrubbed and deduplicated,
    and how many were longer than `max_chars` and left out.

    Only single-turn requests count: a later turn ('yes, do that') means nothing without its conversation.
    Duplicates are found after scrubbing, ignoring case and whitespace; the first one seen is kept.
    Columns: prompt, model_version (of the first request), first_seen, times_served, pii (kinds scrubbed),
    api_key_id (of the first request).
    """
    moment = _as_utc(since)
    query = select(ServedCompletion.prompt, ServedCompletion.model_name, ServedCompletion.model_version,
                   ServedCompletion.created_at, ServedCompletion.api_key_id).where(
        ServedCompletion.single_turn.is_(True)).order_by(ServedCompletion.created_at, ServedCompletion.id)
    if moment is not None:
        query = query.where(ServedCompletion.created_at >= moment)
    engine = open_store(database_url, must_exist=True)
    with Session(reader(engine)) as db:
        served = db.execute(query).all()
    engine.dispose()
    rows: dict[str, dict] = {}
    too_long = 0
    for text, model_name, model_version, created_at, key_id in served:
        text = text.strip()
        if len(text) > max_chars:
            too_long += 1
            continue
        prompt, kinds = scrub(text)
        if not prompt:
            continue
        key = _normalised(prompt)
        if key in rows:
            rows[key]["times_served"] += 1
            continue
        rows[key] = {"prompt": prompt, "model_version": f"{model_name}/{model_version}", "first_seen": created_at,
                     "times_served": 1, "pii": ",".join(kinds), "api_key_id": key_id}
    frame = PROMPT_SCHEMA.empty_table().to_pandas() if not rows else pd.DataFrame(
        list(rows.values()), columns=PROMPT_SCHEMA.names).astype({"times_served": "int64"})
    return frame, too_long


def feedback_comparisons(database_url: str, max_chars: int) -> tuple[pd.DataFrame, int]:
    """User feedback as comparison rows (scrubbed), source 'feedback:<model name>/<version>', and how many rows were
    left out because their prompt or a response is longer than `max_chars`.

    - pairwise: the latest 'which is better' on an n=2 completion gives one row (a = choice 0);
    - thumbs: a thumbs-up response and a thumbs-down response to the same single-turn prompt from the same
      model version give one row (the two choices of an n=2 completion, or two requests). The latest rating
      of each response counts; completions with a pairwise judgement are left to it. Which side the preferred
      response sits on follows a hash of the pair id, so `chosen` is not always 'a'.
    A thumbs rating with no opposite rating to pair with stays in the store and makes no row.
    """
    engine = open_store(database_url, must_exist=True)
    with Session(reader(engine)) as db:
        ratings = db.scalars(select(Feedback).order_by(Feedback.created_at, Feedback.id)).all()
        rated = {item.completion_id for item in ratings}
        # their choices come in the same snapshot (the relationship loads eagerly, `lazy="selectin"`)
        completions = {c.id: c for c in db.scalars(select(ServedCompletion).where(ServedCompletion.id.in_(rated)))}
    engine.dispose()
    latest_pairwise: dict[str, Feedback] = {}
    latest_thumbs: dict[tuple[str, int], Feedback] = {}
    for item in ratings:
        if item.kind == "pairwise":
            latest_pairwise[item.completion_id] = item
        else:
            latest_thumbs[(item.completion_id, item.choice_index)] = item
    pairs: list[tuple[str, ServedCompletion, str, str, str, datetime]] = []
    for completion_id, item in latest_pairwise.items():
        completion = completions[completion_id]
        first, second = completion.choices[0].text, completion.choices[1].text
        pairs.append((f"feedback-{completion_id}", completion, first, second, item.preferred, item.created_at))
    # thumbs: group the rated responses by (model version, prompt), then pair ups with downs in time order
    groups: dict[tuple[str, str, str], dict[str, list]] = {}
    for (completion_id, index), item in sorted(latest_thumbs.items(), key=lambda kv: (kv[1].created_at, kv[1].id)):
        completion = completions[completion_id]
        if completion_id in latest_pairwise or not completion.single_turn:
            continue
        key = (completion.model_name, completion.model_version, _normalised(completion.prompt))
        groups.setdefault(key, {"up": [], "down": []})[item.rating].append((completion, index, item))
    for group in groups.values():
        for (good, gi, good_item), (bad, bi, bad_item) in zip(group["up"], group["down"]):
            pair_id = f"feedback-{good.id}.{gi}-{bad.id}.{bi}"
            good_text, bad_text = good.choices[gi].text, bad.choices[bi].text
            swap = int(hashlib.sha256(pair_id.encode()).hexdigest(), 16) % 2 == 1
            a, b, chosen = (bad_text, good_text, "b") if swap else (good_text, bad_text, "a")
            pairs.append((pair_id, good, a, b, chosen, max(good_item.created_at, bad_item.created_at)))
    rows = []
    for pair_id, completion, response_a, response_b, chosen, created_at in pairs:
        if max(len(completion.prompt), len(response_a), len(response_b)) > max_chars:
            continue
        version = f"{completion.model_name}/{completion.model_version}"
        rows.append({"pair_id": pair_id, "prompt": scrub(completion.prompt)[0], "response_a": scrub(response_a)[0],
                     "response_b": scrub(response_b)[0], "chosen": chosen, "source": f"feedback:{version}",
                     "policy_version": version, "votes": 1, "agreement": None, "created_at": created_at})
    too_long = len(pairs) - len(rows)
    if not rows:
        return empty_comparisons(), too_long
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"votes": "int32"}), too_long
