"""Trades backfill against the fake exchange: exact data, resume after a kill, faults, boundaries."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import psycopg
import pytest
from click.testing import CliRunner

from kraken_hist.storage import store
from kraken_hist.rules.candles import candles_from_trades, resample
from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.rules import ranges
from kraken_hist.cli.main import cli
from kraken_hist.core.errors import ExchangePermanentError
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.timeutils import to_unix_ns
from kraken_hist.core.types import HistoricalTrade

UTC = timezone.utc
START = datetime(2025, 2, 3, tzinfo=UTC)
DAYS = 2


@pytest.fixture(scope="module")
def history() -> list[HistoricalTrade]:
    """Tens of thousands of trades over several days, bursts and quiet minutes included."""
    return generate_trades("BTC/USD", START, START + timedelta(days=DAYS), seed=11, trades_per_minute=9)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START + timedelta(days=DAYS, hours=1))


def serve(history: list[HistoricalTrade], clock: ManualClock, **options: Any) -> FakeKrakenREST:
    return FakeKrakenREST(FakeMarket({"BTC/USD": history}, clock=clock), **options)


@pytest.fixture
def fake(history: list[HistoricalTrade], clock: ManualClock) -> Iterator[FakeKrakenREST]:
    with serve(history, clock) as server:
        yield server


def make_client(url: str) -> KrakenRestClient:
    return KrakenRestClient(url, limiter=RateLimiter(0, backoff_initial=0.02, backoff_max=0.1),
                            retry_base_delay=0.01, timeout=(2.0, 2.0))


@pytest.fixture
def job(db_url: str, fake: FakeKrakenREST) -> Iterator[KrakenTradesBackfill]:
    with KrakenTradesBackfill(db_url, make_client(fake.url)) as backfill:
        yield backfill


def stored_trades(url: str, symbol: str = "BTC/USD") -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT trade_id, time, price, volume, side, ord_type, source FROM trades WHERE symbol = %s "
            "ORDER BY trade_id", (symbol,)).fetchall()


def expected_trades(trades: list[HistoricalTrade]) -> list[tuple]:
    return [(t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, "rest") for t in trades]


def stored_candles(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT time, open, high, low, close, vwap, volume, trades, source FROM candles "
            "WHERE symbol = 'BTC/USD' ORDER BY time").fetchall()


def expected_candles(trades: list[HistoricalTrade]) -> list[tuple]:
    return [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, "trades")
            for c in candles_from_trades(trades)]


def snapshot(url: str) -> dict[str, Any]:
    """Everything a backfill writes, minus wall-clock columns."""
    with psycopg.connect(url) as conn:
        return {
            "trades": stored_trades(url),
            "candles": stored_candles(url),
            "coverage": store.read_coverage(conn, "BTC/USD", "rest"),
            "sync": conn.execute("SELECT symbol, data_type, last_time, cursor, last_trade_id FROM sync_status "
                                 "ORDER BY 1, 2").fetchall(),
        }


# --- planning (pure) ------------------------------------------------------------------------


def test_the_older_windows_to_fetch_are_the_complement_of_the_coverage() -> None:
    """(The backfill asks rules.ranges: coverage merged with normalize, windows by complement.)"""
    t = [START + timedelta(hours=h) for h in range(10)]
    assert ranges.normalize([(t[3], t[4]), (t[1], t[2]), (t[2], t[3]), (t[6], t[5])]) == [(t[1], t[4])]
    assert ranges.complement([], t[0], t[9]) == [(t[0], t[9])]
    assert ranges.complement([(t[0], t[9])], t[0], t[9]) == []
    assert ranges.complement([(t[0], t[2]), (t[4], t[5]), (t[7], t[9])], t[1], t[8]) == [(t[2], t[4]), (t[5], t[7])]
    assert ranges.complement([(t[4], t[5])], t[1], t[3]) == [(t[1], t[3])]
    assert ranges.complement([(t[0], t[9])], t[5], t[5]) == []


# --- full runs ------------------------------------------------------------------------------


def test_full_backfill_equals_the_history(job: KrakenTradesBackfill, db_url: str, history: list,
                                          fake: FakeKrakenREST) -> None:
    assert len(history) > 20_000
    result = job.backfill_symbol("BTC/USD")
    assert stored_trades(db_url) == expected_trades(history)
    assert stored_candles(db_url) == expected_candles(history)
    assert result.trades_fetched == result.trades_stored == len(history)
    assert result.caught_up and not result.reached_until and result.repairs > 0
    point = job.get_resume_point("BTC/USD")
    assert point is not None and point.last_trade_id == history[-1].trade_id
    assert point.last_time == history[-1].time
    with psycopg.connect(db_url) as conn:
        # from the pair's first trade: its minute holds nothing earlier, so coverage starts there
        first_minute = history[0].time.replace(second=0, microsecond=0)
        assert store.read_coverage(conn, "BTC/USD", "rest") == [(first_minute, history[-1].time)]
        # the run refreshed the interval relations: 1h buckets equal the 1-minute data resampled
        hourly = conn.execute("SELECT time, open, high, low, close, volume, trades FROM candles_1h ORDER BY time").fetchall()
        pending = conn.execute("SELECT count(*) FROM candle_changes").fetchone()[0]
    expected_hourly = [(c.time, c.open, c.high, c.low, c.close, c.volume, c.trades)
                       for c in resample(candles_from_trades(history), 60)]
    assert hourly == expected_hourly and pending == 0
    # a second run is caught up at once and changes nothing
    before = snapshot(db_url)
    calls = fake.calls["Trades"]
    again = job.backfill_symbol("BTC/USD")
    assert again.trades_fetched == 0 and again.caught_up
    assert snapshot(db_url) == before
    assert fake.calls["Trades"] - calls == 1
    assert result.to_dict()["last_time"] == history[-1].time.isoformat()


def test_inclusive_since_gives_the_same_data(db_url: str, history: list, clock: ManualClock) -> None:
    part = [t for t in history if t.time < START + timedelta(hours=12)]
    with serve(part, clock, since_inclusive=True) as fake:
        with KrakenTradesBackfill(db_url, make_client(fake.url)) as job:
            job.backfill_symbol("BTC/USD")
    assert stored_trades(db_url) == expected_trades(part)
    assert stored_candles(db_url) == expected_candles(part)


@pytest.mark.parametrize("inclusive", [False, True])
def test_bursts_across_page_boundaries(db_url: str, clock: ManualClock, inclusive: bool) -> None:
    """Regression: with an exclusive `since`, a page ending inside a burst of trades sharing one
    timestamp made the next page skip the rest of the burst."""
    trades = generate_trades("BTC/USD", START, START + timedelta(minutes=40), seed=5, trades_per_minute=30)
    assert max(sum(1 for x in trades if x.time == t.time) for t in trades) == 17
    with serve(trades, clock, since_inclusive=inclusive) as fake:
        with KrakenTradesBackfill(db_url, make_client(fake.url), page_size=25) as job:
            result = job.backfill_symbol("BTC/USD")
    assert stored_trades(db_url) == expected_trades(trades)
    assert stored_candles(db_url) == expected_candles(trades)
    assert result.trades_stored == len(trades)
    if not inclusive:
        assert result.repairs > 0


def test_until_is_exact_and_resume_continues(job: KrakenTradesBackfill, db_url: str, history: list) -> None:
    since = START + timedelta(hours=5, minutes=17, seconds=3)
    until = START + timedelta(hours=20, microseconds=5)
    first = job.backfill_symbol("BTC/USD", since=since, until=until)
    since = since.replace(second=0)  # fetched from the start of its minute: the first candle is whole
    inside = [t for t in history if since <= t.time < until]
    assert stored_trades(db_url) == expected_trades(inside)
    assert first.reached_until and not first.caught_up
    with psycopg.connect(db_url) as conn:
        assert store.read_coverage(conn, "BTC/USD", "rest") == [(since, until)]
    point = job.get_resume_point("BTC/USD")
    assert point is not None and point.last_time == until and point.cursor == str(to_unix_ns(until) - 1)
    second = job.backfill_symbol("BTC/USD")  # resumes at `until`, not at `since`
    after = [t for t in history if t.time >= since]
    assert stored_trades(db_url) == expected_trades(after)
    assert stored_candles(db_url) == expected_candles(after)
    assert second.caught_up and second.trades_stored == len(after) - len(inside)


def test_new_trades_are_picked_up_on_the_next_run(db_url: str, history: list) -> None:
    clock = ManualClock(START + timedelta(hours=10))
    part = [t for t in history if t.time < START + timedelta(hours=14)]
    with serve(part, clock) as fake, KrakenTradesBackfill(db_url, make_client(fake.url)) as job:
        job.backfill_symbol("BTC/USD", since=START)
        visible = [t for t in part if t.time <= clock()]
        assert stored_trades(db_url) == expected_trades(visible)
        clock.advance(timedelta(hours=4))
        job.backfill_symbol("BTC/USD")
    assert stored_trades(db_url) == expected_trades(part)
    assert stored_candles(db_url) == expected_candles(part)


def test_earlier_since_extends_backwards_without_moving_the_resume_point(
    job: KrakenTradesBackfill, db_url: str, history: list
) -> None:
    job.backfill_symbol("BTC/USD", since=START + timedelta(hours=36))
    forward = job.get_resume_point("BTC/USD")
    result = job.backfill_symbol("BTC/USD", since=START + timedelta(hours=12))
    assert result.backward_windows == 1
    assert job.get_resume_point("BTC/USD") == forward
    part = [t for t in history if t.time >= START + timedelta(hours=12)]
    assert stored_trades(db_url) == expected_trades(part)
    assert stored_candles(db_url) == expected_candles(part)
    with psycopg.connect(db_url) as conn:
        assert store.read_coverage(conn, "BTC/USD", "rest") == [(START + timedelta(hours=12), history[-1].time)]
    # asking again for the same range fetches nothing
    assert job.backfill_symbol("BTC/USD", since=START + timedelta(hours=12)).backward_windows == 0


def test_resume_from_a_csv_cursor_without_trade_id(job: KrakenTradesBackfill, db_url: str, history: list) -> None:
    """A CSV import leaves sync_status(cursor=end of file, last_trade_id NULL): REST continues there."""
    end = START + timedelta(hours=30)
    with psycopg.connect(db_url) as conn:
        store.write_sync_status(conn, "BTC/USD", "trades", last_time=end, cursor=str(to_unix_ns(end)),
                                last_trade_id=None)
    job.backfill_symbol("BTC/USD")
    assert stored_trades(db_url) == expected_trades([t for t in history if t.time > end])


# --- failures --------------------------------------------------------------------------------


def test_every_fault_still_gives_exact_data(db_url: str, history: list, clock: ManualClock) -> None:
    part = [t for t in history if t.time < START + timedelta(hours=16)]
    kinds = ["throttle", "5xx", "unavailable", "slow", "drop", "malformed", "520", "429", "busy", "internal",
             "rate_limit", "throttle"]
    with serve(part, clock, slow_seconds=2.5) as fake:

        def next_fault(_progress: object) -> None:  # two faults in a row (three at times) after each page
            for _ in range(2):
                if kinds:
                    fake.inject(kinds.pop(0), count=1 + len(kinds) % 3 // 2, endpoint="Trades")

        next_fault(None)
        with KrakenTradesBackfill(db_url, make_client(fake.url), progress=next_fault) as job:
            result = job.backfill_symbol("BTC/USD")
        assert not kinds and fake.pending_faults() == 0
        assert fake.calls["throttled"] >= 3 and fake.calls["fault:slow"] >= 1
    assert result.caught_up
    assert stored_trades(db_url) == expected_trades(part)
    assert stored_candles(db_url) == expected_candles(part)


def test_unknown_pair_fails_fast(db_url: str, fake: FakeKrakenREST) -> None:
    with KrakenTradesBackfill(db_url, make_client(fake.url)) as job:
        with pytest.raises(ExchangePermanentError, match="ETH/USD refused by Kraken.*Unknown asset pair"):
            job.backfill_symbol("ETH/USD")
    assert fake.calls["Trades"] == 1
    assert stored_trades(db_url, "ETH/USD") == []


def test_store_trades_is_idempotent_and_minutes_come_out_whole(job: KrakenTradesBackfill, db_url: str,
                                                               history: list) -> None:
    minute = history[0].time.replace(second=0, microsecond=0)
    same_minute = [t for t in history if t.time.replace(second=0, microsecond=0) == minute]
    assert len(same_minute) >= 2
    half = len(same_minute) // 2
    assert job.store_trades("BTC/USD", same_minute[half:]) == len(same_minute) - half
    assert job.store_trades("BTC/USD", same_minute[:half]) == half
    assert job.store_trades("BTC/USD", same_minute) == 0
    assert stored_candles(db_url) == expected_candles(same_minute)
    with pytest.raises(ValueError):
        job.store_trades("ETH/USD", same_minute)


# --- kill at any instant, resume ------------------------------------------------------------


def test_killed_runs_resume_to_the_same_database_as_one_clean_run(
    db_url: str, other_db_url: str, history: list, clock: ManualClock
) -> None:
    part = [t for t in history if t.time < START + timedelta(hours=24)]
    rng = random.Random(20250203)
    with serve(part, clock) as fake:
        with KrakenTradesBackfill(other_db_url, make_client(fake.url)) as clean:
            clean.backfill_symbol("BTC/USD", since=START)
        env = {key: value for key, value in os.environ.items() if not key.startswith("KRAKEN_HIST_")}
        env.update(KRAKEN_HIST_DATABASE_URL=db_url, KRAKEN_HIST_REST_URL=fake.url,
                   KRAKEN_HIST_REST_MIN_INTERVAL="0.01")
        command = [sys.executable, "-m", "kraken_hist", "backfill", "BTC/USD", "--no-progress",
                   "--since", START.isoformat()]  # (without it a new symbol starts 12 hours ago)
        kills = 0
        partial: list[int] = []
        for _ in range(3):
            fake.reset_calls()
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kill_at = rng.randint(2, 4)
            deadline = time.monotonic() + 60
            while fake.calls["Trades"] < kill_at and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))  # anywhere inside a page: fetching, parsing or storing
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait(timeout=30)
            partial.append(len(stored_trades(db_url)))
        assert kills >= 2
        assert 0 < partial[0] < len(part)
        assert partial == sorted(partial)
        final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        assert "caught up" in final.stdout
    assert snapshot(db_url) == snapshot(other_db_url)
    assert stored_trades(db_url) == expected_trades(part)


# --- the command line -------------------------------------------------------------------------


def test_cli_backfill(db_url: str, fake: FakeKrakenREST, history: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRAKEN_HIST_DATABASE_URL", db_url)
    monkeypatch.setenv("KRAKEN_HIST_REST_URL", fake.url)
    monkeypatch.setenv("KRAKEN_HIST_REST_MIN_INTERVAL", "0")
    runner = CliRunner()
    until = START + timedelta(hours=6)
    done = runner.invoke(cli, ["backfill", "btc/usd", "--since", START.isoformat(), "--until", until.isoformat()])
    assert done.exit_code == 0, done.output
    assert "BTC/USD:" in done.output and "reached --until" in done.output
    assert stored_trades(db_url) == expected_trades([t for t in history if t.time < until])
    refused = runner.invoke(cli, ["backfill", "ETH/USD", "--no-progress"])
    assert refused.exit_code == 1 and "Unknown asset pair" in refused.output
    bad = runner.invoke(cli, ["backfill", "BTC/USD", "--since", "yesterday-ish"])
    assert bad.exit_code == 2


def test_a_backfill_paces_the_client_it_builds_with_the_limiter_it_is_given(db_url: str) -> None:
    limiter = RateLimiter(0)
    with KrakenTradesBackfill(db_url, limiter=limiter, refresh=False) as job:
        assert job.client.limiter is limiter
