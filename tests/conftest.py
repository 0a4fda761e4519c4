"""Shared fixtures: an isolated environment, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from hermitkit.store import Store, normalize_database_url

# On a loaded 2-core CI machine Hypothesis' time-based health checks and deadlines fail
# tests that are merely slow, which tells nothing about the code under test.
settings.register_profile("hermitkit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hermitkit")

POSTGRES_ENV = "HERMITKIT_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests off the user's real database and keys.

    Without this a test could write into ~/.local/share/hermitkit or send a real
    OPENROUTER_API_KEY from the developer's shell to a test server.
    """
    home = tmp_path_factory.mktemp("hermitkit-home")
    monkeypatch.setenv("HERMITKIT_HOME", str(home))
    for name in ("HERMITKIT_DATABASE_URL", "DATABASE_URL", "OPENROUTER_API_KEY", "HERMITKIT_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def postgres_base_url() -> str | None:
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if url:
        return normalize_database_url(url)
    if os.environ.get("CI"):
        pytest.fail(f"{POSTGRES_ENV} is not set; on CI the PostgreSQL tests must run. Set it in .ci/run.")
    return None


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV}, e.g. postgresql://postgres@127.0.0.1:5432/test")
    name = f"hermitkit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"))
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    handle = Store(database_url)
    yield handle
    handle.dispose()
