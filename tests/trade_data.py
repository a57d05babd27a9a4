"""Generated trades and candles, stored as the writers store them, and compared as the
query layer hands them out: shared by the tests of every path that reads or writes them."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from kraken_hist.core.pairs import PAIR_MAP
from kraken_hist.core.types import CandleRecord
from kraken_hist.rules.candles import vwap_at_decimals
from kraken_hist.storage import store

#: A Wednesday: weeks of random_candles must start on the Monday before.
CANDLES_START = datetime(2025, 3, 5, tzinfo=timezone.utc)


def store_trades(conn, trades, source="rest"):
    """COPY `trades` into ``trades`` and build their 1-minute candles from them (``store``)."""
    with conn.cursor().copy(
        "COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
    ) as copy:
        for t in trades:
            copy.write_row((t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, source))
    for symbol in {t.symbol for t in trades}:
        times = [t.time for t in trades if t.symbol == symbol]
        store.rebuild_candles(conn, symbol, min(times), max(times) + timedelta(microseconds=1),
            decimals=PAIR_MAP[symbol].price_decimals)
    conn.commit()


def by_time_and_id(trades):
    return sorted(trades, key=lambda t: (t.time, t.trade_id))


def random_candles(symbol, rng, days=16, start=CANDLES_START):
    """1-minute candles with holes: quiet minutes, quiet hours, whole quiet days; some minutes
    traded zero volume. vwap is missing (as in OHLCVT imports) on whole days, on a random
    share of the minutes of other days, or nowhere — so buckets of every interval mix minutes
    with and without vwap."""
    out, price = [], Decimal(rng.randrange(1000, 5000))
    for day in range(days):
        if rng.random() < 0.1:
            continue
        r = rng.random()
        no_vwap_day = r < 0.25
        missing_share = 0.5 if r < 0.5 else 0.05 if r < 0.75 else 0.0
        holes = random.Random(r)  # its own stream: the main one stays as it was
        base = start + timedelta(days=day)
        for hour in range(24):
            if rng.random() < 0.15:
                continue
            for minute in range(60):
                if rng.random() < 0.6:
                    continue
                when = base + timedelta(hours=hour, minutes=minute)
                o = price
                c = max(Decimal("0.1"), o + Decimal(rng.randrange(-50, 51)) / 10)
                h = max(o, c) + Decimal(rng.randrange(0, 20)) / 10
                low = max(Decimal("0.1"), min(o, c) - Decimal(rng.randrange(0, 20)) / 10)
                volume = Decimal(0) if rng.random() < 0.02 else Decimal(rng.randrange(1, 10**9)) / 10**8
                vwap = None if no_vwap_day else (low + (h - low) * Decimal(rng.randrange(0, 11)) / 10).quantize(Decimal("0.1"))
                if holes.random() < missing_share:
                    vwap = None
                out.append(CandleRecord(symbol=symbol, time=when, open=o, high=h, low=low, close=c, volume=volume,
                                        vwap=vwap, trades=rng.randrange(1, 40)))
                price = c
    return out


def insert_candles(conn, records, source="trades"):
    """COPY 1-minute `records` into ``candles`` and note the changed minutes for the refresh."""
    with conn.cursor().copy(
        "COPY candles (symbol, time, open, high, low, close, vwap, volume, trades, source) FROM STDIN"
    ) as copy:
        for c in records:
            copy.write_row((c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, source))
    for symbol in {c.symbol for c in records}:
        times = [c.time for c in records if c.symbol == symbol]
        store.record_candle_change(conn, symbol, min(times), max(times) + timedelta(minutes=1))
    conn.commit()


def assert_same(actual, expected):
    """Bucket by bucket; vwap to 12 significant digits (SQL numeric division keeps >= 16)."""
    assert [(c.symbol, c.time) for c in actual] == [(c.symbol, c.time) for c in expected]
    for a, e in zip(actual, expected):
        assert (a.open, a.high, a.low, a.close, a.volume, a.trades) == (e.open, e.high, e.low, e.close, e.volume, e.trades), a.time
        if e.vwap is None:
            assert a.vwap is None, a.time
        else:
            assert a.vwap is not None, a.time
            # the relations hold the exact quotient; the provider gives it at the pair's price
            # decimals, rounded down (issue 18)
            assert abs(a.vwap - e.vwap) <= abs(e.vwap) * Decimal("1e-12") or a.vwap == vwap_at_decimals(
                e.vwap, PAIR_MAP[e.symbol].price_decimals), a.time
