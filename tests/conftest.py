"""Shared fixtures: a real PostgreSQL per test (a migrated template copied per test), Redis, settings.

The server is, in order: KRAKEN_HIST_TEST_ADMIN_URL if set, the local PostgreSQL at
127.0.0.1:5432 if it answers, else an embedded PostgreSQL started for this session.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from kraken_hist.core.config import PREFIX, Settings

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/15"

_SETTING_VARIABLES = {PREFIX + f.name.upper() for f in fields(Settings)}


@pytest.fixture(autouse=True)
def _scrub_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's KRAKEN_HIST_* configuration."""
    for name in _SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin URL of the PostgreSQL server the suite uses."""
    configured = os.environ.get("KRAKEN_HIST_TEST_ADMIN_URL")
    if configured:
        yield configured
        return
    if _answers(LOCAL_ADMIN_URL):
        yield LOCAL_ADMIN_URL
        return
    from kraken_hist.storage.embedded import start_embedded, stop_embedded

    data_dir = tmp_path_factory.mktemp("embedded-pg")
    yield start_embedded(data_dir, database="postgres")
    stop_embedded(data_dir)


def database_url(admin_url: str, name: str) -> str:
    """`admin_url` pointed at database `name` (keeps host, port, socket query)."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def to_url(conninfo: str) -> str:
    """A libpq key=value string → a postgresql:// URL (what our settings take)."""
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = info.get("host", "")
    user = info.get("user", "postgres")
    port = info.get("port")
    dbname = info.get("dbname", "postgres")
    if host.startswith("/"):
        return f"postgresql://{user}@/{dbname}?host={host}" + (f"&port={port}" if port else "")
    return f"postgresql://{user}@{host}{':' + str(port) if port else ''}/{dbname}"


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        conn.execute(statement)
    return to_url(database_url(admin_url, name))


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> Iterator[tuple[str, bool]]:
    """A database migrated once per session, and whether the migrations took the TimescaleDB
    branch; per-test databases are copies of it."""
    from kraken_hist.storage import migrate

    name = f"kh_tpl_{uuid.uuid4().hex[:10]}"
    url = create_database(pg_admin_url, name)
    migrate.upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        timescale = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is not None
        if timescale:
            # Tests decide when policies run (CALL run_job): a scheduler compressing chunks or
            # refreshing aggregates at random moments of a test would make it nondeterministic.
            conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs "
                         "WHERE hypertable_schema = 'public'")
    close_to_connections(pg_admin_url, name)
    yield name, timescale
    drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def template_database(migrated_template: tuple[str, bool]) -> str:
    """The migrated template's name."""
    return migrated_template[0]


@pytest.fixture(scope="session")
def timescaledb(migrated_template: tuple[str, bool]) -> bool:
    """Whether the suite runs on TimescaleDB (the migrations took that branch)."""
    return migrated_template[1]


def close_to_connections(admin_url: str, name: str, timeout: float = 10.0) -> None:
    """Make database `name` a quiet template: no new connections, none left open.

    ``CREATE DATABASE ... TEMPLATE`` fails while anyone is connected to the template, and
    TimescaleDB's scheduler (a background worker) connects to every database that has the
    extension and allows connections; its launcher skips databases that do not.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        while True:
            pids = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))]
            if not pids:
                return
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if time.monotonic() > deadline:
                raise RuntimeError(f"template database {name} still has connections: {pids}")
            time.sleep(0.05)


@pytest.fixture
def plain_postgresql(timescaledb: bool) -> None:
    """Skip the test on TimescaleDB: it checks what only the plain PostgreSQL schema does."""
    if timescaledb:
        pytest.skip("plain PostgreSQL only (the TimescaleDB schema is tested by tests/test_timescaledb.py)")


@pytest.fixture
def needs_timescaledb(timescaledb: bool) -> None:
    """Skip the test on plain PostgreSQL (KRAKEN_HIST_TEST_ADMIN_URL may point at a TimescaleDB server)."""
    if not timescaledb:
        pytest.skip("needs TimescaleDB: set KRAKEN_HIST_TEST_ADMIN_URL to a server that has it")


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"kh_empty_{uuid.uuid4().hex[:10]}"
    url = create_database(pg_admin_url, name)
    yield url
    drop_database(pg_admin_url, name)


def _migrated_copy(pg_admin_url: str, template_database: str) -> Iterator[str]:
    name = f"kh_t_{uuid.uuid4().hex[:10]}"
    url = create_database(pg_admin_url, name, template=template_database)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for this test only (libpq URL)."""
    yield from _migrated_copy(pg_admin_url, template_database)


@pytest.fixture
def other_db_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A second fresh, migrated database: the reference a test compares `db_url` with."""
    yield from _migrated_copy(pg_admin_url, template_database)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A psycopg connection to this test's database (autocommit off)."""
    with psycopg.connect(db_url) as connection:
        yield connection


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """Settings for this test: its own database and data directory, no real exchange."""
    return Settings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        rest_url="http://127.0.0.1:9",  # discard port: a test that forgets the fake fails fast
        ws_url="ws://127.0.0.1:9",
        rest_min_interval=0.0,
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a Redis to use (database 15); skips the test when none answers."""
    url = os.environ.get("KRAKEN_HIST_TEST_REDIS_URL", LOCAL_REDIS_URL)
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Redis here"
        pytest.skip(f"needs Redis at {url} ({exc.__class__.__name__}); start redis-server to run it")
    return url


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Recorded real Kraken answers (KRAKEN_HIST_SAMPLES_DIR); skips when not available."""
    value = os.environ.get("KRAKEN_HIST_SAMPLES_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("KRAKEN_HIST_SAMPLES_DIR is not set to the recorded Kraken samples")
    return Path(value)
