"""Shared fixtures: a real PostgreSQL per test (a migrated template copied per test), Redis,
settings, a fake exchange. Shared functions are in ``helpers.py`` and ``trade_data.py``.

The server is, in order: KRAKEN_HIST_TEST_ADMIN_URL if set, the local PostgreSQL at
127.0.0.1:5432 if it answers, else an embedded PostgreSQL started for this session.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from kraken_hist.core.config import PREFIX, Settings
from kraken_hist.core.timeutils import floor_minute, utcnow

from .helpers import LIVE_SYMBOLS, close_to_connections, create_database, drop_database

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


@pytest.fixture
def exchange():
    """A fake Kraken (REST and WebSocket) trading LIVE_SYMBOLS for the last ten minutes:
    (market, ws, rest). A module may define its own ``exchange``; that one wins there."""
    from kraken_hist.testing.fake_rest import FakeKrakenREST
    from kraken_hist.testing.fake_ws import FakeKrakenWS
    from kraken_hist.testing.history import generate_trades
    from kraken_hist.testing.market import FakeMarket

    now = utcnow()
    market = FakeMarket({s: generate_trades(s, floor_minute(now - timedelta(minutes=10)), now, seed=4)
                         for s in LIVE_SYMBOLS})
    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.3) as ws:
        yield market, ws, rest
