"""The first commands a new user runs (issue 18): unreachable Kraken fails fast with advice, a
new symbol's first backfill is recent history only, the progress bar ends at 100 %."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from kraken_hist.cli.main import cli
from kraken_hist.core.errors import ExchangeTransientError, ExchangeUnreachableError
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST, demo_market
from kraken_hist.core.timeutils import utcnow


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake() -> Iterator[FakeKrakenREST]:
    market = demo_market(["BTC/USD"], days=1.0, trades_per_minute=4.0, seed=3, ahead=0)
    with FakeKrakenREST(market) as server:
        yield server


def test_an_unreachable_exchange_is_one_error_within_the_budget() -> None:
    client = KrakenRestClient(f"http://127.0.0.1:{_closed_port()}", min_interval=0, retry_base_delay=0.1,
                              unreachable_after=0.5)
    started = time.monotonic()
    with pytest.raises(ExchangeUnreachableError, match="cannot reach Kraken at .*connection refused.*KRAKEN_HIST_REST_URL"):
        client.get_trades("BTC/USD", since="0")
    assert time.monotonic() - started < 2
    assert isinstance(ExchangeUnreachableError(), ExchangeTransientError)  # Celery still retries it later


def test_backfill_with_kraken_unreachable_fails_within_ten_seconds_saying_what_to_check(db_url: str) -> None:
    # Regression (issue 18): silent for about two minutes (an optional server-time call spent a
    # whole retry cycle before the real call spent another), then a raw urllib3 error.
    env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": f"http://127.0.0.1:{_closed_port()}",
           "KRAKEN_HIST_REST_LIMITER": "process"}
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["backfill", "BTC/USD", "--since", "2024-06-01"], env=env)
    seconds = time.monotonic() - started
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("Error: cannot reach Kraken at http://127.0.0.1:"), lines
    assert "check the network connection" in lines[0] and "kraken-hist demo" in lines[0]
    assert seconds < 10, seconds


def test_a_new_symbol_starts_with_recent_history_and_the_bar_reaches_100(db_url: str, fake: FakeKrakenREST) -> None:
    env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": fake.url,
           "KRAKEN_HIST_REST_MIN_INTERVAL": "0", "KRAKEN_HIST_REST_LIMITER": "process"}
    result = CliRunner().invoke(cli, ["backfill", "BTC/USD"], env=env)
    assert result.exit_code == 0, result.output + result.stderr
    assert "fetching the last 12 hours" in result.stderr and "kraken-hist import" in result.stderr
    assert "100%|" in result.stderr and "720/720" in result.stderr  # 12 hours of minutes
    assert fake.calls["Time"] == 0  # no optional server-time call before the real one
    with psycopg.connect(db_url) as conn:
        first = conn.execute("SELECT min(time) FROM trades").fetchone()[0]
    assert utcnow() - timedelta(hours=12, minutes=2) <= first
    # a second run resumes (no "nothing stored" notice, no older history)
    again = CliRunner().invoke(cli, ["backfill", "BTC/USD", "--no-progress"], env=env)
    assert again.exit_code == 0 and "nothing stored" not in again.stderr


def test_backfill_without_symbols_takes_the_configured_ones(db_url: str, fake: FakeKrakenREST) -> None:
    env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": fake.url, "KRAKEN_HIST_SYMBOLS": "XBTUSD",
           "KRAKEN_HIST_REST_MIN_INTERVAL": "0", "KRAKEN_HIST_REST_LIMITER": "process"}
    result = CliRunner().invoke(cli, ["backfill", "--no-progress"], env=env)
    assert result.exit_code == 0 and result.output.count("BTC/USD:") >= 1, result.output
