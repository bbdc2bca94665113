"""The feedback store and the refeed: what the model server logged, turned back into cycle inputs.

The server (`rlhf/serve.py`) writes one `ServedCompletion` per request, with its choices and the registry
version of the model that wrote them, and one `Feedback` row per thumbs or pairwise judgement. The tables
live in the labeling app's database layer (same `Base`, engine and Alembic chain; SQLite file by default,
PostgreSQL by URL). The store keeps what users sent, unscrubbed, so that it can be audited and re-scrubbed;
everything that leaves it for training goes through `scrub` first.

Refeed, for the next cycle's collect stage:
- `served_prompts(database_url, since)`: single-turn user prompts, scrubbed, deduplicated;
- `feedback_comparisons(database_url)`: user judgements as rows of the comparison schema
  (`rlhf/comparisons.py`) with source 'feedback:<model name>/<version>'.
- `python -m rlhf.feedback` (a DVC stage, `always_changed`): both as Parquet snapshots under data/feedback/,
  so DVC reruns what reads them only when the served traffic brought something new.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from rlhf.comparisons import COLUMNS, empty_comparisons, write_comparisons
from rlhf.labeling.db import Base, UtcDateTime, make_engine, upgrade_database, utc_now

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
    """An engine on the store, migrated to the latest schema. must_exist: refuse to create a new SQLite file."""
    url = make_url(database_url)
    if must_exist and url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise FileNotFoundError(
            f"no feedback store at {url.database}. The model server creates it when it starts (`rlhf serve`, "
            "setting serve.database); point the refeed at the same database URL."
        )
    engine = make_engine(database_url)
    upgrade_database(engine)
    return engine


# -- scrubbing -----------------------------------------------------------------------------------------------
# What the scrubber replaces, in this order (earlier patterns win where two overlap):
#   [EMAIL]  name@host.tld
#   [CARD]   13 to 19 digits, optionally in groups split by single spaces or dashes (every card-like number,
#            Luhn-valid or not: a typo'd card number is still someone's card number)
#   [IP]     IPv4 dotted quads (each part 0-255) and IPv6 addresses that contain a digit (validated by
#            `ipaddress`, so 'std::vector' and '12:30:45' stay)
#   [PHONE]  a '+' country code followed by 6 to 14 digits in groups; or North-American style (555) 123-4567,
#            555-123-4567, 555.123.4567; or 2-5 / 3-4 / 3-4 digit groups split by dashes or dots (020-7946-0958).
#            Dates (2026-11-23), versions (1.2.3) and plain numbers stay.
# These are patterns, not a guarantee: names, street addresses and identifiers in free text pass through.
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6_CANDIDATE = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"  # international
    r"|(?<!\w)(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"  # North American
    r"|(?<![\w.-])\d{2,5}[.-]\d{3,4}[.-]\d{3,4}(?![\w.-]|\.\d)"  # grouped national numbers
)


def _ipv6(match: re.Match) -> str:
    text = match.group(0)
    if not any(c.isdigit() for c in text):
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[IP]"


def _phone(match: re.Match) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    return "[PHONE]" if 7 <= digits <= 15 else match.group(0)


def scrub(text: str) -> tuple[str, list[str]]:
    """Replace e-mail addresses, card-like numbers, IP addresses and phone numbers; return the text and the kinds found."""
    found = []
    for kind, pattern, replace in (("email", EMAIL, "[EMAIL]"), ("card", CARD, "[CARD]"), ("ip", IPV4, "[IP]"),
                                   ("ip", IPV6_CANDIDATE, _ipv6), ("phone", PHONE, _phone)):
        text, count = _sub_counting(pattern, replace, text)
        if count and kind not in found:
            found.append(kind)
    return text, found


def _sub_counting(pattern: re.Pattern, replace, text: str) -> tuple[str, int]:
    changed = 0

    def one(match: re.Match) -> str:
        nonlocal changed
        new = replace(match) if callable(replace) else replace
        changed += new != match.group(0)
        return new

    return pattern.sub(one, text), changed


# -- refeed --------------------------------------------------------------------------------------------------


# the served-prompts snapshot; typed, so an empty snapshot has the same columns and types as a full one
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),  # '<model name>/<version>' of the first request
    pa.field("first_seen", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("times_served", pa.int64(), nullable=False),
    pa.field("pii", pa.string(), nullable=False),  # kinds scrubbed, comma-separated; '' for none
])


def _normalised(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def _as_utc(since: datetime | str | None) -> datetime | None:
    if since is None or since == "":
        return None
    moment = datetime.fromisoformat(since) if isinstance(since, str) else since
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def served_prompts(database_url: str, since: datetime | str | None = None) -> pd.DataFrame:
    """Prompts users sent to the server since `since` (ISO time or datetime; None: all), scrubbed and deduplicated.

    Only single-turn requests count: a later turn ('yes, do that') means nothing without its conversation.
    Duplicates are found after scrubbing, ignoring case and whitespace; the first one seen is kept.
    Columns: prompt, model_version (of the first request), first_seen, times_served, pii (kinds scrubbed).
    """
    moment = _as_utc(since)
    query = select(ServedCompletion).where(ServedCompletion.single_turn.is_(True)).order_by(
        ServedCompletion.created_at, ServedCompletion.id)
    if moment is not None:
        query = query.where(ServedCompletion.created_at >= moment)
    rows: dict[str, dict] = {}
    engine = open_store(database_url, must_exist=True)
    with Session(engine) as db:
        for completion in db.scalars(query):
            prompt, kinds = scrub(completion.prompt.strip())
            if not prompt:
                continue
            key = _normalised(prompt)
            if key in rows:
                rows[key]["times_served"] += 1
                continue
            rows[key] = {"prompt": prompt, "model_version": f"{completion.model_name}/{completion.model_version}",
                         "first_seen": completion.created_at, "times_served": 1, "pii": ",".join(kinds)}
    engine.dispose()
    return PROMPT_SCHEMA.empty_table().to_pandas() if not rows else pd.DataFrame(
        list(rows.values()), columns=PROMPT_SCHEMA.names).astype({"times_served": "int64"})


def _comparison(pair_id: str, completion: ServedCompletion, response_a: str, response_b: str, chosen: str,
                created_at: datetime) -> dict:
    version = f"{completion.model_name}/{completion.model_version}"
    return {"pair_id": pair_id, "prompt": scrub(completion.prompt)[0], "response_a": scrub(response_a)[0],
            "response_b": scrub(response_b)[0], "chosen": chosen, "source": f"feedback:{version}",
            "policy_version": version, "votes": 1, "agreement": None, "created_at": created_at}


def feedback_comparisons(database_url: str) -> pd.DataFrame:
    """User feedback as comparison rows (scrubbed), source 'feedback:<model name>/<version>'.

    - pairwise: the latest 'which is better' on an n=2 completion gives one row (a = choice 0);
    - thumbs: a thumbs-up response and a thumbs-down response to the same single-turn prompt from the same
      model version give one row (the two choices of an n=2 completion, or two requests). The latest rating
      of each response counts; completions with a pairwise judgement are left to it. Which side the preferred
      response sits on follows a hash of the pair id, so `chosen` is not always 'a'.
    A thumbs rating with no opposite rating to pair with stays in the store and makes no row.
    """
    engine = open_store(database_url, must_exist=True)
    rows: list[dict] = []
    with Session(engine) as db:
        latest_pairwise: dict[str, Feedback] = {}
        latest_thumbs: dict[tuple[str, int], Feedback] = {}
        for item in db.scalars(select(Feedback).order_by(Feedback.created_at, Feedback.id)):
            if item.kind == "pairwise":
                latest_pairwise[item.completion_id] = item
            else:
                latest_thumbs[(item.completion_id, item.choice_index)] = item
        completions = {c.id: c for c in db.scalars(select(ServedCompletion).where(
            ServedCompletion.id.in_({*latest_pairwise, *(cid for cid, _ in latest_thumbs)})))}
        for completion_id, item in latest_pairwise.items():
            completion = completions[completion_id]
            first, second = completion.choices[0].text, completion.choices[1].text
            rows.append(_comparison(f"feedback-{completion_id}", completion, first, second, item.preferred,
                                    item.created_at))
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
                rows.append(_comparison(pair_id, good, a, b, chosen, max(good_item.created_at, bad_item.created_at)))
    engine.dispose()
    if not rows:
        return empty_comparisons()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype({"votes": "int32"})



# -- the refeed stage ----------------------------------------------------------------------------------------

PROMPTS_OUT = "data/feedback/served_prompts.parquet"
COMPARISONS_OUT = "data/feedback/comparisons.parquet"
METRICS = "metrics/refeed.json"


def store_exists(database_url: str) -> bool:
    url = make_url(database_url)
    return url.get_backend_name() != "sqlite" or bool(url.database and Path(url.database).exists())


def refeed(database_url: str, prompts_out: str = PROMPTS_OUT, comparisons_out: str = COMPARISONS_OUT) -> dict:
    """Snapshot the store for the next cycle (served prompts, feedback comparisons) as Parquet; return the counts.

    A SQLite store that does not exist yet (no server has run) gives empty snapshots and says so in the counts.
    The same store gives the same bytes (fixed schemas, rows in store order), so DVC sees an unchanged snapshot
    and leaves collect and everything after it alone.
    """
    found = store_exists(database_url)
    prompts = served_prompts(database_url) if found else PROMPT_SCHEMA.empty_table().to_pandas()
    comparisons = feedback_comparisons(database_url) if found else empty_comparisons()
    out = Path(prompts_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(pa.Table.from_pandas(prompts, schema=PROMPT_SCHEMA, preserve_index=False), tmp)
    os.replace(tmp, out)
    write_comparisons(comparisons, comparisons_out)
    return {"refeed/store_found": int(found), "refeed/served_prompts": len(prompts),
            "refeed/prompts_with_pii": int((prompts["pii"] != "").sum()) if len(prompts) else 0,
            "refeed/feedback_comparisons": len(comparisons)}


def main() -> int:
    from rlhf import tracking
    from rlhf.params import load_params

    database = load_params().serve.database
    shown = make_url(database).render_as_string(hide_password=True)
    with tracking.stage_run("refeed", {"serve.database": shown}):
        metrics = refeed(database)
        tracking.log_outputs("refeed", {"served_prompts": PROMPTS_OUT, "feedback_comparisons": COMPARISONS_OUT})
        tracking.write_metrics(METRICS, metrics)
    note = "" if metrics["refeed/store_found"] else f" (no feedback store at {shown} yet: `rlhf serve` creates it)"
    print(f"refeed: {metrics['refeed/served_prompts']} served prompts -> {PROMPTS_OUT}, "
          f"{metrics['refeed/feedback_comparisons']} feedback comparisons -> {COMPARISONS_OUT}{note}")
    return 0


if __name__ == "__main__":
    from rlhf.cli import run_stage

    run_stage(main)
