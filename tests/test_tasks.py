"""Celery tasks on a real worker (real Redis broker, real PostgreSQL): results, data, locks, retries.

One threaded worker (two slots, so two runs can overlap) serves the module on its own queue
in Redis database 15. Tasks read their settings from the environment, as in production.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

import celery_app
from kraken_hist.storage import store
from kraken_hist.core.config import Settings
from kraken_hist.core.errors import PermanentError, TransientError
from kraken_hist.ops.locks import JobLock, lock_name
from kraken_hist.core.pairs import PAIR_MAP

from .helpers import close_app

pytestmark = [pytest.mark.redis]

UTC = timezone.utc
LOCK_TTL = 1.5  # seconds: short, so a dead holder's lock expires within the test
TIMEOUT = 30


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[Celery]:
    app = celery_app.create_app(Settings(redis_url=redis_url))
    app.conf.task_default_queue = f"kraken-hist-test-{uuid.uuid4().hex[:8]}"
    app.conf.kraken_hist_lock_ttl = LOCK_TTL
    app.conf.result_expires = 600
    yield app
    close_app(app)


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[None]:
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=20):
        yield


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def task_env(monkeypatch: pytest.MonkeyPatch, db_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The worker's configuration, as its environment would give it."""
    env = {
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_REDIS_URL": redis_url,
        "KRAKEN_HIST_REST_URL": "http://127.0.0.1:9",
        "KRAKEN_HIST_WS_URL": "ws://127.0.0.1:9",
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
        "KRAKEN_HIST_SYMBOLS": "BTC/USD",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def run(app: Celery, name: str, *args: Any, **kwargs: Any) -> AsyncResult:
    return app.send_task(f"kraken_hist.tasks.{name}", args=list(args), kwargs=kwargs)


def stored_json(rdb: redis.Redis, result: AsyncResult) -> dict[str, Any]:
    """The result as the backend stored it: proves it travelled as JSON."""
    raw = rdb.get(f"celery-task-meta-{result.id}")
    assert raw is not None
    return json.loads(raw)


def insert_trades(db_url: str, symbol: str, start: datetime, count: int, step: timedelta) -> None:
    with psycopg.connect(db_url) as conn:
        for i in range(count):
            conn.execute(
                "INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source) "
                "VALUES (%s, %s, %s, %s, %s, 'b', 'l', 'rest')",
                (symbol, i + 1, start + i * step, Decimal("100.5") + i, Decimal("0.25")),
            )
        store.rebuild_candles(conn, symbol, start, start + count * step, decimals=PAIR_MAP[symbol].price_decimals)


# --- refresh_aggregates: the service that exists in the foundation's neighbourhood ---------


def test_refresh_runs_on_the_worker_and_fills_higher_intervals(
    app: Celery, worker: None, task_env: dict[str, str], db_url: str, rdb: redis.Redis
) -> None:
    start = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    insert_trades(db_url, "BTC/USD", start, 12, timedelta(minutes=1))
    result = run(app, "refresh_aggregates", symbol="BTC/USD")
    value = result.get(timeout=TIMEOUT)
    assert value["status"] == "ok"
    assert value["task"] == "kraken_hist.tasks.refresh_aggregates"
    assert value["symbol"] == "BTC/USD"
    assert value["result"]["changes_consumed"] >= 1
    assert isinstance(value["duration"], float)
    assert stored_json(rdb, result)["result"] == value
    with psycopg.connect(db_url) as conn:
        five = conn.execute("SELECT time, trades FROM candles_5m WHERE symbol = 'BTC/USD' ORDER BY time").fetchall()
        hour = conn.execute("SELECT trades, volume FROM candles_1h WHERE symbol = 'BTC/USD'").fetchall()
    assert [(t.minute, n) for t, n in five] == [(0, 5), (5, 5), (10, 2)]
    assert hour == [(12, Decimal("3.00"))]
    # Idempotent: a second run finds nothing left to do and changes nothing.
    again = run(app, "refresh_aggregates", symbol="BTC/USD").get(timeout=TIMEOUT)
    assert again["status"] == "ok" and again["result"]["changes_consumed"] == 0


def test_refresh_with_an_explicit_window_takes_iso_times(
    app: Celery, worker: None, task_env: dict[str, str], db_url: str
) -> None:
    start = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    insert_trades(db_url, "BTC/USD", start, 3, timedelta(minutes=1))
    value = run(
        app, "refresh_aggregates", symbol="XBTUSD", start="2024-03-04T10:00:00Z", end="2024-03-04T11:00:00"
    ).get(timeout=TIMEOUT)
    assert value["status"] == "ok"
    assert (value["symbol"], value["start"], value["end"]) == (
        "BTC/USD", "2024-03-04T10:00:00+00:00", "2024-03-04T11:00:00+00:00"
    )
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM candles_15m").fetchone() == (1,)


# --- locks ------------------------------------------------------------------------------


def test_a_job_held_elsewhere_reports_already_running_at_once(
    app: Celery, worker: None, task_env: dict[str, str], rdb: redis.Redis
) -> None:
    """What a second worker sees while the first one backfills the same symbol."""
    name = lock_name("kraken_hist.tasks.backfill_symbol", "BTC/USD")
    other = JobLock(rdb, name, ttl=10)
    assert other.acquire("first-worker")
    holder = other.token
    try:
        began = time.monotonic()
        value = run(app, "backfill_symbol", "XBTUSD", since="2024-01-01").get(timeout=TIMEOUT)
        assert time.monotonic() - began < 5
    finally:
        other.release()
    assert value["status"] == "already running"
    assert value["symbol"] == "BTC/USD" and value["since"] == "2024-01-01T00:00:00+00:00"
    assert value["held_by"] == {"BTC/USD": holder}
    assert rdb.get(name) is None


def test_the_lock_of_a_dead_worker_expires_and_the_job_runs_again(
    app: Celery, worker: None, task_env: dict[str, str], rdb: redis.Redis
) -> None:
    name = lock_name("kraken_hist.tasks.refresh_aggregates", "BTC/USD")
    rdb.set(name, "dead-host:4242:killed-task", px=int(LOCK_TTL * 1000))  # what a killed worker leaves
    first = run(app, "refresh_aggregates", symbol="BTC/USD").get(timeout=TIMEOUT)
    assert first["status"] == "already running"
    assert first["held_by"] == {"BTC/USD": "dead-host:4242:killed-task"}
    deadline = time.monotonic() + LOCK_TTL + 3
    while rdb.exists(name):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = run(app, "refresh_aggregates", symbol="BTC/USD").get(timeout=TIMEOUT)
    assert second["status"] == "ok"
    assert rdb.get(name) is None  # released after the run


def test_locks_are_per_symbol(app: Celery, worker: None, task_env: dict[str, str], rdb: redis.Redis) -> None:
    other = JobLock(rdb, lock_name("kraken_hist.tasks.refresh_aggregates", "ETH/USD"), ttl=10)
    assert other.acquire()
    try:
        value = run(app, "refresh_aggregates", symbol="BTC/USD").get(timeout=TIMEOUT)
    finally:
        other.release()
    assert value["status"] == "ok"


# --- failures ------------------------------------------------------------------------------


def test_a_permanent_error_fails_at_once_without_retry(
    app: Celery, worker: None, task_env: dict[str, str], rdb: redis.Redis
) -> None:
    result = run(app, "backfill_symbol", "NOTAPAIR")
    # UnknownSymbolError travels as its nearest JSON-rebuildable base class, PermanentError.
    with pytest.raises(PermanentError, match="unknown symbol 'NOTAPAIR'"):
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    meta = stored_json(rdb, result)
    assert meta["status"] == "FAILURE" and meta["retries"] == 0


def test_a_bad_time_argument_fails_naming_the_argument(app: Celery, worker: None, task_env: dict[str, str]) -> None:
    result = run(app, "refresh_aggregates", start="last tuesday")
    with pytest.raises(ValueError, match="start: cannot read time"):
        result.get(timeout=TIMEOUT)


def test_a_transient_error_is_retried_with_back_off(
    app: Celery, worker: None, task_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, rdb: redis.Redis
) -> None:
    monkeypatch.setenv("KRAKEN_HIST_DATABASE_URL", "postgresql://postgres@127.0.0.1:9/nowhere")
    result = run(app, "refresh_aggregates", symbol="BTC/USD")
    try:
        deadline = time.monotonic() + TIMEOUT
        while result.state != "RETRY":
            assert result.state == "PENDING", result.state
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "PostgreSQL is unavailable" in str(result.info)
        assert isinstance(result.info, TransientError), type(result.info)
        assert stored_json(rdb, result)["result"]["exc_type"] == "DatabaseUnavailableError"
        # The lock was released before the retry was scheduled.
        assert rdb.get(lock_name("kraken_hist.tasks.refresh_aggregates", "BTC/USD")) is None
    finally:
        result.revoke()


def test_import_of_a_missing_file_fails_without_retry(app: Celery, worker: None, task_env: dict[str, str], tmp_path: Path) -> None:
    result = run(app, "import_csv", str(tmp_path / "XBTUSD.csv"))
    with pytest.raises(FileNotFoundError, match="no file or directory .*XBTUSD.csv"):
        result.get(timeout=TIMEOUT)


# --- backfill_symbol against the fake Kraken REST exchange -------------------------------

HISTORY_START = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def history() -> list[Any]:
    generate_trades = pytest.importorskip("kraken_hist.testing.history").generate_trades
    return generate_trades("BTC/USD", HISTORY_START, HISTORY_START + timedelta(hours=2), seed=7)


@pytest.fixture
def fake_rest(history: list[Any], task_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    pytest.importorskip("kraken_hist.ingest.backfill")
    from kraken_hist.testing.fake_rest import FakeKrakenREST
    from kraken_hist.testing.market import FakeMarket

    with FakeKrakenREST(FakeMarket({"BTC/USD": history}), slow_seconds=1.5) as fake:
        monkeypatch.setenv("KRAKEN_HIST_REST_URL", fake.url)
        task_env["KRAKEN_HIST_REST_URL"] = fake.url
        yield fake


def test_backfill_runs_on_the_worker_and_the_trades_land(
    app: Celery, worker: None, fake_rest: Any, history: list[Any], db_url: str, rdb: redis.Redis
) -> None:
    result = run(app, "backfill_symbol", "BTC/USD", since="2024-01-01")
    value = result.get(timeout=TIMEOUT)
    assert value["status"] == "ok", value
    assert value["result"]["trades_stored"] == len(history)
    assert value["result"]["last_trade_id"] == history[-1].trade_id
    assert stored_json(rdb, result)["result"] == value
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*), max(trade_id) FROM trades WHERE symbol = 'BTC/USD'").fetchone() == (
            len(history), history[-1].trade_id
        )
        assert conn.execute("SELECT count(*) FROM candles WHERE symbol = 'BTC/USD'").fetchone()[0] > 0
    # Idempotent: running it again stores nothing new.
    again = run(app, "backfill_symbol", "BTC/USD", since="2024-01-01").get(timeout=TIMEOUT)
    assert again["status"] == "ok" and again["result"]["trades_stored"] == 0
    assert rdb.get(lock_name("kraken_hist.tasks.backfill_symbol", "BTC/USD")) is None


def test_two_backfills_of_one_symbol_at_once_one_runs_one_reports_already_running(
    app: Celery, worker: None, fake_rest: Any, history: list[Any], db_url: str
) -> None:
    fake_rest.inject("slow", 1)  # the first call of whichever run got the lock takes 1.5 s
    first = run(app, "backfill_symbol", "BTC/USD", since="2024-01-01")
    second = run(app, "backfill_symbol", "BTC/USD", since="2024-01-01")
    values = [first.get(timeout=TIMEOUT), second.get(timeout=TIMEOUT)]
    assert sorted(v["status"] for v in values) == ["already running", "ok"]
    ran = next(v for v in values if v["status"] == "ok")
    skipped = next(v for v in values if v["status"] != "ok")
    assert ran["result"]["trades_stored"] == len(history)
    assert list(skipped["held_by"]) == ["BTC/USD"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone() == (len(history),)



# --- import_csv --------------------------------------------------------------------------


def test_import_csv_runs_on_the_worker_and_the_trades_land(
    app: Celery, worker: None, task_env: dict[str, str], db_url: str, tmp_path: Path, rdb: redis.Redis
) -> None:
    pytest.importorskip("kraken_hist.ingest.archive.importer")
    file = tmp_path / "XBTUSD.csv"  # Time and Sales: no header, timestamp,price,volume
    file.write_text("1704067200,42000.1,0.5\n1704067201,42001.0,0.25\n1704067265,41999.9,1.0\n")
    result = run(app, "import_csv", str(file))
    value = result.get(timeout=TIMEOUT)
    assert value["status"] == "ok", value
    assert (value["path"], value["symbol"]) == (str(file), None)
    assert value["result"]["imported"] == 3 and value["result"]["symbol"] == "BTC/USD"
    assert stored_json(rdb, result)["result"] == value
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT price, volume, source FROM trades ORDER BY time").fetchall()
    assert rows == [
        (Decimal("42000.1"), Decimal("0.5"), "csv"),
        (Decimal("42001.0"), Decimal("0.25"), "csv"),
        (Decimal("41999.9"), Decimal("1.0"), "csv"),
    ]
    again = run(app, "import_csv", str(file), symbol="XBTUSD").get(timeout=TIMEOUT)
    assert again["status"] == "ok" and again["symbol"] == "BTC/USD"
    assert again["result"]["imported"] == 0
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone() == (3,)


def test_import_csv_takes_a_directory(
    app: Celery, worker: None, task_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    pytest.importorskip("kraken_hist.ingest.archive.importer")
    folder = tmp_path / "TimeAndSales_Combined"
    folder.mkdir()
    (folder / "XBTUSD.csv").write_text("1704067200,42000.1,0.5\n")
    (folder / "ETHUSD.csv").write_text("1704067200,2300.55,2\n1704067260,2301.00,1\n")
    value = run(app, "import_csv", str(folder)).get(timeout=TIMEOUT)
    assert value["status"] == "ok", value
    assert sorted((f["symbol"], f["imported"]) for f in value["result"]["files"]) == [("BTC/USD", 1), ("ETH/USD", 2)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT symbol, count(*) FROM trades GROUP BY 1 ORDER BY 1").fetchall() == [
            ("BTC/USD", 1), ("ETH/USD", 2)
        ]


# --- fill_gaps ---------------------------------------------------------------------------


def store_with_hole(db_url: str, history: list[Any], hole: range) -> None:
    """Store `history` minus the trades whose ids are in `hole` (a jump in the id sequence)."""
    kept = [t for t in history if t.trade_id not in hole]
    with psycopg.connect(db_url) as conn:
        with conn.cursor().copy(
            "COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
        ) as copy:
            for t in kept:
                copy.write_row((t.symbol, t.trade_id, t.time, t.price, t.volume, None, None, "rest"))
        store.rebuild_candles(conn, "BTC/USD", kept[0].time, kept[-1].time + timedelta(minutes=1), decimals=PAIR_MAP["BTC/USD"].price_decimals)


def test_fill_gaps_runs_on_the_worker_and_repairs_a_hole(
    app: Celery, worker: None, fake_rest: Any, history: list[Any], db_url: str, rdb: redis.Redis
) -> None:
    pytest.importorskip("kraken_hist.gaps.filler")
    store_with_hole(db_url, history, range(1000, 1300))
    result = run(app, "fill_gaps", symbols=["XBTUSD"])
    value = result.get(timeout=TIMEOUT)
    assert value["status"] == "ok", value
    assert value["symbols"] == ["BTC/USD"] and value["result"]["filled_symbols"] == ["BTC/USD"]
    assert value["result"]["found"] >= 1 and value["result"]["failed"] == 0
    assert stored_json(rdb, result)["result"] == value
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone() == (len(history),)


def test_fill_gaps_skips_the_symbols_filled_elsewhere(
    app: Celery, worker: None, fake_rest: Any, rdb: redis.Redis
) -> None:
    pytest.importorskip("kraken_hist.gaps.filler")
    other = JobLock(rdb, lock_name("kraken_hist.tasks.fill_gaps", "ETH/USD"), ttl=10)
    assert other.acquire("other-worker")
    holder = other.token
    try:
        value = run(app, "fill_gaps", symbols=["BTC/USD", "ETH/USD"]).get(timeout=TIMEOUT)
        everything_busy = run(app, "fill_gaps", symbols=["ETH/USD"]).get(timeout=TIMEOUT)
    finally:
        other.release()
    assert value["status"] == "ok", value
    assert value["result"]["filled_symbols"] == ["BTC/USD"]
    assert value["already_running"] == {"ETH/USD": holder}
    assert everything_busy["status"] == "already running"
    assert everything_busy["held_by"] == {"ETH/USD": holder}
