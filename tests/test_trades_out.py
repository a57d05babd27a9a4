"""Trades out: get_trades / get_trades_df in (time, id) order without look-ahead, replay merged and
paced, constant memory and early close."""

import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kraken_hist.query import trades_out
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.testing.history import generate_trades
from kraken_hist.core.types import HistoricalTrade

from .trade_data import by_time_and_id, store_trades

UTC = timezone.utc
T0 = datetime(2025, 2, 3, tzinfo=UTC)
SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD")


def fields(trade):
    return (trade.symbol, trade.trade_id, trade.time, trade.price, trade.volume, trade.side, trade.ord_type)


@pytest.fixture
def market(db_url, conn):
    """Half an hour of three pairs, plus an archive trade (negative id) inside a burst second."""
    trades = {s: generate_trades(s, T0, T0 + timedelta(minutes=30), seed=2, trades_per_minute=15) for s in SYMBOLS}
    late = next(t for t in trades["BTC/USD"] if t.time > T0 + timedelta(minutes=10))
    trades["BTC/USD"].append(HistoricalTrade(symbol="BTC/USD", trade_id=-(10 ** 15) + 3, time=late.time,
                                             price=Decimal("99999.9"), volume=Decimal("0.25")))
    store_trades(conn, [t for s in SYMBOLS for t in trades[s]])
    return trades


def test_get_trades_is_the_stored_range_in_time_then_id_order(db_url, market):
    lo, hi = T0 + timedelta(minutes=3, seconds=7), T0 + timedelta(minutes=21)
    expected = [fields(t) for t in by_time_and_id(market["BTC/USD"]) if lo <= t.time < hi]
    with HistoricalDataProvider(db_url) as provider:
        got = [fields(t) for t in provider.get_trades("XBTUSD", lo, hi, batch_size=50)]
        assert got == expected
        assert any(t[1] < 0 for t in got)  # the archive trade sorts by time, before ids of its second
        assert [fields(t) for t in provider.get_trades("BTC/USD")] == [fields(t) for t in by_time_and_id(market["BTC/USD"])]


def test_nothing_after_now(db_url, market):
    now = T0 + timedelta(minutes=12, seconds=30)
    with HistoricalDataProvider(db_url, clock=lambda: now) as provider:
        got = list(provider.get_trades("ETH/USD", T0, T0 + timedelta(hours=1)))
        replayed = list(provider.replay_trades(["ETH/USD", "SOL/USD"], T0))
    assert [fields(t) for t in got] == [fields(t) for t in by_time_and_id(market["ETH/USD"]) if t.time < now]
    assert replayed and max(t.time for t in replayed) < now


@pytest.mark.parametrize("arrow", [True, False], ids=["copy+pyarrow", "tuples"])
def test_frames_float_and_exact(db_url, market, monkeypatch, arrow):
    monkeypatch.setattr(trades_out, "has_pyarrow", lambda: arrow)
    expected = by_time_and_id(market["SOL/USD"])
    with HistoricalDataProvider(db_url) as provider:
        frame = provider.get_trades_df("SOL/USD")
        exact = provider.get_trades_df("SOL/USD", exact=True)
        chunks = list(provider.iter_trades_df("SOL/USD", chunk_rows=100))
        empty = provider.get_trades_df("SOL/USD", T0 - timedelta(days=2), T0 - timedelta(days=1))
    assert list(frame.columns) == ["trade_id", "price", "volume", "side", "ord_type"]
    assert str(frame.index.tz) == "UTC" and frame.index.name == "time"
    assert [ts.to_pydatetime() for ts in frame.index] == [t.time for t in expected]
    assert frame["trade_id"].tolist() == [t.trade_id for t in expected]
    assert frame["price"].dtype == "float64" and frame["price"].tolist() == [float(t.price) for t in expected]
    assert frame["volume"].tolist() == [float(t.volume) for t in expected]
    assert [str(v) for v in exact["price"]] == [str(t.price) for t in expected]  # the stored digits, exactly
    assert [str(v) for v in exact["volume"]] == [str(t.volume) for t in expected]
    assert frame["side"].tolist() == [t.side for t in expected]
    assert [len(c) for c in chunks] == [100] * (len(expected) // 100) + ([len(expected) % 100] if len(expected) % 100 else [])
    assert empty.empty and list(empty.columns) == list(frame.columns)


def test_replay_merges_symbols_by_time_then_id(db_url, market):
    lo, hi = T0 + timedelta(minutes=2), T0 + timedelta(minutes=9)
    expected = sorted((t for s in SYMBOLS for t in market[s] if lo <= t.time < hi),
                      key=lambda t: (t.time, t.trade_id, t.symbol))
    with HistoricalDataProvider(db_url) as provider:
        got = [fields(t) for t in provider.replay_trades(list(SYMBOLS), lo, hi, batch_size=64)]
        with pytest.raises(ValueError, match="speed"):
            next(provider.replay_trades("BTC/USD", lo, hi, speed=-1))
    assert got == [fields(t) for t in expected]


def test_replay_is_paced_by_market_time(db_url, conn):
    trades = [HistoricalTrade(symbol="BTC/USD", trade_id=i + 1, time=T0 + timedelta(seconds=s), price=Decimal(100),
                              volume=Decimal(1)) for i, s in enumerate((0.5, 1.0, 2.0))]
    store_trades(conn, trades)
    with HistoricalDataProvider(db_url) as provider:
        began = time.monotonic()
        seen = [(t.trade_id, time.monotonic() - began)
                for t in provider.replay_trades("BTC/USD", T0, T0 + timedelta(minutes=1), speed=2)]
        waits = []
        fast = [t.trade_id for t in provider.replay_trades("BTC/USD", T0, T0 + timedelta(minutes=1), speed=0.5,
                                                           sleep=waits.append)]
    # released when each trade's time comes on a clock from T0 at twice the wall speed: 0.25 s, 0.5 s, 1 s
    assert [i for i, _ in seen] == [1, 2, 3] == fast
    assert seen[0][1] >= 0.2 and seen[1][1] >= 0.45 and 0.95 <= seen[2][1] <= 2.5
    assert len(waits) == 3 and waits[0] == pytest.approx(1.0, abs=0.2) and waits[2] == pytest.approx(4.0, abs=0.2)


def _bulk(conn, rows):
    conn.execute(
        """
        INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
        SELECT 'BTC/USD', g, %s + g * interval '10 milliseconds', 100000 + g %% 101, 0.01 + (g %% 7) * 0.001,
               'b', 'l', 'rest'
        FROM generate_series(1, %s) g
        """,
        (T0, rows),
    )
    conn.commit()


def _peak(provider, rows):
    tracemalloc.start()
    try:
        count = sum(1 for _ in provider.get_trades("BTC/USD", T0, T0 + timedelta(seconds=rows / 100), batch_size=2000))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_and_an_early_close_ends_the_query(db_url, conn):
    _bulk(conn, 100_000)
    with HistoricalDataProvider(db_url) as provider:
        small_count, small_peak = _peak(provider, 10_000)
        large_count, large_peak = _peak(provider, 100_000)
        assert (small_count, large_count) == (9_999, 99_999)  # g * 10 ms < end: the last one is left out
        assert large_peak < small_peak * 1.5 + 512 * 1024  # a chunk of rows, not 100k trades (~30 MB)
        stream = provider.get_trades("BTC/USD", T0)
        assert next(stream).trade_id == 1
        stream.close()
    conn.autocommit = True

    def streaming() -> list[tuple]:
        return conn.execute("SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() AND query LIKE '%FROM trades%'").fetchall()

    assert ("active",) not in streaming()  # the query has ended
    # and its connection: closed by the client at once, its server process gone a moment later
    deadline = time.monotonic() + 5
    while streaming() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streaming() == []
