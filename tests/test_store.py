"""The shared SQL building blocks against a real PostgreSQL, and against their pure twin."""

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from kraken_hist.storage import store
from kraken_hist.rules.candles import candles_from_trades
from kraken_hist.core.types import HistoricalTrade
from kraken_hist.core.pairs import PAIR_MAP

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def random_trades(n, seed=7):
    rng = random.Random(seed)
    trades, when = [], T0
    for trade_id in range(1, n + 1):
        when += timedelta(microseconds=rng.choice([0, 0, 1, rng.randrange(1, 90_000_000)]))
        trades.append(
            HistoricalTrade(
                symbol="BTC/USD", trade_id=trade_id, time=when,
                price=Decimal(rng.randrange(900000, 1100000)) / 10, volume=Decimal(rng.randrange(1, 10**8)) / 10**8,
                side=rng.choice("bs"), ord_type=rng.choice("ml"),
            )
        )
    return trades


def insert(conn, trades):
    with conn.cursor().copy("COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN") as copy:
        for t in trades:
            copy.write_row((t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, "rest"))


def stored_candles(conn):
    return conn.execute("SELECT time, open, high, low, close, vwap, volume, trades, source FROM candles ORDER BY time").fetchall()


def test_rebuilt_candles_equal_the_pure_twin(conn):
    trades = random_trades(3000)
    insert(conn, trades)
    store.rebuild_candles(conn, "BTC/USD", trades[0].time, trades[-1].time, decimals=PAIR_MAP["BTC/USD"].price_decimals)
    expected = [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, "trades") for c in candles_from_trades(trades)]
    assert stored_candles(conn) == expected


def test_a_minute_split_across_two_pages_comes_out_whole(conn):
    trades = random_trades(400)
    insert(conn, trades[:200])
    store.rebuild_candles(conn, "BTC/USD", trades[0].time, trades[199].time, decimals=PAIR_MAP["BTC/USD"].price_decimals)
    insert(conn, trades[200:])
    store.rebuild_candles(conn, "BTC/USD", trades[200].time, trades[-1].time, decimals=PAIR_MAP["BTC/USD"].price_decimals)
    assert [row[:8] for row in stored_candles(conn)] == [
        (c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades) for c in candles_from_trades(trades)
    ]
    changes = conn.execute("SELECT count(*) FROM candle_changes WHERE symbol = 'BTC/USD'").fetchone()[0]
    assert changes == 2


def test_trades_replace_exchange_candles_and_stale_trade_candles_go(conn):
    minute = T0 + timedelta(minutes=5)
    conn.execute(
        "INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source) VALUES "
        "('BTC/USD', %s, 1, 1, 1, 1, 1, 1, 1, 'ws_ohlc'), ('BTC/USD', %s, 2, 2, 2, 2, 2, 2, 2, 'trades'),"
        "('BTC/USD', %s, 3, 3, 3, 3, 3, 3, 3, 'rest_ohlc')",
        (minute, minute + timedelta(minutes=1), minute + timedelta(minutes=2)),
    )
    trade = HistoricalTrade(symbol="BTC/USD", trade_id=1, time=minute + timedelta(seconds=3), price=Decimal("50.5"), volume=Decimal("2"))
    insert(conn, [trade])
    store.rebuild_candles(conn, "BTC/USD", minute, minute + timedelta(minutes=3), decimals=PAIR_MAP["BTC/USD"].price_decimals)
    rows = stored_candles(conn)
    assert [(r[0], r[1], r[8]) for r in rows] == [
        (minute, Decimal("50.5"), "trades"),  # trades win over the exchange candle
        (minute + timedelta(minutes=2), Decimal(3), "rest_ohlc"),  # no trades there: exchange candle kept
    ]  # the 'trades' candle of a minute without trades is gone


def test_coverage_merges_overlapping_and_adjacent_ranges(conn):
    h = lambda n: T0 + timedelta(hours=n)  # noqa: E731
    store.add_coverage(conn, "BTC/USD", "rest", h(0), h(2))
    store.add_coverage(conn, "BTC/USD", "rest", h(1), h(3))
    store.add_coverage(conn, "BTC/USD", "rest", h(5), h(6))
    store.add_coverage(conn, "BTC/USD", "csv", h(3), h(4))
    store.add_coverage(conn, "BTC/USD", "rest", h(5), h(6))  # idempotent
    store.add_coverage(conn, "ETH/USD", "rest", h(0), h(9))
    assert store.read_coverage(conn, "BTC/USD", "rest") == [(h(0), h(3)), (h(5), h(6))]
    assert store.read_coverage(conn, "BTC/USD") == [(h(0), h(4)), (h(5), h(6))]
    assert store.read_coverage(conn, "SOL/USD") == []


def test_sync_status_upsert_merges_details(conn):
    store.write_sync_status(conn, "BTC/USD", "trades", last_time=T0, cursor="1740787200000000000", last_trade_id=5, details={"pages": 1})
    store.write_sync_status(conn, "BTC/USD", "trades", last_time=T0 + timedelta(hours=1), cursor="2", last_trade_id=9, details={"done": True})
    status = store.read_sync_status(conn, "BTC/USD", "trades")
    assert status["last_time"] == T0 + timedelta(hours=1) and status["cursor"] == "2" and status["last_trade_id"] == 9
    assert status["details"] == {"pages": 1, "done": True}
    assert store.read_sync_status(conn, "BTC/USD", "ohlc") is None


def test_minute_window():
    assert store.minute_window(T0 + timedelta(seconds=30), T0 + timedelta(minutes=2, seconds=1)) == (T0, T0 + timedelta(minutes=3))
    assert store.minute_window(T0, T0) == (T0, T0 + timedelta(minutes=1))
