"""Information bars (tick, volume, value) in SQL against a plain-Python reference over the same trades."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from itertools import groupby
from math import floor

import psycopg
import pytest

from kraken_hist.query.bars import pieces as bars_pieces

from kraken_hist.query.bars import sql as bars_sql
from kraken_hist.query.bars import BarKind, bars_to_frame, check_size, read_bars
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.testing.history import generate_trades
from kraken_hist.core.types import HistoricalTrade

from .trade_data import store_trades

UTC = timezone.utc
T0 = datetime(2025, 2, 3, tzinfo=UTC)


def reference_bars(trades, kind, size, decimals, lo, hi):
    """The rule of kraken_hist.query.bars, trade by trade: bar k = floor(total before the trade / size);
    vwap weights a minute that crosses no threshold by its truncated 1-minute vwap, other trades
    by their own price, and is handed out rounded down to `decimals`. Returns dicts, complete
    ones flagged."""
    ordered = [t for t in sorted(trades, key=lambda t: (t.time, t.trade_id)) if lo <= t.time < hi]
    measure = {"tick": lambda t: Fraction(1), "volume": lambda t: Fraction(t.volume),
               "value": lambda t: Fraction(t.price) * Fraction(t.volume)}[kind]
    size = Fraction(size)
    total = Fraction(0)
    numbered = []  # (bar, trade, whole-minute weight or None)
    for _minute, group in groupby(ordered, key=lambda t: t.time.replace(second=0, microsecond=0)):
        minute_trades = list(group)
        before = total
        after = before + sum(measure(t) for t in minute_trades)
        whole = floor(before / size) == floor(after / size)
        volume = sum(Fraction(t.volume) for t in minute_trades)
        truncated = Fraction(floor(sum(Fraction(t.price) * Fraction(t.volume) for t in minute_trades) / volume
                                   * 10 ** decimals), 10 ** decimals)
        for t in minute_trades:
            weight = truncated * Fraction(t.volume) if whole else Fraction(t.price) * Fraction(t.volume)
            numbered.append((floor(total / size), t, weight))
            total += measure(t)
    bars = []
    for number, group in groupby(numbered, key=lambda item: item[0]):
        items = list(group)
        members = [t for _n, t, _w in items]
        volume = sum((t.volume for t in members), Decimal(0))
        vwap = sum(w for _n, _t, w in items) / Fraction(volume)
        bars.append(dict(
            number=number, time=members[0].time, end_time=members[-1].time, open=members[0].price,
            high=max(t.price for t in members), low=min(t.price for t in members), close=members[-1].price,
            volume=volume, vwap=Fraction(floor(vwap * 10 ** decimals), 10 ** decimals), trades=len(members),
            first_trade_id=members[0].trade_id, last_trade_id=members[-1].trade_id,
            complete=floor(total / size) > number,
        ))
    return bars


def assert_bars(actual, expected, decimals=1):
    """Equal field by field; vwap exactly, at `decimals` places (the pair's, like every candle's)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        got = {k: getattr(a, k) for k in e if k != "vwap"}
        assert got == {k: v for k, v in e.items() if k != "vwap"}, e["number"]
        assert Fraction(a.vwap) == e["vwap"] and a.vwap.as_tuple().exponent == -decimals, (e["number"], a.vwap)


@pytest.fixture
def history(db_url, conn):
    trades = generate_trades("BTC/USD", T0, T0 + timedelta(hours=3), seed=4, trades_per_minute=12)
    # an id-less archive trade (negative synthetic id) sharing a second with id-bearing ones:
    # order is (time, id), whatever the source
    burst = trades[100]
    trades.append(HistoricalTrade(symbol="BTC/USD", trade_id=-(10 ** 15) + 7, time=burst.time,
                                  price=burst.price, volume=Decimal("0.5")))
    store_trades(conn, trades)
    return trades


CASES = [("tick", Decimal(37)), ("volume", Decimal("2.5")), ("value", Decimal("180000.5"))]


@pytest.mark.parametrize("kind,size", CASES)
def test_bars_equal_the_reference_from_candles_and_from_trades(db_url, history, kind, size):
    lo = T0 + timedelta(minutes=7, seconds=13, microseconds=5)  # both ends inside a minute
    hi = T0 + timedelta(hours=2, minutes=51, seconds=40)
    expected = reference_bars(history, kind, size, 1, lo, hi)
    assert len(expected) > 10 and all(e["complete"] for e in expected[:-1])
    with HistoricalDataProvider(db_url) as provider:
        forming = provider.get_bars("XBTUSD", kind, size, lo, hi, include_forming=True)
        assert_bars(forming, expected)
        assert_bars(provider.get_bars("BTC/USD", kind, size, lo, hi), [e for e in expected if e["complete"]])
        assert_bars(provider.get_bars("BTC/USD", kind, size, lo, hi, include_forming=True, from_trades=True),
                    expected)
        # whole-minute bounds (no minute cut at either end) take the candle index alone
        whole = provider.get_bars("BTC/USD", kind, size, T0 + timedelta(minutes=5), T0 + timedelta(hours=2),
                                  include_forming=True)
        assert_bars(whole, reference_bars(history, kind, size, 1, T0 + timedelta(minutes=5), T0 + timedelta(hours=2)))
    if kind == "tick":
        assert all(b.trades == 37 for b in forming[:-1]) and not forming[-1].complete


def test_a_trade_is_never_split_and_a_big_one_closes_one_bar(db_url, conn):
    p = Decimal("100.0")
    volumes = ["0.4", "0.4", "3.5", "0.3", "0.9", "0.1", "1"]
    trades = [HistoricalTrade(symbol="BTC/USD", trade_id=i + 1, time=T0 + timedelta(seconds=20 * i), price=p + i,
                              volume=Decimal(v)) for i, v in enumerate(volumes)]
    store_trades(conn, trades)
    with HistoricalDataProvider(db_url) as provider:
        bars = provider.get_bars("BTC/USD", BarKind.VOLUME, 1, T0, T0 + timedelta(hours=1), include_forming=True)
    # running totals before each trade: 0, .4, .8, 4.3, 4.6, 5.5, 5.6 (end 6.6)
    assert [(b.number, b.first_trade_id, b.last_trade_id, b.volume, b.complete) for b in bars] == [
        (0, 1, 3, Decimal("4.3"), True), (4, 4, 5, Decimal("1.2"), True), (5, 6, 7, Decimal("1.1"), True)]
    assert_bars(bars, reference_bars(trades, "volume", 1, 1, T0, T0 + timedelta(hours=1)))


def test_start_defaults_to_the_first_trade_and_nothing_after_now(db_url, history):
    now = T0 + timedelta(hours=1, seconds=30)
    with HistoricalDataProvider(db_url, clock=lambda: now) as provider:
        bars = provider.get_bars("BTC/USD", "tick", 10, include_forming=True)
        frame = provider.get_bars_df("BTC/USD", "tick", 10)
        assert provider.get_bars("ETH/USD", "tick", 10) == []
    first = min(history, key=lambda t: (t.time, t.trade_id))
    assert bars[0].first_trade_id == first.trade_id
    assert bars[-1].end_time < now
    assert_bars(bars, reference_bars(history, "tick", 10, 1, first.time, now))
    assert list(frame.index) == [b.time for b in bars if b.complete]
    assert frame["trades"].tolist() == [10] * len(frame) and frame["open"].dtype == "float64"


@pytest.mark.parametrize("kind,size,message", [
    ("tick", "2.5", "whole number"), ("volume", "0", "positive"), ("volume", 1.5, "never float"),
    ("value", "x", "not a number"),
])
def test_bad_sizes_are_refused(kind, size, message):
    with pytest.raises(ValueError, match=message):
        check_size(BarKind(kind), size)


def test_bars_frame_is_empty_and_typed_without_bars():
    frame = bars_to_frame([])
    assert frame.empty and str(frame.index.tz) == "UTC" and "first_trade_id" in frame.columns


def test_a_start_inside_a_minute_leaves_out_its_earlier_trades(db_url, conn):
    # Regression: the first bar's first trade was looked up in the whole first minute.
    p = Decimal("100.0")
    trades = [HistoricalTrade(symbol="BTC/USD", trade_id=i + 1, time=T0 + timedelta(seconds=5 * i), price=p + i,
                              volume=Decimal("0.1")) for i in range(30)]  # minute 0: ids 1-12, minute 1: 13-24
    store_trades(conn, trades)
    lo, hi = T0 + timedelta(seconds=22), T0 + timedelta(seconds=142)  # from id 6 (0:25) to id 29 (2:20)
    with HistoricalDataProvider(db_url) as provider:
        for kind, size in (("tick", 100), ("volume", 5)):
            bars = provider.get_bars("BTC/USD", kind, size, lo, hi, include_forming=True)
            assert [(b.first_trade_id, b.last_trade_id, b.trades) for b in bars] == [(6, 29, 24)], kind
            assert_bars(bars, reference_bars(trades, kind, size, 1, lo, hi))


@pytest.mark.parametrize("kind,size,workers", [("tick", Decimal(37), 2), ("volume", Decimal("2.5"), 1)])
def test_a_long_range_in_pieces_at_once_equals_one_query(db_url, history, kind, size, workers, monkeypatch):
    # As many pieces as the server gives one parallel query processes; the later ones run on
    # connections opened like the caller's, from the running total before them, all in one
    # snapshot; a bar two pieces hold at their cut becomes one.
    lo = T0 + timedelta(minutes=7, seconds=13, microseconds=5)
    hi = T0 + timedelta(hours=2, minutes=51, seconds=40)
    expected = reference_bars(history, kind, size, 1, lo, hi)
    queries = []
    run = bars_sql.run_query
    monkeypatch.setattr(bars_sql, "run_query",
                        lambda conn, query, params: queries.append(conn) or run(conn, query, params))

    def read(conn, span):
        queries.clear()
        out = read_bars(conn, "BTC/USD", BarKind(kind), size, lo, hi, price_decimals=1, include_forming=True,
                        parallel_span=span)
        return out, len({id(c) for c in queries})

    with psycopg.connect(db_url, autocommit=True, options="-c TimeZone=UTC") as conn:
        conn.execute(f"SET max_parallel_workers_per_gather = {workers}")
        cuts = bars_pieces.cut_points(conn, lo, hi)
        assert len(cuts) == workers + 2
        assert all(any(e["time"] < cut <= e["end_time"] for e in expected) for cut in cuts[1:-1])  # bars are cut
        pieces, connections = read(conn, timedelta(minutes=30))
        one, single = read(conn, None)
        assert (connections, single) == (workers + 1, 1)
        assert pieces == one
        assert_bars(pieces, expected)
        # inside a transaction of the caller's other connections would not see its writes: one query
        with conn.transaction():
            assert read(conn, timedelta(minutes=30)) == (one, 1)
        conn.execute("SET max_parallel_workers_per_gather = 0")  # a server that gives none: one query
        assert read(conn, timedelta(minutes=30)) == (one, 1)


def test_vwap_at_the_price_decimals_given(db_url, history):
    # Whatever the pair's decimals (here 3 asked of BTC/USD's trades), the minutes and the bars'
    # vwap follow them: rounded down, digit for digit the reference.
    lo, hi = T0 + timedelta(minutes=3, seconds=1), T0 + timedelta(hours=1, minutes=2)
    with psycopg.connect(db_url, autocommit=True, options="-c TimeZone=UTC") as conn:
        bars = read_bars(conn, "BTC/USD", BarKind.VOLUME, Decimal("2.5"), lo, hi, price_decimals=3,
                         from_trades=True, include_forming=True)
    assert_bars(bars, reference_bars(history, "volume", Decimal("2.5"), 3, lo, hi), decimals=3)
