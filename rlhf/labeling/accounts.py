"""Accounts: invites, scrypt password hashes, login sessions that expire, and CSRF tokens.

Secrets never rest in the database in the clear: passwords are scrypt hashes, invite and
session tokens are stored as their sha256, and only the browser holding the cookie knows them.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from rlhf.labeling.db import Annotator, LoginSession, utc_now

ROLES = ("annotator", "admin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
INVITE_DAYS = 7  # an unused invite link stops working after this; `invite` again makes a new one
# scrypt cost: 2^14 x 8 blocks is ~16 MiB and ~0.1 s per check, the interactive-login figure in RFC 7914
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AccountError(ValueError):
    """A request about accounts that cannot be honoured; the message says why and what to do."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Recompute with the stored salt and cost, compare in constant time."""
    scheme, n, r, p, salt, digest = stored.split("$")
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


# Checked when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(expected: str | None, given: str | None) -> bool:
    """CSRF check: both present and equal, compared in constant time."""
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def invite(db: Session, name: str, role: str = "annotator", now: datetime | None = None) -> str:
    """Create the account, or reset an existing one, and return the one-time invite token; commits.

    A reset is what a re-invite is for (a forgotten or leaked password, a changed role): the old password
    stops working and every login session of the account ends, so whoever held them must use the new link.
    """
    if not NAME_PATTERN.match(name):
        raise AccountError(
            f"annotator name {name!r} is not allowed. Names appear in URLs, logs and exports, so they are 1-64 "
            "letters, digits, '.', '_' or '-', starting with a letter or digit. Pick a name like 'ana.k'."
        )
    if role not in ROLES:
        raise AccountError(f"role {role!r} is unknown. The roles are {ROLES}; pass one of them.")
    now = now or utc_now()
    token = new_token()
    annotator = db.scalar(select(Annotator).where(Annotator.name == name))
    if annotator is None:
        annotator = Annotator(name=name, role=role)
        db.add(annotator)
    else:
        db.execute(delete(LoginSession).where(LoginSession.annotator_id == annotator.id))
        annotator.password_hash = None
    annotator.role = role
    annotator.invite_hash = token_hash(token)
    annotator.invite_expires_at = now + timedelta(days=INVITE_DAYS)
    db.commit()
    return token


def find_invite(db: Session, token: str, now: datetime | None = None) -> Annotator | None:
    annotator = db.scalar(select(Annotator).where(Annotator.invite_hash == token_hash(token)))
    if annotator is None or annotator.invite_expires_at <= (now or utc_now()):
        return None
    return annotator


def accept_invite(db: Session, token: str, password: str, now: datetime | None = None) -> Annotator:
    """Set the password and spend the invite; commits. The hash is computed before the transaction
    begins: on SQLite a writer holds the write lock from BEGIN, and scrypt's ~0.1 s would make votes wait."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(
            f"the password has {len(password)} characters. Short passwords are guessed quickly, so at least "
            f"{MIN_PASSWORD_LENGTH} are needed. Choose a longer one."
        )
    password_hash = hash_password(password)
    annotator = find_invite(db, token, now)
    if annotator is None:
        db.rollback()
        raise AccountError(
            "this invite link is unknown, used or expired. Each link works once, for "
            f"{INVITE_DAYS} days. Ask the campaign admin for a new one."
        )
    annotator.password_hash = password_hash
    annotator.invite_hash = None
    annotator.invite_expires_at = None
    db.commit()
    return annotator


def authenticate(db: Session, name: str, password: str) -> Annotator | None:
    """The account when the password is right, else None. The lookup's transaction is committed before the
    scrypt check, so no transaction (on SQLite, no write lock) is held for its ~0.1 s."""
    found = db.execute(select(Annotator.id, Annotator.password_hash).where(Annotator.name == name)).first()
    db.commit()
    if found is None or found.password_hash is None:
        verify_password(password, _DUMMY_HASH)
        return None
    return db.get(Annotator, found.id) if verify_password(password, found.password_hash) else None


def start_session(db: Session, annotator: Annotator, hours: float, now: datetime | None = None) -> str:
    """A new login session for this annotator; returns the cookie token. Drops expired sessions; commits."""
    now = now or utc_now()
    db.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
    token = new_token()
    db.add(LoginSession(token_hash=token_hash(token), annotator_id=annotator.id, csrf_token=new_token(),
                        expires_at=now + timedelta(hours=hours), created_at=now))
    db.commit()
    return token


def find_session(db: Session, token: str, now: datetime | None = None) -> LoginSession | None:
    """The live session behind a cookie token, or None when unknown or expired."""
    login = db.get(LoginSession, token_hash(token))
    if login is None or login.expires_at <= (now or utc_now()):
        return None
    return login


def end_session(db: Session, token: str) -> None:
    db.execute(delete(LoginSession).where(LoginSession.token_hash == token_hash(token)))
    db.commit()
