"""Gap detection in SQL against a real PostgreSQL: rows inserted directly, no network."""

import random
from datetime import datetime, timedelta, timezone

import pytest

from kraken_hist.rules import ranges as gaps

from kraken_hist.storage import store
from kraken_hist.gaps.detection import read_symbol_gaps
from kraken_hist.testing.history import generate_trades
from kraken_hist.core.types import GapKind, HistoricalTrade
from kraken_hist.core.pairs import PAIR_MAP

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)
SYMBOL = "BTC/USD"


def load(conn, trades, *, source="rest", coverage=None):
    """Store `trades` as a complete backfill would: rows, candles, coverage."""
    with conn.cursor().copy(
        "COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
    ) as copy:
        for t in trades:
            copy.write_row((t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, source))
    if trades:
        store.rebuild_candles(conn, trades[0].symbol, trades[0].time, trades[-1].time + timedelta(microseconds=1), decimals=PAIR_MAP[trades[0].symbol].price_decimals)
    if coverage:
        store.add_coverage(conn, trades[0].symbol if trades else SYMBOL, source, *coverage)
    elif trades:
        # as a backfill from the first trade's minute: that minute's candle is whole (without
        # this its earlier part would be unknown and reported, as a partial first minute is)
        store.add_coverage(conn, trades[0].symbol, source, trades[0].time.replace(second=0, microsecond=0),
                           trades[0].time)
    conn.commit()


def scan(conn, **kwargs):
    result = read_symbol_gaps(conn, SYMBOL, **kwargs)
    conn.rollback()
    return result.gaps


def history(hours=6, **kwargs):
    return generate_trades(SYMBOL, T0, T0 + timedelta(hours=hours), **kwargs)


def test_a_complete_history_has_no_gaps(conn):
    trades = history()
    load(conn, trades, coverage=(T0, T0 + timedelta(hours=6)))
    assert scan(conn) == []


def test_an_empty_database_has_no_gaps(conn):
    assert scan(conn) == []


def test_deleted_trade_ranges_are_reported_exactly(conn):
    trades = history()
    load(conn, trades, coverage=(T0, T0 + timedelta(hours=6)))
    rng = random.Random(3)
    by_id = {t.trade_id: t for t in trades}
    holes = []
    for lo in sorted(rng.sample(range(50, len(trades) - 100, 1), 6)):
        hi = lo + rng.randrange(0, 40)
        if holes and lo <= holes[-1][1] + 1:
            continue
        holes.append((lo, hi))
    for lo, hi in holes:
        conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s", (SYMBOL, lo, hi))
    conn.commit()
    found = scan(conn)
    assert [(g.kind, g.first_missing_id, g.last_missing_id, g.start, g.end) for g in found] == [
        (GapKind.TRADE_IDS, lo, hi, by_id[lo - 1].time, by_id[hi + 1].time) for lo, hi in holes
    ]


def test_a_hole_inside_a_burst_sharing_one_timestamp_is_found(conn):
    trades = history(hours=2)
    burst = next(t for a, t in zip(trades, trades[1:]) if a.time == t.time and a.trade_id > 5)
    load(conn, trades)
    conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id = %s", (SYMBOL, burst.trade_id))
    conn.commit()
    (gap,) = scan(conn)
    assert (gap.first_missing_id, gap.last_missing_id) == (burst.trade_id, burst.trade_id)
    assert gap.start <= burst.time <= gap.end


def test_holes_across_id_blocks_are_found(conn, monkeypatch):
    from kraken_hist.gaps import detection as gap_detection

    monkeypatch.setattr(gap_detection, "ID_BLOCK_BITS", 4)  # blocks of 16 ids: holes straddle them
    trades = history(hours=2)
    load(conn, trades)
    deleted = [(16, 16), (31, 33), (47, 48), (100, 131)]
    for lo, hi in deleted:
        conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s", (SYMBOL, lo, hi))
    conn.commit()
    assert [(g.first_missing_id, g.last_missing_id) for g in scan(conn)] == deleted


def test_missing_newest_trades_are_found_from_the_resume_point(conn):
    trades = history(hours=1)
    load(conn, trades)
    store.write_sync_status(conn, SYMBOL, "trades", last_time=trades[-1].time, cursor="1",
                            last_trade_id=trades[-1].trade_id)
    conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id > %s", (SYMBOL, trades[-11].trade_id))
    conn.commit()
    gaps_found = [g for g in scan(conn) if g.kind is GapKind.TRADE_IDS]
    assert [(g.first_missing_id, g.last_missing_id, g.start, g.end) for g in gaps_found] == [
        (trades[-10].trade_id, trades[-1].trade_id, trades[-11].time, trades[-1].time)
    ]


def test_deleted_candle_ranges_are_reported_as_runs_of_minutes(conn):
    trades = history()
    load(conn, trades, coverage=(T0, T0 + timedelta(hours=6)))
    minutes = [row[0] for row in conn.execute("SELECT time FROM candles ORDER BY time")]
    deleted = minutes[10:14] + minutes[100:101] + minutes[200:230]
    conn.execute("DELETE FROM candles WHERE time = ANY(%s)", (deleted,))
    conn.commit()
    found = scan(conn)
    assert all(g.kind is GapKind.CANDLES for g in found)
    assert [(g.start, g.end) for g in found] == gaps.minute_runs(deleted)


def test_stale_and_exchange_candles_in_traded_minutes_are_reported(conn):
    trades = history(hours=2)
    load(conn, trades)
    minutes = [row[0] for row in conn.execute("SELECT time FROM candles ORDER BY time")]
    conn.execute("UPDATE candles SET close = close + 1, high = high + 1 WHERE time = %s", (minutes[5],))
    conn.execute("UPDATE candles SET source = 'rest_ohlc' WHERE time = %s", (minutes[40],))
    quiet = next(m for a, m in zip(minutes, minutes[1:]) if m - a > timedelta(minutes=1)) - timedelta(minutes=1)
    conn.execute(
        "INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source) "
        "VALUES (%s, %s, 1, 1, 1, 1, 1, 1, 1, 'trades')",
        (SYMBOL, quiet),
    )
    conn.commit()
    found = scan(conn)
    assert [(g.kind, g.start) for g in found] == sorted(
        [(GapKind.CANDLES, minutes[5]), (GapKind.CANDLES, quiet), (GapKind.CANDLES, minutes[40])],
        key=lambda x: x[1],
    )


def test_an_illiquid_pair_with_contiguous_ids_has_no_gaps(conn):
    trades = history(hours=24, trades_per_minute=0.05, quiet_fraction=0.97)
    longest_quiet = max(b.time - a.time for a, b in zip(trades, trades[1:]))
    assert longest_quiet > timedelta(hours=1)  # the test means something
    load(conn, trades)  # no coverage at all: the ids alone prove it complete
    assert scan(conn) == []


def csv_trades(trades):
    """The same trades as an id-less Time and Sales import would store them."""
    return [
        HistoricalTrade(symbol=t.symbol, trade_id=-(i + 1), time=t.time.replace(microsecond=0),
                        price=t.price, volume=t.volume)
        for i, t in enumerate(trades)
    ]


def test_time_no_source_covered_is_reported_and_short_slivers_are_not(conn):
    trades = history(hours=6)
    cut1 = T0 + timedelta(hours=2)
    rest_start = T0 + timedelta(hours=3)
    old = [t for t in trades if t.time < cut1]
    new = [t for t in trades if t.time >= rest_start]
    load(conn, csv_trades(old), source="csv", coverage=(T0, cut1))
    load(conn, new, source="rest", coverage=(rest_start, T0 + timedelta(hours=6)))
    # a 30-second sliver between two coverage ranges is below min_gap_minutes
    store.add_coverage(conn, SYMBOL, "ws", T0 - timedelta(minutes=1), T0 - timedelta(seconds=30))
    conn.commit()
    found = scan(conn)
    assert [(g.kind, g.start, g.end) for g in found] == [(GapKind.UNCOVERED, cut1, rest_start)]
    found_strict = scan(conn, min_gap_minutes=0.25)
    assert [(g.start, g.end) for g in found_strict] == [(T0 - timedelta(seconds=30), T0), (cut1, rest_start)]


def test_ohlc_coverage_does_not_vouch_for_trades(conn):
    trades = history(hours=3)
    cut = T0 + timedelta(hours=1)
    load(conn, csv_trades([t for t in trades if t.time < cut]), source="csv", coverage=(T0, cut))
    load(conn, [t for t in trades if t.time >= cut + timedelta(hours=1)], source="rest",
         coverage=(cut + timedelta(hours=1), T0 + timedelta(hours=3)))
    store.add_coverage(conn, SYMBOL, "ohlc", cut, cut + timedelta(hours=1))
    conn.commit()
    assert [(g.start, g.end) for g in scan(conn)] == [(cut, cut + timedelta(hours=1))]


def test_since_limits_detection_to_newer_data(conn):
    trades = history(hours=4)
    load(conn, trades)
    early, late = trades[100], trades[-100]
    for t in (early, late):
        conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id = %s", (SYMBOL, t.trade_id))
    conn.commit()
    assert [g.first_missing_id for g in scan(conn)] == [early.trade_id, late.trade_id]
    assert [g.first_missing_id for g in scan(conn, since=late.time - timedelta(minutes=5))] == [late.trade_id]


def test_naive_since_is_refused(conn):
    with pytest.raises(ValueError, match="timezone-aware"):
        read_symbol_gaps(conn, SYMBOL, since=datetime(2025, 1, 1))


def test_symbols_do_not_leak_into_each_other(conn):
    load(conn, history(hours=1))
    other = generate_trades("ETH/USD", T0, T0 + timedelta(hours=1), first_trade_id=500)
    load(conn, other[:50] + other[60:])
    assert scan(conn) == []
    eth = read_symbol_gaps(conn, "ETH/USD").gaps
    assert [(g.first_missing_id, g.last_missing_id) for g in eth] == [(550, 559)]
