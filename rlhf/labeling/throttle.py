"""Throttling of password guesses on the login and invite forms, per account name and per client address.

A sliding window: at most MAX_TRIES tries that did not succeed within WINDOW, per account name and per
client address; the next is refused before any password is checked, so a guesser also cannot make the
server spend scrypt time. A try is written to `login_attempts` before the check, in the same write
transaction as the count that admits it, so concurrent requests, worker threads and several server
processes on one database share one count. A successful login deletes its own try and every try at the
account, so a person who types their password wrong a few times starts afresh once they get it right.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from rlhf.labeling.db import LoginAttempt, utc_now

WINDOW = timedelta(minutes=1)
MAX_TRIES = 10  # per account and per address within WINDOW; the 11th wrong password in a minute is refused


@dataclass(frozen=True)
class Admission:
    """The answer to one try: admitted (its rows are counted) or refused for `retry_after_s` seconds."""

    attempt_ids: tuple[int, ...]
    retry_after_s: int  # 0 when admitted

    @property
    def refused(self) -> bool:
        return self.retry_after_s > 0


def attempt_key(kind: str, value: str) -> str:
    """sha256 of 'account:<name>' or 'address:<ip>': the count needs equality only, not the value."""
    return hashlib.sha256(f"{kind}:{value}".encode("utf-8", "surrogatepass")).hexdigest()


def admit(db: Session, account: str | None, address: str, now: datetime | None = None) -> Admission:
    """Count this try against the account (None when unknown, e.g. a bad invite link) and the address,
    or refuse it when either already has MAX_TRIES within WINDOW; commits. A refused try is not counted,
    so a waiting person is let in again as soon as the oldest try leaves the window."""
    now = now or utc_now()
    keys = sorted([attempt_key("address", address)] + ([attempt_key("account", account)] if account else []))
    if db.get_bind().dialect.name == "postgresql":
        # SQLite serialises writers from BEGIN IMMEDIATE on; PostgreSQL needs a lock per key until commit,
        # or concurrent tries would all count the same rows and all be admitted. Sorted keys: no deadlock.
        for key in keys:
            db.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})
    db.execute(delete(LoginAttempt).where(LoginAttempt.attempted_at <= now - WINDOW))
    wait_s = max(_seconds_until_admitted(db, key, now) for key in keys)
    if wait_s:
        db.commit()
        return Admission((), wait_s)
    rows = [LoginAttempt(key=key, attempted_at=now) for key in keys]
    db.add_all(rows)
    db.flush()
    ids = tuple(row.id for row in rows)
    db.commit()
    return Admission(ids, 0)


def _seconds_until_admitted(db: Session, key: str, now: datetime) -> int:
    """0 when the key has room in the window, else the seconds until enough of its tries have aged out."""
    times = db.scalars(select(LoginAttempt.attempted_at)
                      .where(LoginAttempt.key == key, LoginAttempt.attempted_at > now - WINDOW)
                      .order_by(LoginAttempt.attempted_at)).all()
    if len(times) < MAX_TRIES:
        return 0
    frees_at = times[len(times) - MAX_TRIES] + WINDOW  # when the count drops to MAX_TRIES - 1
    return max(1, math.ceil((frees_at - now).total_seconds()))


def succeeded(db: Session, admission: Admission, account: str) -> None:
    """The password was right: this try stops counting against the address, and the account's count
    starts again from zero. Commits."""
    db.execute(delete(LoginAttempt).where(LoginAttempt.id.in_(admission.attempt_ids)))
    db.execute(delete(LoginAttempt).where(LoginAttempt.key == attempt_key("account", account)))
    db.commit()


def forgive(db: Session, admission: Admission) -> None:
    """This try turned out not to be a guess (a valid invite link was opened): it stops counting. Commits."""
    db.execute(delete(LoginAttempt).where(LoginAttempt.id.in_(admission.attempt_ids)))
    db.commit()
