"""replay_candles: order, multi-symbol merge, pacing, constant memory."""

import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kraken_hist.core.errors import DatabaseUnavailableError
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.core.types import CandleRecord

from .trade_data import insert_candles

UTC = timezone.utc
T0 = datetime(2025, 3, 5, tzinfo=UTC)


def minute(symbol, m, price="10"):
    p = Decimal(price)
    return CandleRecord(symbol=symbol, time=T0 + timedelta(minutes=m), open=p, high=p, low=p, close=p,
                        volume=Decimal(1), vwap=p, trades=1)


def generate_minutes(conn, symbol, count):
    """`count` consecutive minutes from T0, generated server-side (fast)."""
    conn.execute(
        """
        INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source)
        SELECT %s, %s + make_interval(mins => g), 100 + g %% 7, 110 + g %% 7, 90 + g %% 7, 101 + g %% 7,
               100.5, 1.25, 3, 'trades'
        FROM generate_series(0, %s - 1) AS g
        """,
        (symbol, T0, count),
    )
    conn.commit()


def test_replay_is_in_time_order_and_merges_symbols(db_url, conn):
    insert_candles(conn, [minute("BTC/USD", m) for m in (0, 1, 3, 4, 9)] + [minute("ETH/USD", m) for m in (1, 2, 3, 8)]
                   + [minute("SOL/USD", m) for m in (5,)])
    with HistoricalDataProvider(db_url) as provider:
        single = list(provider.replay_candles("XBTUSD", 1, T0, T0 + timedelta(hours=1)))
        assert [c.time.minute for c in single] == [0, 1, 3, 4, 9]
        merged = list(provider.replay_candles(["ETH/USD", "BTC/USD", "SOL/USD"], 1, T0, T0 + timedelta(hours=1)))
        assert [(c.time.minute, c.symbol[:3]) for c in merged] == [
            (0, "BTC"), (1, "BTC"), (1, "ETH"), (2, "ETH"), (3, "BTC"), (3, "ETH"), (4, "BTC"), (5, "SOL"),
            (8, "ETH"), (9, "BTC")]
        # an arbitrary interval streams aggregated buckets; the end bound excludes unclosed ones
        threes = list(provider.replay_candles(["BTC/USD", "ETH/USD"], 3, T0, T0 + timedelta(minutes=9)))
        assert [(c.time.minute, c.symbol[:3], c.trades) for c in threes] == [
            (0, "BTC", 2), (0, "ETH", 2), (3, "BTC", 2), (3, "ETH", 1), (6, "ETH", 1)]
        with pytest.raises(ValueError, match="speed"):
            next(provider.replay_candles("BTC/USD", 1, T0, speed=-1))


def test_replay_is_paced_by_speed(db_url, conn):
    insert_candles(conn, [minute("BTC/USD", m) for m in range(3)])
    with HistoricalDataProvider(db_url) as provider:
        began = time.monotonic()
        seen = []
        for candle in provider.replay_candles("BTC/USD", 1, T0, T0 + timedelta(hours=1), speed=60):
            seen.append((candle.time.minute, time.monotonic() - began))
        elapsed = time.monotonic() - began
    # each candle is released when its minute closes on the replay clock: at ~1 s, 2 s, 3 s
    assert [m for m, _ in seen] == [0, 1, 2]
    assert 2.5 <= elapsed <= 4.5
    assert seen[0][1] >= 0.8 and seen[1][1] >= 1.8


def _peak_while_replaying(provider, rows):
    tracemalloc.start()
    try:
        count = 0
        for _candle in provider.replay_candles("BTC/USD", 1, T0, T0 + timedelta(minutes=rows), batch_size=2000):
            count += 1
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _replay_backends(conn):
    """(state, wait_event) of the server backends running a replay's SELECT, other than `conn`."""
    return conn.execute(
        "SELECT state, wait_event FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query LIKE 'SELECT candles.symbol%'"
    ).fetchall()


def _wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_replay_memory_stays_flat_over_a_large_range(db_url, conn):
    generate_minutes(conn, "BTC/USD", 120_000)
    with HistoricalDataProvider(db_url) as provider:
        small_count, small_peak = _peak_while_replaying(provider, 12_000)
        large_count, large_peak = _peak_while_replaying(provider, 120_000)
        assert (small_count, large_count) == (12_000, 120_000)
        assert large_peak < 4 * 1024 * 1024  # a few batches (~1 MB seen), not 120k candles (~35 MB as objects)
        assert large_peak < small_peak * 1.5 + 512 * 1024
        # Nor are the rows buffered outside Python's sight (libpq): while the caller holds the
        # first candle, the server is blocked writing the rest to us.
        conn.autocommit = True
        replay = provider.replay_candles("BTC/USD", 1, T0, T0 + timedelta(minutes=120_000), batch_size=2000)
        assert next(replay).time == T0
        assert _wait_for(lambda: ("active", "ClientWrite") in _replay_backends(conn)), _replay_backends(conn)
        replay.close()  # stopping early ends the query and closes the stream's connection
        assert _wait_for(lambda: _replay_backends(conn) == []), _replay_backends(conn)
        assert provider._reader.engine.pool.checkedout() == 0


def test_replay_refuses_a_batch_size_below_one_and_reports_an_outage(db_url):
    with HistoricalDataProvider(db_url) as provider:
        with pytest.raises(ValueError, match="batch_size"):
            next(provider.replay_candles("BTC/USD", 1, T0, batch_size=0))
    gone = HistoricalDataProvider("postgresql://postgres@127.0.0.1:9/nothing")
    with pytest.raises(DatabaseUnavailableError):
        next(gone.replay_candles("BTC/USD", 1, T0))
