"""Alembic environment: runs unchanged on SQLite (batch mode) and PostgreSQL."""

from alembic import context
from sqlalchemy import text

import core.tables  # noqa: F401  (registers the tables on Base.metadata)
from core.db import Base, make_engine

config = context.config


def run_migrations() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # A batch migration rebuilds a table by copy, drop and rename; with foreign keys on, dropping
            # the old parent table cascade-deletes its children's rows.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite,
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
            if broken:
                raise RuntimeError(f"migration left rows with broken foreign keys: {broken[:5]}")
    engine.dispose()


run_migrations()
