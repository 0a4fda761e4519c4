"""Alembic environment for hermitkit.

The library passes an open connection in ``config.attributes["connection"]``. The
``alembic`` command line uses the URL from HERMITKIT_DATABASE_URL, DATABASE_URL or the
default SQLite file, like the library.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from hermitkit.store import Base, default_database_url

target_metadata = Base.metadata


def run_migrations(connection) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch lets ALTER TABLE work on SQLite by copying the table.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    url = context.config.get_main_option("sqlalchemy.url") or default_database_url()
    engine = create_engine(url)
    with engine.begin() as new_connection:
        run_migrations(new_connection)
    engine.dispose()
