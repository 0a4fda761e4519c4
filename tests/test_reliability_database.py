"""Database faults: PostgreSQL connections terminated mid-batch, SQLite writers in parallel,
every Alembic revision down and up again, and times that read back as written.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, Boolean, Float, Integer, String, column, create_engine, event, func, insert, inspect, select, text
from sqlalchemy import table as sql_table
from sqlalchemy.engine import Engine, make_url

from hermitkit.demo import DemoServer
from hermitkit.errors import StoreError
from hermitkit.runner import run_batch
from hermitkit.store import Base, Batch, Judgement, ModelRecord, Persona, Report, Run, Store, Synthesis, Turn, UTCDateTime, normalize_database_url
from tests.conftest import postgres_base_url
from tests.reliability_support import (
    SUBJECT_MODELS,
    assert_batch_exact,
    cli_env,
    demo_config,
    transcripts,
    write_params,
)

# ---------------------------------------------------------------- PostgreSQL disconnects

TERMINATE_EVERY_NTH_TURN_INSERT = 5


@pytest.mark.slow
def test_postgres_backend_terminated_mid_batch(postgres_url, tmp_path, caplog):
    """Backends are killed by an admin, both at random moments and inside write transactions."""
    caplog.set_level(logging.WARNING, logger="hermitkit.store")
    store = Store(postgres_url)
    admin = create_engine(normalize_database_url(postgres_base_url() or ""), isolation_level="AUTOCOMMIT")
    database = make_url(postgres_url).database

    # Inside the transaction that stores a turn, every Nth insert has its own backend killed
    # first, so the statement fails with the connection gone and the write must be retried.
    turn_inserts = 0
    killed_in_transaction = 0

    # The batch writes turns through its own asyncio engine (hermitkit.writer.AsyncWriter),
    # so the hook listens on every engine and picks the test database's connections.
    def _terminate_own_backend(connection, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        nonlocal turn_inserts, killed_in_transaction
        if connection.engine.url.database != database:
            return
        if "INSERT INTO turns" in statement and parameters and _is_assistant(parameters):
            turn_inserts += 1
            if turn_inserts % TERMINATE_EVERY_NTH_TURN_INSERT == 0:
                pid = connection.connection.driver_connection.info.backend_pid
                with admin.connect() as admin_connection:
                    admin_connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                killed_in_transaction += 1

    # Meanwhile a thread terminates every backend of the test database now and then.
    stop = threading.Event()
    terminated: list[int] = []

    def terminate_all() -> None:
        while True:
            with admin.connect() as connection:
                count = connection.execute(
                    text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"),
                    {"name": database},
                ).scalar()
            terminated.append(int(count or 0))
            if stop.wait(0.15):
                return

    killer = threading.Thread(target=terminate_all, name="terminate-backends", daemon=True)
    with DemoServer(latency_s=0.005) as server:
        config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=2, turns=6, concurrency=4)
        event.listen(Engine, "before_cursor_execute", _terminate_own_backend)
        killer.start()
        try:
            outcome = run_batch(config, store=store, progress=False)
        finally:
            event.remove(Engine, "before_cursor_execute", _terminate_own_backend)
            stop.set()
            killer.join()
        reference_store = Store(f"sqlite:///{tmp_path / 'reference.db'}")
        reference = run_batch(config, store=reference_store, progress=False)
    admin.dispose()

    assert outcome.status == "completed", outcome.message
    assert_batch_exact(store, outcome.batch_id, turns=6)
    assert transcripts(store, outcome.batch_id) == transcripts(reference_store, reference.batch_id)
    assert killed_in_transaction >= 5
    retries = [record for record in caplog.records if "Database connection lost" in record.getMessage()]
    assert len(retries) >= killed_in_transaction
    assert sum(terminated) >= 1
    store.dispose()


def test_store_gives_up_with_store_error(postgres_url):
    """When every attempt loses its connection, the write fails loudly and stores nothing."""
    store = Store(postgres_url)
    admin = create_engine(normalize_database_url(postgres_base_url() or ""), isolation_level="AUTOCOMMIT")

    @event.listens_for(store.engine, "before_cursor_execute")
    def _terminate_own_backend(connection, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO batches"):
            pid = connection.connection.dbapi_connection.info.backend_pid
            with admin.connect() as admin_connection:
                admin_connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def add_batch(session):  # type: ignore[no-untyped-def]
        session.add(Batch(name="lost", config={}, protocol_id="p", protocol_hash="h", protocol={}))
        session.flush()

    with pytest.raises(StoreError) as info:
        store.write(add_batch, attempts=3)
    assert "on 3 attempts in a row" in str(info.value)
    assert "hermitkit resume" in str(info.value)

    event.remove(store.engine, "before_cursor_execute", _terminate_own_backend)
    assert store.read(lambda session: session.scalar(select(func.count()).select_from(Batch))) == 0
    admin.dispose()
    store.dispose()


def _is_assistant(parameters: Any) -> bool:
    """Return True when an INSERT's parameters (one row, several, or the rows as JSON text) store an assistant reply."""
    rows = parameters if isinstance(parameters, (list, tuple)) else [parameters]
    return any(isinstance(row, dict) and (row.get("role") == "assistant" or '"role":"assistant"' in (row.get("turns") or "")) for row in rows)


# ---------------------------------------------------------------- SQLite concurrency


@pytest.mark.slow
def test_sqlite_two_processes_share_one_file(tmp_path):
    """Two CLI processes migrate and fill the same new SQLite file at the same time."""
    database = tmp_path / "shared.db"
    env = cli_env(f"sqlite:///{database}")
    with DemoServer(latency_s=0.002) as server:
        config = demo_config(server.base_url, models=SUBJECT_MODELS, runs=4, turns=10, concurrency=16)
        params = write_params(tmp_path / "params.yaml", config)
        processes = [
            subprocess.Popen([sys.executable, "-m", "hermitkit.cli", "run", str(params), "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = [process.communicate(timeout=300) for process in processes]

    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stdout + stderr
        assert "locked" not in stderr
        assert "Database connection lost" not in stderr

    store = Store(f"sqlite:///{database}")
    batch_ids = store.read(lambda session: list(session.scalars(select(Batch.id).order_by(Batch.id))))
    assert batch_ids == [1, 2]
    for batch_id in batch_ids:
        assert_batch_exact(store, batch_id, turns=10)
    assert transcripts(store, 1) == transcripts(store, 2)


@pytest.mark.slow
def test_sqlite_fifty_concurrent_runs(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(f"sqlite:///{tmp_path / 'fifty.db'}")
    with DemoServer() as server:
        config = demo_config(server.base_url, models=["demo/steady", "demo/wanderer"], runs=25, turns=10, concurrency=50)
        outcome = run_batch(config, store=store, progress=False)
    assert outcome.status == "completed", outcome.message
    assert outcome.run_statuses == {"completed": 50}
    assert_batch_exact(store, outcome.batch_id, turns=10)
    assert not [record for record in caplog.records if record.name.startswith("hermitkit") and record.levelno >= logging.WARNING]


# ---------------------------------------------------------------- migrations


def _alembic_config(connection: Any) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("hermitkit") / "alembic"))
    config.attributes["connection"] = connection
    return config


def _revisions() -> list[Any]:
    """Every revision from the first to head, in order."""
    script = ScriptDirectory.from_config(_alembic_config(None))
    return list(reversed(list(script.walk_revisions("base", "heads"))))


def _migrate(store: Store, action: str, target: str) -> None:
    with store.engine.begin() as connection:
        getattr(command, action)(_alembic_config(connection), target)


def _current(store: Store) -> str | None:
    with store.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


INSTANT = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=45)))


def _fill_every_table(store: Store) -> None:
    def write(session):  # type: ignore[no-untyped-def]
        session.add(ModelRecord(endpoint="http://127.0.0.1:1/v1", model_id="demo/steady", name="Steady", raw={"id": "demo/steady"}, updated_at=INSTANT))
        batch = Batch(name="kept", config={"models": ["demo/steady"]}, protocol_id="p", protocol_hash="h" * 64, protocol={"id": "p"}, created_at=INSTANT, updated_at=INSTANT)
        session.add(batch)
        session.flush()
        run = Run(batch_id=batch.id, model="demo/steady", repetition=1, params={"seed": 1}, protocol_id="p", protocol_hash="h" * 64, turns_target=1, turn_count=1, ok_count=1, created_at=INSTANT)
        session.add(run)
        session.flush()
        session.add_all(
            [
                Turn(run_id=run.id, idx=0, role="user", content="Begin {here}.", created_at=INSTANT),
                Turn(run_id=run.id, idx=1, role="assistant", content="{Layer 1}", turn_number=1, verdict="ok", extracted="Layer 1", created_at=INSTANT),
                Judgement(run_id=run.id, judge_model="demo/judge", status="ok", autonomy=4, sophistication=3, topics=["tide"], sampling={"temperature": 0}, created_at=INSTANT),
                Synthesis(batch_id=batch.id, model="demo/steady", judge_model="demo/judge", themes=[{"theme": "tide"}], created_at=INSTANT),
                Persona(batch_id=batch.id, model="demo/steady", judge_model="demo/judge", archetype="Explorer", stats={"runs": 1}, created_at=INSTANT),
                Report(batch_id=batch.id, kind="csv", path="/tmp/report.csv", created_at=INSTANT),
            ]
        )

    store.write(write)


def _snapshot(store: Store) -> dict[str, list[dict[str, Any]]]:
    def read(session):  # type: ignore[no-untyped-def]
        tables = {}
        for table in Base.metadata.sorted_tables:
            order = [column for column in table.primary_key.columns]
            rows = session.execute(select(table).order_by(*order)).mappings().all()
            tables[table.name] = [dict(row) for row in rows]
        return tables

    return store.read(read)


def _sample_value(column: Any) -> Any:
    """A value of the right type for any column, so rows can be written at any revision."""
    if column.foreign_keys or (column.primary_key and isinstance(column.type, Integer)):
        return 1
    if isinstance(column.type, UTCDateTime):
        return INSTANT
    if isinstance(column.type, Boolean):
        return True
    if isinstance(column.type, Integer):
        return 3
    if isinstance(column.type, Float):
        return 0.25
    if isinstance(column.type, JSON):
        return {"kept": [1, "two"], "column": column.name}
    if isinstance(column.type, String) and column.type.length is not None:
        return f"{column.name} value"[: column.type.length]
    return f"{column.name}: line one\nline two {{braces}}"


def _existing_tables(store: Store) -> dict[str, Any]:
    """Each table of the database at its current revision, as a lightweight table with the models' column types.

    Only columns that exist in the database are listed, and they carry no defaults, so
    inserts write exactly the values given.
    """
    inspector = inspect(store.engine)
    names = set(inspector.get_table_names())
    tables = {}
    for table in Base.metadata.sorted_tables:
        if table.name not in names:
            continue
        existing = [column["name"] for column in inspector.get_columns(table.name)]
        columns = [column(name, table.c[name].type) if name in table.c else column(name) for name in existing]
        tables[table.name] = sql_table(table.name, *columns)
    return tables


def _fill_existing_columns(store: Store) -> None:
    """Insert one row into every table, with a value in every column the database has now."""
    tables = _existing_tables(store)
    with store.engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name in tables:
                light = tables[table.name]
                connection.execute(insert(light).values({name: _sample_value(table.c[name]) for name in light.c.keys() if name in table.c}))


def _snapshot_existing(store: Store) -> dict[str, list[dict[str, Any]]]:
    snapshot = {}
    with store.engine.connect() as connection:
        for name, light in _existing_tables(store).items():
            order = [light.c[key.name] for key in Base.metadata.tables[name].primary_key.columns]
            snapshot[name] = [dict(row) for row in connection.execute(select(light).order_by(*order)).mappings()]
    return snapshot


def test_every_revision_down_and_up(database_url):
    """Each revision upgrades, downgrades and upgrades again; head matches the models exactly.

    Data is checked across the down/up of every revision after the first. The first
    revision creates the tables, so going below it necessarily drops them.
    """
    store = Store(database_url, upgrade=False)
    revisions = _revisions()
    assert revisions, "no Alembic revision found"

    # up, down and up again, one revision at a time
    for revision in revisions:
        _migrate(store, "upgrade", revision.revision)
        assert _current(store) == revision.revision
        _migrate(store, "downgrade", revision.down_revision or "base")
        assert _current(store) == revision.down_revision
        _migrate(store, "upgrade", revision.revision)
        assert _current(store) == revision.revision

    # head is exactly the schema the models describe
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert differences == []

    # rows in every table survive the down/up of each later revision
    _fill_every_table(store)
    before = _snapshot(store)
    assert all(before[table.name] for table in Base.metadata.sorted_tables)
    for revision in reversed(revisions[1:]):
        _migrate(store, "downgrade", revision.down_revision)
        _migrate(store, "upgrade", "head")
        assert _snapshot(store) == before, revision.revision

    # rows written before each later revision keep every value through its up, down and up
    for revision in revisions[1:]:
        _migrate(store, "downgrade", "base")
        _migrate(store, "upgrade", revision.down_revision)
        _fill_existing_columns(store)
        written = _snapshot_existing(store)
        assert all(written.values()), revision.revision

        _migrate(store, "upgrade", revision.revision)
        upgraded = _snapshot_existing(store)
        for name, rows in written.items():
            kept = [{key: row[key] for key in rows[0]} for row in upgraded[name]]
            assert kept == rows, (revision.revision, name)

        _migrate(store, "downgrade", revision.down_revision)
        assert _snapshot_existing(store) == written, revision.revision
        _migrate(store, "upgrade", revision.revision)
        assert _snapshot_existing(store) == upgraded, revision.revision

    # the full cycle through base drops everything and rebuilds a working schema
    _migrate(store, "downgrade", "base")
    assert set(inspect(store.engine).get_table_names()) <= {"alembic_version"}
    _migrate(store, "upgrade", "head")
    assert all(not rows for rows in _snapshot(store).values())
    _fill_every_table(store)
    assert _snapshot(store)["turns"][1]["content"] == "{Layer 1}"
    store.dispose()


LEGACY_SEPARATOR = "\n\n----- repair reply -----\n\n"


def _rows_by_id(store: Store, name: str) -> dict[int, dict[str, Any]]:
    return {row["id"]: row for row in _snapshot_existing(store)[name]}


def test_revision_0002_moves_legacy_persona_fields(database_url):
    """0001-era personas kept status and failure in ``stats`` and joined two replies in ``raw_reply``."""
    store = Store(database_url, upgrade=False)
    _migrate(store, "upgrade", "0001")
    tables = _existing_tables(store)
    common = {"batch_id": 1, "model": "demo/steady", "judge_model": "demo/judge", "themes": [], "cost_usd": 0.0, "created_at": INSTANT}
    with store.engine.begin() as connection:
        connection.execute(insert(tables["batches"]).values({name: _sample_value(Batch.__table__.c[name]) for name in tables["batches"].c.keys()}))
        connection.execute(
            insert(tables["personas"]),
            [
                {**common, "id": 1, "archetype": "Leader", "stats": {"runs": 2, "archetype_rule": "rule", "status": "ok", "dropped_citations": 2}, "description": "d", "evidence": [], "raw_reply": "{}"},
                {**common, "id": 2, "archetype": "Drifter", "stats": {"runs": 2, "status": "parse_failed", "failure": "no_json: the reply contains no JSON object"}, "description": None, "evidence": None, "raw_reply": "first" + LEGACY_SEPARATOR + "second"},
                {**common, "id": 3, "archetype": "Drifter", "stats": {"runs": 1}, "description": "d", "evidence": [], "raw_reply": None},
            ],
        )
        connection.execute(
            insert(tables["syntheses"]),
            [
                {**common, "id": 1, "status": "ok", "raw_reply": LEGACY_SEPARATOR + '{"themes": []}'},
                {**common, "id": 2, "status": "parse_failed", "raw_reply": "only one reply"},
            ],
        )
    legacy_personas = _rows_by_id(store, "personas")
    legacy_syntheses = _rows_by_id(store, "syntheses")

    _migrate(store, "upgrade", "0002")
    personas = _rows_by_id(store, "personas")
    assert personas[1]["stats"] == {"runs": 2, "archetype_rule": "rule"}
    assert personas[1]["status"] == "ok"
    assert personas[1]["dropped_citations"] == 2
    assert personas[1]["repair_reply"] is None
    assert personas[2]["stats"] == {"runs": 2}
    assert personas[2]["status"] == "parse_failed"
    assert personas[2]["failure_reason"] == "no_json"
    assert personas[2]["failure_detail"] == "the reply contains no JSON object"
    assert personas[2]["raw_reply"] == "first"
    assert personas[2]["repair_reply"] == "second"
    assert personas[3]["stats"] == {"runs": 1}
    assert personas[3]["status"] == "ok"
    assert personas[3]["dropped_citations"] == 0
    assert personas[3]["failure_reason"] is None
    syntheses = _rows_by_id(store, "syntheses")
    assert syntheses[1]["raw_reply"] == ""
    assert syntheses[1]["repair_reply"] == '{"themes": []}'
    assert syntheses[2]["raw_reply"] == "only one reply"
    assert syntheses[2]["repair_reply"] is None

    # down again: the 0001 layout comes back with every value readers of 0001 saw, but
    # a key equal to the default that those readers assumed for a missing key is left out
    _migrate(store, "downgrade", "0001")
    del legacy_personas[1]["stats"]["status"]
    assert _rows_by_id(store, "personas") == legacy_personas
    assert _rows_by_id(store, "syntheses") == legacy_syntheses

    _migrate(store, "upgrade", "0002")
    assert _rows_by_id(store, "personas") == personas
    assert _rows_by_id(store, "syntheses") == syntheses
    store.dispose()


# ---------------------------------------------------------------- times

INSTANTS = [
    datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    datetime(2026, 10, 25, 1, 30, 0, 1, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, tzinfo=timezone(timedelta(hours=14))),
]


def _session_time_zone_url(database_url: str) -> str:
    """The same database, but every PostgreSQL session runs in a far-off time zone."""
    url = make_url(normalize_database_url(database_url))
    if url.get_backend_name() != "postgresql":
        return database_url
    return url.update_query_dict({"options": "-c timezone=Pacific/Chatham"}).render_as_string(hide_password=False)


def test_times_read_back_as_instants_written(database_url):
    writer = Store(database_url)
    reader = Store(_session_time_zone_url(database_url))

    def write(session):  # type: ignore[no-untyped-def]
        ids = []
        for instant in INSTANTS:
            batch = Batch(name="t", config={}, protocol_id="p", protocol_hash="h", protocol={}, created_at=instant, updated_at=instant, finished_at=instant + timedelta(microseconds=1))
            session.add(batch)
            session.flush()
            ids.append(batch.id)
        return ids

    ids = writer.write(write)
    for store in (writer, reader):
        rows = store.read(lambda session: list(session.scalars(select(Batch).where(Batch.id.in_(ids)).order_by(Batch.id))))
        for row, instant in zip(rows, INSTANTS, strict=True):
            assert row.created_at == instant
            assert row.created_at.utcoffset() == timedelta(0)
            assert row.finished_at - row.created_at == timedelta(microseconds=1)

        # SQL compares and orders by the instant, not by the wall-clock text
        earliest = store.read(lambda session: session.scalar(select(Batch.id).where(Batch.id.in_(ids)).order_by(Batch.created_at).limit(1)))
        assert earliest == ids[INSTANTS.index(min(INSTANTS))]
        later = store.read(lambda session: list(session.scalars(select(Batch.id).where(Batch.id.in_(ids), Batch.created_at > INSTANTS[0]).order_by(Batch.id))))
        assert later == [ids[index] for index, instant in enumerate(INSTANTS) if instant > INSTANTS[0]]
    writer.dispose()
    reader.dispose()


def test_run_times_follow_the_clock(database_url):
    store = Store(database_url)
    before = datetime.now(UTC)
    with DemoServer() as server:
        outcome = run_batch(demo_config(server.base_url, turns=2), store=store, progress=False)
    after = datetime.now(UTC)

    run = store.read(lambda session: session.scalars(select(Run).where(Run.batch_id == outcome.batch_id)).one())
    assert before <= run.created_at <= run.started_at <= run.finished_at <= after
    turns = store.read(lambda session: list(session.scalars(select(Turn.created_at).where(Turn.run_id == run.id).order_by(Turn.idx))))
    assert turns == sorted(turns)
    assert all(before <= moment <= after for moment in turns)
    store.dispose()
