"""What the benchmarks share: a scratch database on the server ``--admin-url`` names (plain
PostgreSQL or TimescaleDB), which of the two it is, and limit tables shaped like ours.

Every benchmark divides its figures by a limit measured in the same run on the same server;
nothing here is a constant goal. On TimescaleDB the policies of the scratch database are
paused (``alter_job(scheduled => false)``): a compression or refresh job starting in the
middle of a measurement would measure the job, not us.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import urllib.parse
import uuid
from typing import Iterator

import psycopg
from psycopg import sql

DEFAULT_ADMIN_URL = os.environ.get("KRAKEN_HIST_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def add_admin_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL,
                        help="server to measure on: plain PostgreSQL or TimescaleDB (default: "
                             "KRAKEN_HIST_TEST_ADMIN_URL, else the local PostgreSQL)")


def url_for(admin_url: str, name: str) -> str:
    """`admin_url` (a postgresql:// URL) pointed at database `name`."""
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def has_timescaledb(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is not None


def flavour(url: str) -> str:
    """``TimescaleDB 2.28.3 on PostgreSQL 15.20`` or ``PostgreSQL 15.20``."""
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0].split()[0]  # type: ignore[index]
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return f"TimescaleDB {row[0]} on PostgreSQL {version}" if row else f"PostgreSQL {version}"


def pause_jobs(url: str) -> None:
    """Unschedule the database's TimescaleDB policies (nothing on plain PostgreSQL)."""
    if not has_timescaledb(url):
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs "
                     "WHERE hypertable_schema = 'public'")


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A fresh database (migrated to head unless told otherwise), dropped afterwards."""
    from kraken_hist.storage import migrate

    name = f"kh_bench_{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_for(admin_url, name)
    try:
        if migrated:
            migrate.upgrade(url)
            pause_jobs(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_like(conn: psycopg.Connection, name: str, source: str = "trades") -> None:
    """A bare table of `source`'s columns, checks and keys; on TimescaleDB a hypertable
    chunked like `source`. The limit a writer into `source` is measured against."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(sql.Identifier(name), sql.Identifier(source)))
    row = conn.execute(
        "SELECT time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = %s", (source,)
    ).fetchone() if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() else None
    if row is not None:
        conn.execute("SELECT create_hypertable(%s::regclass, 'time', chunk_time_interval => %s, "
                     "create_default_indexes => false)", (name, row[0]))


def machine_note() -> str:
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs, load average {load} at start (a shared machine: figures under load are "
            "noisy; the ratios, taken in the same run, are what to compare)")
