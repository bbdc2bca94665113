"""The labeling database: tables (SQLAlchemy 2), the engine, and migrations to the latest schema.

SQLite (a file, the default) or PostgreSQL (by URL). The schema is created and upgraded only by
the Alembic migrations in `migrations/`, which `upgrade_database` runs at start-up.

Gold answers live in their own table, read only by the aggregation, so no page that renders a
pair can reach them by accident.

On SQLite a transaction that may write begins IMMEDIATE (it takes the write lock at BEGIN and waits its
turn); one opened through `reader(engine)` begins DEFERRED and is query-only, so pages of figures and the
export read a WAL snapshot without ever making a vote wait.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (Boolean, DateTime, Engine, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator,
                        UniqueConstraint, create_engine, event)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind each other; a vote waits rather than fails
READ_ONLY = "labeling_read_only"  # execution option set by `reader`: the connection's transactions only read


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the column: SQLite keeps no time zone, PostgreSQL needn't."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    """A person who labels; role 'admin' also runs campaigns. Invited first, then sets a password."""

    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # 'annotator' | 'admin'
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None until the invite is accepted
    invite_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # sha256 of the invite token
    invite_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)


class LoginSession(Base):
    """A logged-in browser. The cookie holds a random token; only its sha256 is stored."""

    __tablename__ = "sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    annotator: Mapped[Annotator] = relationship(lazy="joined")


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    overlap: Mapped[int] = mapped_column(Integer)  # distinct annotators each pair goes to
    gold_rate: Mapped[float] = mapped_column(Float)  # share of an annotator's queue that is gold
    seed: Mapped[int] = mapped_column(Integer)  # server-side; places gold and left/right order, never shown
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)


class Pair(Base):
    """One pair to judge, in the orientation of the comparisons file it came from."""

    __tablename__ = "pairs"
    __table_args__ = (
        UniqueConstraint("campaign_id", "pair_id"),
        Index("ix_pairs_claimable", "campaign_id", "is_gold", "claims", "id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    pair_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    policy_version: Mapped[str | None] = mapped_column(String(200))
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    # assignments that still count towards the overlap (not skipped); only real pairs are claimed
    claims: Mapped[int] = mapped_column(Integer, default=0)


class GoldAnswer(Base):
    """The expert answer to a gold pair. Read by the aggregation only, never by a page."""

    __tablename__ = "gold_answers"
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True)
    chosen: Mapped[str] = mapped_column(String(8))  # 'a' | 'b' | 'tie'


class Assignment(Base):
    """One item of an annotator's queue: a pair, its position, and the side response_a is shown on."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("pair_id", "annotator_id"),
        UniqueConstraint("annotator_id", "campaign_id", "position"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # 0, 1, 2... in this annotator's queue
    swapped: Mapped[bool] = mapped_column(Boolean)  # True: response_b shown on the left, as 'A'
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    pair: Mapped[Pair] = relationship(lazy="joined")


class Vote(Base):
    """One annotator's judgement of one pair, in the pair's own orientation. One per annotator per pair."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("pair_id", "annotator_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    choice: Mapped[str] = mapped_column(String(8))  # 'a' | 'b' | 'tie' | 'both_bad' | 'skip'
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now, index=True)


class LoginAttempt(Base):
    """One try at a password (login or invite form), counted against an account name and a client address.

    Written before the password is checked and deleted when the login succeeds, so what is left in the
    last minute are failures and tries still in flight. The key is a sha256, so no address is kept in clear.
    """

    __tablename__ = "login_attempts"
    __table_args__ = (Index("ix_login_attempts_key_attempted_at", "key", "attempted_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64))  # sha256 of 'account:<name>' or 'address:<ip>'
    attempted_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)


def make_engine(database_url: str) -> Engine:
    """An engine for a SQLite file (its folder is created) or a PostgreSQL URL."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database in (None, "", ":memory:"):
        raise ValueError(
            f"database URL {database_url!r} names an in-memory SQLite database. Votes must survive a restart and "
            "be shared by the server's threads, so the labeling app needs a file. Use sqlite:///path/to/labeling.db."
        )
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin)
    return engine


def reader(engine: Engine) -> Engine:
    """The same database and pool, for transactions that only read (figures pages, the export).

    On SQLite they begin DEFERRED with `PRAGMA query_only`, so they never take the write lock (a write
    through them fails loudly instead); on PostgreSQL they are READ ONLY transactions.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(**{READ_ONLY: True, "postgresql_readonly": True})
    return engine.execution_options(**{READ_ONLY: True})


def _configure_sqlite(dbapi_connection, _record) -> None:
    # SQLAlchemy then emits BEGIN itself (see _begin) instead of pysqlite's implicit one
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed vote survives a crash, not only a restart
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _begin(connection) -> None:
    if connection.get_execution_options().get(READ_ONLY):
        # A reader: DEFERRED takes no lock until its first read, then only a WAL snapshot; writers go on.
        connection.exec_driver_sql("PRAGMA query_only=1")
        connection.exec_driver_sql("BEGIN DEFERRED")
        return
    # A writer takes the write lock at BEGIN: a deferred transaction that reads, then writes, fails at once
    # with "database is locked" when another writer got there first, instead of waiting its turn.
    connection.exec_driver_sql("PRAGMA query_only=0")  # the pooled connection may last have served a reader
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def upgrade_database(engine: Engine) -> None:
    """`alembic upgrade head` on this engine's database; a no-op when it is already there."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
