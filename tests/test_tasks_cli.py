"""The README's ad-hoc backfill, verbatim: ``celery -A celery_app call ...`` in a subprocess,
against the real Redis, completed by a worker consuming the app's default queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

import celery_app
from kraken_hist.storage import store
from kraken_hist.core.config import Settings
from kraken_hist.core.pairs import PAIR_MAP

from .helpers import celery_command, close_app

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
# Exactly as the README shows it.
README_WORKER = "celery -A celery_app worker -B"
README_CALL = (
    "celery -A celery_app call kraken_hist.tasks.backfill_symbol "
    """--args='["BTC/USD"]' --kwargs='{"since": "2024-01-01"}'"""
)


@pytest.fixture
def fake_rest() -> Iterator[tuple[str, int]]:
    """URL of a fake Kraken REST serving an hour of BTC/USD from 2024-01-01, and its trade count."""
    pytest.importorskip("kraken_hist.ingest.backfill")
    from kraken_hist.testing.fake_rest import FakeKrakenREST
    from kraken_hist.testing.history import generate_trades
    from kraken_hist.testing.market import FakeMarket

    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    trades = generate_trades("BTC/USD", start, start + timedelta(hours=1), seed=3)
    with FakeKrakenREST(FakeMarket({"BTC/USD": trades})) as fake:
        yield fake.url, len(trades)


def test_readme_celery_call_enqueues_a_backfill_that_a_worker_completes(
    fake_rest: tuple[str, int], db_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_REDIS_URL": redis_url,
        "KRAKEN_HIST_REST_URL": fake_rest[0],
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the in-process worker reads its settings from here
    app = celery_app.create_app(Settings.from_env())
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
            completed = subprocess.run(
                celery_command(README_CALL),
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert completed.returncode == 0, completed.stderr
            task_id = completed.stdout.strip().splitlines()[-1]
            value = AsyncResult(task_id, app=app).get(timeout=30)
    finally:
        close_app(app)
    assert value["status"] == "ok", value
    assert value["symbol"] == "BTC/USD" and value["since"] == "2024-01-01T00:00:00+00:00"
    # the README's way to see it as JSON
    shown = subprocess.run([sys.executable, "-m", "kraken_hist", "task", "result", task_id], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"id": task_id, "state": "SUCCESS", "result": value}
    with psycopg.connect(db_url) as conn:
        count = conn.execute("SELECT count(*) FROM trades WHERE symbol = 'BTC/USD'").fetchone()[0]
    assert count == value["result"]["trades_stored"] == fake_rest[1]


def test_readme_worker_with_beat_runs_the_scheduled_refresh(db_url: str, redis_url: str, tmp_path: Path) -> None:
    """`celery -A celery_app worker -B` as written: beat fires the refresh, the worker runs it."""
    start = datetime(2024, 2, 1, tzinfo=timezone.utc)
    with psycopg.connect(db_url) as conn:
        for i in range(7):
            conn.execute(
                "INSERT INTO trades (symbol, trade_id, time, price, volume, source) "
                "VALUES ('BTC/USD', %s, %s, 100.0, 1, 'rest')",
                (i + 1, start + timedelta(minutes=i)),
            )
        store.rebuild_candles(conn, "BTC/USD", start, start + timedelta(minutes=7),
            decimals=PAIR_MAP["BTC/USD"].price_decimals)
    env = {
        **os.environ,
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_REDIS_URL": redis_url,
        "KRAKEN_HIST_REST_URL": "http://127.0.0.1:9",
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
        "KRAKEN_HIST_REFRESH_EVERY": "1",
        "KRAKEN_HIST_GAP_FILL_EVERY": "0",
        "KRAKEN_HIST_BACKFILL_EVERY": "0",
    }
    log = tmp_path / "worker.log"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    with log.open("w") as output:
        worker = subprocess.Popen(
            celery_command(README_WORKER), cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        pending = 1
        while pending:  # the refresh consumed the change rows (on TimescaleDB, real-time
            # aggregation shows candles_5m rows before any refresh: they prove nothing)
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "beat never ran the refresh"
            time.sleep(0.3)
            with psycopg.connect(db_url) as conn:
                pending = conn.execute("SELECT count(*) FROM candle_changes").fetchone()[0]
                rows = conn.execute("SELECT trades FROM candles_5m WHERE symbol = 'BTC/USD' ORDER BY time").fetchall()
        assert rows == [(5,), (2,)]
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, log.read_text()  # a clean warm shutdown
    # beat's schedule file lives in the data directory, not wherever the worker was started
    assert list(workdir.iterdir()) == []
    assert list((tmp_path / "data").glob("celerybeat-schedule*"))
    # task activity shows in the log at the default level (no --loglevel given)
    text = log.read_text()
    assert "Scheduler: Sending due task refresh-aggregates" in text
    assert "Task kraken_hist.tasks.refresh_aggregates[" in text and "succeeded in" in text
    assert "kraken_hist.tasks.refresh_aggregates {" in text and "finished: ok" in text
