"""Alembic environment: the URL comes from the caller, else KRAKEN_HIST_DATABASE_URL / embedded."""

from __future__ import annotations

from alembic import context
import sqlalchemy as sa
from sqlalchemy import pool

from kraken_hist.storage.db import resolve_database_url, sqlalchemy_url

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return resolve_database_url(url or None)


def run_migrations_offline() -> None:
    raise SystemExit(
        "kraken_hist migrations inspect the live database (TimescaleDB or plain PostgreSQL); "
        "offline --sql mode is not supported. Run them against a database instead."
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sa.create_engine(sqlalchemy_url(_url()), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
