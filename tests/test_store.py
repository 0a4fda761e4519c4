"""The store on SQLite and PostgreSQL: migrations, timestamps, URLs."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select

from hermitkit.store import Batch, Store, default_database_url, normalize_database_url, redact_url, utcnow


def _alembic_config(store: Store, connection) -> Config:  # type: ignore[no-untyped-def]
    config = Config()
    config.set_main_option("script_location", str(resources.files("hermitkit") / "alembic"))
    config.attributes["connection"] = connection
    return config


def _add_batch(store: Store, created_at: datetime) -> int:
    def write(session):  # type: ignore[no-untyped-def]
        batch = Batch(name="b", config={"models": ["m"]}, protocol_id="p", protocol_hash="h" * 64, protocol={}, created_at=created_at, updated_at=created_at)
        session.add(batch)
        session.flush()
        return batch.id

    return store.write(write)


def test_new_database_reaches_head(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"models", "batches", "runs", "turns", "judgements", "syntheses", "personas", "reports", "alembic_version"} <= tables


def test_times_read_back_as_written(store):
    instant = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    batch_id = _add_batch(store, instant)
    read = store.read(lambda session: session.get(Batch, batch_id).created_at)
    assert read == instant
    assert read.tzinfo is not None
    assert read.utcoffset() == timedelta(0)


def test_naive_datetime_rejected(store):
    with pytest.raises(Exception, match="timezone-aware"):
        _add_batch(store, datetime(2026, 1, 1, 12, 0))


def test_migrations_down_and_up_keep_schema(database_url):
    store = Store(database_url)
    _add_batch(store, utcnow())
    with store.engine.begin() as connection:
        command.downgrade(_alembic_config(store, connection), "base")
    assert "batches" not in inspect(store.engine).get_table_names()
    with store.engine.begin() as connection:
        command.upgrade(_alembic_config(store, connection), "head")
    assert "turns" in inspect(store.engine).get_table_names()
    batch_id = _add_batch(store, utcnow())
    assert store.read(lambda session: session.scalar(select(Batch.name).where(Batch.id == batch_id))) == "b"
    store.dispose()


def test_default_url_ignores_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HERMITKIT_HOME")
    monkeypatch.chdir(tmp_path)
    first = default_database_url()
    monkeypatch.chdir("/")
    assert default_database_url() == first
    assert str(tmp_path) not in first
    assert first.startswith("sqlite:///")


def test_url_environment_precedence(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://u@h/db")
    assert default_database_url() == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("HERMITKIT_DATABASE_URL", "sqlite:////tmp/x.db")
    assert default_database_url() == "sqlite:////tmp/x.db"


def test_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("HERMITKIT_HOME", str(tmp_path))
    assert default_database_url() == f"sqlite:///{tmp_path / 'hermitkit.db'}"


def test_normalize_and_redact():
    assert normalize_database_url("postgresql://a@b/c") == "postgresql+psycopg://a@b/c"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"
    redacted = redact_url("postgresql+psycopg://user:s3cret-pass@db/name")
    assert "s3cret-pass" not in redacted
    assert "user" in redacted


def test_store_repr_hides_password():
    store = Store("postgresql+psycopg://user:hunter2@127.0.0.1:1/none", upgrade=False)
    assert "hunter2" not in repr(store)


def test_utcnow_is_aware():
    assert utcnow().tzinfo is UTC


def test_sqlite_read_does_not_block_writer(sqlite_url):
    import threading

    store = Store(sqlite_url)
    reading = threading.Event()
    written = threading.Event()

    def slow_read(session):  # type: ignore[no-untyped-def]
        session.execute(select(Batch.id)).all()
        reading.set()
        # A report streaming a large table keeps its read transaction open this long.
        written.wait(20)
        return written.is_set()

    reader = threading.Thread(target=lambda: results.append(store.read(slow_read)))
    results: list[bool] = []
    reader.start()
    assert reading.wait(10)

    writer = threading.Thread(target=lambda: (_add_batch(store, utcnow()), written.set()))
    writer.start()
    writer.join(15)
    reader.join(30)

    assert written.is_set(), "the write waited for the read transaction"
    assert results == [True]
    store.dispose()


def test_read_on_postgres(postgres_url):
    # The read-only option only changes SQLite's BEGIN; PostgreSQL reads work as before.
    store = Store(postgres_url)
    batch_id = _add_batch(store, utcnow())

    assert store.read(lambda session: session.get(Batch, batch_id).name) == "b"
    store.dispose()


def _open_new_file(path: str, start: float, results: Any) -> None:
    import sqlite3
    import time

    from hermitkit.store import _enable_wal

    while time.time() < start:
        pass
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA busy_timeout = 60000")
        _enable_wal(connection.cursor())
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("CREATE TABLE IF NOT EXISTS t (x)")
        connection.execute("COMMIT")
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(repr(exc))
    finally:
        connection.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the two openers")
def test_two_processes_switch_new_file_to_wal(tmp_path):
    # Without the retry in _enable_wal, about one opener in seven failed at once with
    # "database is locked", so 40 rounds of two would almost surely show it.
    import multiprocessing
    import time

    context = multiprocessing.get_context("fork")
    failures = []
    for attempt in range(40):
        path = str(tmp_path / f"new-{attempt}.db")
        results = context.Queue()
        start = time.time() + 0.05
        openers = [context.Process(target=_open_new_file, args=(path, start, results)) for _ in range(2)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(120)
        failures += [outcome for outcome in (results.get(timeout=10) for _ in openers) if outcome != "ok"]
    assert failures == []
