"""A Celery worker as operators run it (a real ``celery worker`` process, prefork pool, real Redis
and PostgreSQL): metrics summed over its pool processes, and a clear first line when the
database is not migrated."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

import celery_app
from kraken_hist.core.config import Settings
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket

from .helpers import celery_command, close_app, free_port, get, scrape, value, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """`celery -A celery_app worker` in a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as output:
            self.proc = subprocess.Popen(celery_command("celery -A celery_app worker " + " ".join(args)),
                                         cwd=log.parent, env=env, stdout=output, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited:\n{self.text()}")
        return True

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def worker_env(db_url: str, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_REDIS_URL": redis_url,
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
        **extra,
    }


@pytest.fixture
def fake_rest() -> Iterator[FakeKrakenREST]:
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    market = FakeMarket({"BTC/USD": generate_trades("BTC/USD", start, start + timedelta(hours=1), seed=5)})
    with FakeKrakenREST(market) as fake:
        yield fake


def test_worker_metrics_sum_every_pool_process(db_url: str, redis_url: str, tmp_path: Path,
                                                fake_rest: FakeKrakenREST) -> None:
    port, queue = free_port(), f"kh-metrics-{uuid.uuid4().hex[:8]}"
    env = worker_env(db_url, redis_url, tmp_path, KRAKEN_HIST_REST_URL=fake_rest.url,
                     KRAKEN_HIST_METRICS_PORT=str(port))
    worker = Worker(env, tmp_path / "worker.log", "--pool", "prefork", "--concurrency", "2", "-Q", queue)
    app = celery_app.create_app(Settings(redis_url=redis_url))
    try:
        wait_for(lambda: worker.alive() and _listening(port) and get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
                 timeout=60, what="the worker's metrics endpoint")
        # two at once (one in each pool process), then two more refreshes one after the other
        results = [app.send_task("kraken_hist.tasks.backfill_symbol", args=["BTC/USD"],
                                 kwargs={"since": "2024-01-01"}, queue=queue),
                   app.send_task("kraken_hist.tasks.refresh_aggregates", queue=queue)]
        outcomes = [r.get(timeout=60) for r in results]
        for _ in range(2):
            outcomes.append(app.send_task("kraken_hist.tasks.refresh_aggregates", queue=queue).get(timeout=60))
        samples = scrape(port)
    finally:
        code = worker.stop()
        close_app(app)
    assert all(o["status"] == "ok" for o in outcomes), outcomes
    assert code == 0, worker.text()
    assert value(samples, "kraken_hist_task_duration_seconds_count", task="kraken_hist.tasks.refresh_aggregates",
                 state="SUCCESS") == 3.0
    assert value(samples, "kraken_hist_task_duration_seconds_count", task="kraken_hist.tasks.backfill_symbol",
                 state="SUCCESS") == 1.0
    assert value(samples, "kraken_hist_rest_calls_total", endpoint="Trades", outcome="ok") == fake_rest.calls["Trades"]
    assert value(samples, "kraken_hist_database_up") == 1.0
    assert value(samples, "kraken_hist_aggregate_lag_seconds") == 0.0  # the backfill refreshed at its end
    assert value(samples, "kraken_hist_newest_candle_age_seconds", symbol="BTC/USD") > 0  # type: ignore[operator]
    assert value(samples, "kraken_hist_rest_blocked_seconds") == 0.0
    # task activity shows in the log at the worker's default level
    log = worker.text()
    assert "kraken_hist.tasks.backfill_symbol" in log and "succeeded in" in log and "started" in log


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_worker_on_an_unmigrated_database_says_so_at_start(empty_db_url: str, redis_url: str,
                                                            tmp_path: Path) -> None:
    queue = f"kh-unmigrated-{uuid.uuid4().hex[:8]}"
    worker = Worker(worker_env(empty_db_url, redis_url, tmp_path), tmp_path / "worker.log",
                    "--pool", "solo", "-Q", queue)
    try:
        wait_for(lambda: worker.alive() and "not ready" in worker.text(),
                 timeout=60, what="the start-up database check")
    finally:
        worker.stop()
    lines = [line for line in worker.text().splitlines() if "not ready" in line]
    assert len(lines) == 1 and "ERROR" in lines[0]
    assert "run `kraken-hist db upgrade`" in lines[0] and "revision none" in lines[0]
