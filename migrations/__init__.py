"""Alembic migrations of the kraken_hist schema (installed as ``kraken_hist._migrations``)."""
