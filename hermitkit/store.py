"""The database: SQLAlchemy 2.0 models and the queries the runner and judge need.

SQLite is the default, at a path that does not depend on the working directory.
PostgreSQL is used when HERMITKIT_DATABASE_URL or DATABASE_URL names it. Alembic owns
the schema on both, and every Store brings its database to the head revision when it
opens it. No API key is ever written here: batch configs store the name of the
environment variable that contains a key, never the key.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hermitkit.errors import ConfigError, StoreError

log = logging.getLogger("hermitkit.store")

T = TypeVar("T")

BATCH_STATUSES = ("pending", "running", "completed", "failed", "cancelled", "budget_exhausted", "interrupted")
RUN_STATUSES = ("pending", "running", "completed", "failed", "context_exhausted", "budget_exhausted", "cancelled")
# Runs in these states are finished: resume leaves them alone.
FINAL_RUN_STATUSES = frozenset({"completed", "context_exhausted"})


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no time zone type, so values are stored as naive UTC there and read back
    with UTC attached; PostgreSQL stores ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Naive datetime {value!r} given; pass a timezone-aware datetime.")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRecord(Base):
    """One entry of an endpoint's model catalogue, with prices in USD per token."""

    __tablename__ = "models"

    endpoint: Mapped[str] = mapped_column(String(500), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    name: Mapped[str] = mapped_column(String(500), default="")
    context_length: Mapped[int | None] = mapped_column(Integer)
    prompt_price: Mapped[float | None] = mapped_column(Float)
    completion_price: Mapped[float | None] = mapped_column(Float)
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    supports_structured_output: Mapped[bool] = mapped_column(Boolean, default=False)
    raw: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(300), default="")
    status: Mapped[str] = mapped_column(String(32), default="pending")
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    protocol_id: Mapped[str] = mapped_column(String(200))
    protocol_hash: Mapped[str] = mapped_column(String(64))
    protocol: Mapped[dict[str, Any]] = mapped_column(JSON)
    endpoint: Mapped[str] = mapped_column(String(500), default="")
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    budget_usd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    hermitkit_version: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The process that is sending this batch's requests, while it holds the lease
    # (hermitkit/lease.py). All four are NULL when no process holds it.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_host: Mapped[str | None] = mapped_column(String(255))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Run(Base):
    """One model's interaction for one repetition, with exact protocol counts."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("batch_id", "model", "repetition", name="uq_runs_batch_model_repetition"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(300), index=True)
    repetition: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="pending")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    protocol_id: Mapped[str] = mapped_column(String(200))
    protocol_hash: Mapped[str] = mapped_column(String(64))
    turns_target: Mapped[int] = mapped_column(Integer)
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    ok_count: Mapped[int] = mapped_column(Integer, default=0)
    multiple_count: Mapped[int] = mapped_column(Integer, default=0)
    unbalanced_count: Mapped[int] = mapped_column(Integer, default=0)
    empty_count: Mapped[int] = mapped_column(Integer, default=0)
    missing_count: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Turn(Base):
    """One message of a run, in order. ``idx`` 0 is the initial prompt.

    Assistant messages carry the verdict and usage; ``turn_number`` counts assistant
    replies from 1 and is ``None`` for user messages.
    """

    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("run_id", "idx", name="uq_turns_run_idx"),
        Index("ix_turns_run_role", "run_id", "role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str | None] = mapped_column(Text)
    reasoning: Mapped[str | None] = mapped_column(Text)
    turn_number: Mapped[int | None] = mapped_column(Integer)
    verdict: Mapped[str | None] = mapped_column(String(16))
    extracted: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    latency_s: Mapped[float | None] = mapped_column(Float)
    generation_id: Mapped[str | None] = mapped_column(String(200))
    provider: Mapped[str | None] = mapped_column(String(200))
    served_model: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Judgement(Base):
    """One judge model's verdict on one run.

    ``round`` is 0 for the judging done by the batch itself and grows by one each time
    the run is judged again by the same judge, so repeats sit beside the old verdicts.
    The unique key on (run, judge, round) means a resumed batch cannot store its own
    verdict twice.
    """

    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("run_id", "judge_model", "round", name="uq_judgements_run_judge_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    judge_model: Mapped[str] = mapped_column(String(300))
    round: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32))
    mirror_test: Mapped[str | None] = mapped_column(String(32))
    self_awareness: Mapped[str | None] = mapped_column(String(32))
    refusal: Mapped[bool | None] = mapped_column(Boolean)
    topics: Mapped[list[str] | None] = mapped_column(JSON)
    topic_summary: Mapped[str | None] = mapped_column(Text)
    exploration_style: Mapped[str | None] = mapped_column(String(32))
    sophistication: Mapped[int | None] = mapped_column(Integer)
    autonomy: Mapped[int | None] = mapped_column(Integer)
    emergent_behaviour: Mapped[str | None] = mapped_column(Text)
    context_loss: Mapped[bool | None] = mapped_column(Boolean)
    analysis: Mapped[str | None] = mapped_column(Text)
    raw_reply: Mapped[str | None] = mapped_column(Text)
    retry_reply: Mapped[str | None] = mapped_column(Text)
    repair_reply: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prompt_version: Mapped[str] = mapped_column(String(64), default="")
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Synthesis(Base):
    """Themes a judge model found across one model's runs in a batch."""

    __tablename__ = "syntheses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(300))
    judge_model: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(32), default="ok")
    themes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    raw_reply: Mapped[str | None] = mapped_column(Text)
    # The reply to the repair request: "" when it was empty, None when none was sent.
    repair_reply: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_detail: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Persona(Base):
    """A persona card for one model in a batch: archetype, stats and description."""

    __tablename__ = "personas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(300))
    judge_model: Mapped[str] = mapped_column(String(300))
    archetype: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(32), default="ok", server_default="ok")
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    themes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(Text)
    evidence: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Evidence items dropped because they named a run or turn not of this model.
    dropped_citations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    raw_reply: Mapped[str | None] = mapped_column(Text)
    # The reply to the repair request: "" when it was empty, None when none was sent.
    repair_reply: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_detail: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Report(Base):
    """A file written by ``hermitkit report`` or a report notebook."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def default_database_url() -> str:
    """Return the database URL: HERMITKIT_DATABASE_URL, then DATABASE_URL, then SQLite.

    The SQLite file lives in the user data folder (``platformdirs.user_data_dir``,
    e.g. ``~/.local/share/hermitkit/hermitkit.db`` on Linux), or under HERMITKIT_HOME
    when that is set, never in the working directory.
    """
    for name in ("HERMITKIT_DATABASE_URL", "DATABASE_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return normalize_database_url(value)

    home = os.environ.get("HERMITKIT_HOME", "").strip()
    if home:
        folder = Path(home).expanduser()
    else:
        import platformdirs

        folder = Path(platformdirs.user_data_dir("hermitkit", appauthor=False))
    return f"sqlite:///{folder / 'hermitkit.db'}"


def normalize_database_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgres://`` and ``postgresql://`` URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def redact_url(url: str) -> str:
    """Return the URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL must still be printable safely
        return "<unparsable database URL>"


def _configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout and BEGIN IMMEDIATE on every SQLite connection.

    BEGIN IMMEDIATE takes the write lock when a transaction starts, so two writers
    wait for each other through busy_timeout instead of failing with "database is
    locked" when a read transaction tries to upgrade to a write. Connections with the
    execution option ``READ_ONLY_OPTION`` (``Store.read``) begin with a plain BEGIN
    instead. In WAL mode readers do not block writers (https://www.sqlite.org/wal.html),
    so a report that streams a large table does not hold up a batch on the same file.
    The WAL file can only be checkpointed up to the oldest open read, so it grows
    while such a read lasts.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 60000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: Any, timeout_s: float = 60.0) -> None:
    """Switch the connection's file to WAL, retrying while another connection switches it.

    Two processes that open a new file at once both switch it, and the loser gets
    "database is locked" at once: the switch does not wait through busy_timeout. Two
    processes racing on a new file failed this way in 56 of 400 tries, and in none with
    the retry.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# Execution option that marks a transaction as read-only (see _configure_sqlite).
READ_ONLY_OPTION = "hermitkit_read_only"


_upgraded: set[str] = set()
_upgrade_lock = threading.Lock()


def upgrade_database(engine: Engine) -> None:
    """Bring the database to Alembic's head revision (a no-op when it is already there)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("hermitkit") / "alembic"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_URL_FORMS = "sqlite:///PATH (a file) or postgresql://USER@HOST:PORT/DATABASE"


class Store:
    """A handle on one database. Cheap to share; create one per process."""

    def __init__(self, url: str | None = None, *, upgrade: bool = True):
        self.url = normalize_database_url(url) if url else default_database_url()
        self.engine = self._create_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            with _upgrade_lock:
                if self.url not in _upgraded:
                    try:
                        upgrade_database(self.engine)
                    except OperationalError as exc:
                        raise StoreError(f"Could not open or migrate the database at {redact_url(self.url)}: {exc.orig}") from exc
                    _upgraded.add(self.url)

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @staticmethod
    def _create_engine(url: str) -> Engine:
        """Create the engine for ``url``, raising ConfigError for a URL that hermitkit cannot use."""
        try:
            parsed = make_url(url)
        except ArgumentError:
            # Not parsable, so redact_url cannot find a password in it: hide everything before an "@".
            redacted = url if "@" not in url else "***@" + url.rsplit("@", 1)[1]
            raise ConfigError(f"Invalid database URL {redacted!r}: use {_URL_FORMS}.") from None
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigError(f"Unsupported database {backend!r} in {redact_url(url)}: hermitkit stores batches in SQLite or PostgreSQL, so use {_URL_FORMS}.")

        if backend == "sqlite":
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            options: dict[str, Any] = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        else:
            # pool_pre_ping replaces connections that the server closed while idle.
            options = {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}

        try:
            engine = create_engine(url, **options)
        except (NoSuchModuleError, ImportError) as exc:
            raise ConfigError(
                f"The database driver of {redact_url(url)} is not available ({exc}). "
                f"Use {_URL_FORMS}. Plain postgresql:// URLs use psycopg, which hermitkit installs."
            ) from None
        if backend == "sqlite":
            _configure_sqlite(engine)
        return engine

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """Open a session whose transaction commits on success and rolls back on error.

        ``read_only`` starts the transaction without SQLite's write lock; the session
        must then not write.
        """
        with self._sessions() as session, session.begin():
            if read_only:
                session.connection(execution_options={READ_ONLY_OPTION: True})
            yield session

    def write(self, action: Callable[[Session], T], *, attempts: int = 10) -> T:
        """Run ``action`` in one transaction, retrying when the connection drops.

        A PostgreSQL backend can be restarted or a connection killed in the middle of a
        batch. The server then rolls the transaction back, so it can safely run again.
        With the default ``attempts`` the waits add up to about 20 s, enough for a server
        restart. Integrity errors are not retried, because the caller decides what a
        duplicate means. Raises StoreError when every attempt lost the connection.
        """
        return self._transact(action, attempts=attempts, read_only=False)

    def read(self, action: Callable[[Session], T], *, attempts: int = 10) -> T:
        """Run a read-only ``action``, retrying when the connection drops.

        On SQLite the transaction does not take the write lock, so ``action`` must not
        write.
        """
        return self._transact(action, attempts=attempts, read_only=True)

    def _transact(self, action: Callable[[Session], T], *, attempts: int, read_only: bool) -> T:
        for attempt in range(1, attempts + 1):
            try:
                with self.session(read_only=read_only) as session:
                    return action(session)
            except IntegrityError:
                raise
            except (OperationalError, DBAPIError) as exc:
                time.sleep(self.retry_delay_s(exc, attempt, attempts))
        raise AssertionError("unreachable")

    def retry_delay_s(self, exc: DBAPIError, attempt: int, attempts: int) -> float:
        """Return the seconds to wait before retrying a transaction that raised ``exc`` on ``attempt``.

        Re-raises ``exc`` when it is not a lost connection, and raises StoreError when
        this was the last of ``attempts``.
        """
        if not _is_disconnect(exc):
            raise exc
        if attempt == attempts:
            raise StoreError(
                f"Lost the connection to the database at {redact_url(self.url)} on {attempts} attempts in a row "
                f"({type(exc.orig).__name__}: {str(exc.orig).strip()[:200]}). Nothing of the last transaction was stored. "
                "Check that the database server is running, then resume the batch with `hermitkit resume BATCH_ID`."
            ) from exc
        log.warning("Database connection lost (%s); retrying transaction, attempt %d of %d", type(exc.orig).__name__, attempt, attempts)
        return _reconnect_delay_s(attempt)

    def dispose(self) -> None:
        self.engine.dispose()


def _reconnect_delay_s(attempt: int) -> float:
    """Seconds to wait after failed ``attempt``: none after the first, then 0.25 s doubling up to 5 s."""
    # The pool replaces a killed connection at once, so the first retry need not wait.
    if attempt <= 1:
        return 0.0
    return min(0.25 * 2 ** (attempt - 2), 5.0)


def _is_disconnect(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    markers = ("terminating connection", "server closed the connection", "connection refused", "connection is closed", "consuming input failed", "database is locked", "the connection is lost", "ssl syscall error", "could not receive data")
    return any(marker in text for marker in markers)


def run_counts_update(verdict: str) -> dict[str, Any]:
    """Column increments for one assistant turn with ``verdict``."""
    column = {
        "ok": Run.ok_count,
        "multiple": Run.multiple_count,
        "unbalanced": Run.unbalanced_count,
        "empty": Run.empty_count,
        "missing": Run.missing_count,
    }[verdict]
    return {Run.turn_count: Run.turn_count + 1, column: column + 1}


def batch_spent_usd(session: Session, batch_id: int) -> float:
    """Cost so far of a batch: its runs' replies plus its judgements."""
    runs_cost = session.scalar(select(func.coalesce(func.sum(Run.cost_usd), 0.0)).where(Run.batch_id == batch_id))
    judge_cost = session.scalar(
        select(func.coalesce(func.sum(Judgement.cost_usd), 0.0)).join(Run, Run.id == Judgement.run_id).where(Run.batch_id == batch_id)
    )
    return float(runs_cost or 0.0) + float(judge_cost or 0.0)


def touch_batch(session: Session, batch_id: int, **values: Any) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(updated_at=utcnow(), **values))
