"""The aggregate refresh against the pure twin (rules.candles.resample), on whichever backend the
suite runs; how it rewrites tables row by row is plain PostgreSQL's (TimescaleDB's own
behaviour is in test_timescaledb.py)."""

import random
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from kraken_hist.storage import store
from kraken_hist.rules.candles import resample
from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.rules import ranges
from kraken_hist.rules.sql import bucket_column_pairs, bucket_columns
from kraken_hist.storage.refresh import refresh_aggregates, refresh_order, widen_windows
from kraken_hist.storage.refresh.windows import windows_by_symbol
from kraken_hist.core.types import CandleRecord

from .trade_data import assert_same, insert_candles, random_candles

UTC = timezone.utc
T0 = datetime(2025, 3, 5, tzinfo=UTC)  # a Wednesday: weeks must start on the Monday before
SYMBOLS = ("BTC/USD", "ETH/USD", "DOGE/USD")
COLUMNS = ("open", "high", "low", "close", "volume", "vwap", "trades")


def stored(conn, minutes, symbol):
    rel = INTERVAL_RELATIONS[minutes]
    rows = conn.execute(
        f"SELECT time, open, high, low, close, volume, vwap, trades FROM {rel} WHERE symbol = %s ORDER BY time",
        (symbol,),
    ).fetchall()
    return rows


@pytest.mark.parametrize("seed", [1, 2])
def test_every_interval_equals_the_pure_twin_after_refresh(db_url, conn, seed):
    rng = random.Random(seed)
    data = {s: random_candles(s, rng) for s in SYMBOLS}
    # Insert in two batches so the second refresh is incremental over the first.
    for symbol, records in data.items():
        insert_candles(conn, records[: len(records) // 2])
    first = refresh_aggregates(db_url)
    assert set(first.symbols) == set(SYMBOLS) and first.changes_consumed == 3
    for symbol, records in data.items():
        insert_candles(conn, records[len(records) // 2:])
    refresh_aggregates(db_url)
    assert conn.execute("SELECT count(*) FROM candle_changes").fetchone()[0] == 0
    end = T0 + timedelta(days=60)
    with HistoricalDataProvider(db_url) as provider:
        for symbol in SYMBOLS:
            for minutes in [*INTERVAL_RELATIONS, 3, 10, 45, 120, 720, 20160]:
                # 1m: the stored minutes as they are (resample would drop a zero-volume minute's vwap)
                expected = data[symbol] if minutes == 1 else [c for c in resample(data[symbol], minutes) if c.end <= end]
                actual = provider.get_candles(symbol, minutes, start=T0 - timedelta(days=14), end=end)
                assert_same(actual, expected)


def test_weeks_start_on_monday_and_two_weeks_from_the_monday_origin(db_url, conn):
    rng = random.Random(3)
    insert_candles(conn, random_candles("BTC/USD", rng, days=30))
    refresh_aggregates(db_url)
    weeks = [r[0] for r in stored(conn, 10080, "BTC/USD")]
    assert weeks and all(w.weekday() == 0 and (w.hour, w.minute) == (0, 0) for w in weeks)
    with HistoricalDataProvider(db_url) as provider:
        fortnights = provider.get_candles("BTC/USD", 20160, end=T0 + timedelta(days=60))
    assert fortnights and all(f.time.weekday() == 0 for f in fortnights)
    assert all(Interval(20160).bucket_start(f.time) == f.time for f in fortnights)


def test_changing_one_old_minute_rewrites_exactly_the_buckets_above_it(db_url, conn, plain_postgresql):
    rng = random.Random(4)
    records = random_candles("BTC/USD", rng, days=16)
    insert_candles(conn, records)
    insert_candles(conn, random_candles("ETH/USD", rng, days=16))
    refresh_aggregates(db_url)
    # xmin changes whenever a row is rewritten: the marker of "touched".
    def snapshot():
        return {
            m: dict(conn.execute(f"SELECT symbol || time::text, xmin::text FROM {INTERVAL_RELATIONS[m]}").fetchall())
            for m in refresh_order()
        }
    before = snapshot()
    conn.commit()
    target = records[len(records) // 3]
    conn.execute("UPDATE candles SET high = high + 1000, volume = volume + 1 WHERE symbol = 'BTC/USD' AND time = %s",
                 (target.time,))
    store.record_candle_change(conn, "BTC/USD", target.time, target.time + timedelta(minutes=1))
    conn.commit()
    result = refresh_aggregates(db_url)
    after = snapshot()
    conn.commit()
    for minutes in refresh_order():
        changed = {k for k in after[minutes] if before[minutes].get(k) != after[minutes][k]}
        assert changed == {"BTC/USD" + str(Interval(minutes).bucket_start(target.time)).replace("+00:00", "+00")}, minutes
        assert result.written[minutes] == 1 and result.deleted[minutes] == 0
    assert result.changes_consumed == 1 and result.symbols == ("BTC/USD",)
    # Running again finds nothing to do.
    again = refresh_aggregates(db_url)
    assert again.changes_consumed == 0 and sum(again.written.values()) == 0


def test_buckets_without_data_any_more_are_deleted(db_url, conn, timescaledb):
    rng = random.Random(5)
    records = random_candles("BTC/USD", rng, days=3)
    insert_candles(conn, records)
    refresh_aggregates(db_url)
    day = records[-1].time.replace(hour=0, minute=0)
    conn.execute("DELETE FROM candles WHERE time >= %s", (day,))
    store.record_candle_change(conn, "BTC/USD", day, day + timedelta(days=1))
    conn.commit()
    result = refresh_aggregates(db_url, "XBTUSD")
    assert timescaledb or result.deleted[1440] == 1  # TimescaleDB does not count what it deletes
    remaining = [c for c in records if c.time < day]
    for minutes in refresh_order():
        assert [r[0] for r in stored(conn, minutes, "BTC/USD")] == [c.time for c in resample(remaining, minutes)]


def test_explicit_window_recomputes_regardless_of_change_rows(db_url, conn, plain_postgresql):
    rng = random.Random(6)
    records = random_candles("BTC/USD", rng, days=4)
    insert_candles(conn, records)
    conn.execute("DELETE FROM candle_changes")
    conn.commit()
    assert refresh_aggregates(db_url).written[5] == 0  # no change rows: nothing known to do
    result = refresh_aggregates(db_url, "BTC/USD", start=T0, end=T0 + timedelta(days=10))
    assert result.changes_consumed == 0
    assert [r[0] for r in stored(conn, 60, "BTC/USD")] == [c.time for c in resample(records, 60)]
    # open-ended: from the first stored minute to the last
    conn.execute("TRUNCATE candles_1d")
    conn.commit()
    refresh_aggregates(db_url, start=T0 - timedelta(days=1))
    assert [r[0] for r in stored(conn, 1440, "BTC/USD")] == [c.time for c in resample(records, 1440)]
    with pytest.raises(ValueError, match="after start"):
        refresh_aggregates(db_url, start=T0, end=T0)
    with pytest.raises(ValueError, match="unknown symbol"):
        refresh_aggregates(db_url, "NOPE/USD")


def test_concurrent_refreshes_neither_corrupt_nor_double_and_lose_no_change(db_url, conn):
    rng = random.Random(7)
    records = random_candles("BTC/USD", rng, days=8)
    chunks = [records[i::4] for i in range(4)]
    errors, results = [], []

    def run():
        try:
            results.append(refresh_aggregates(db_url))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    for chunk in chunks:  # writers and refreshers interleaved
        insert_candles(conn, chunk)
        threads = [threading.Thread(target=run, name=f"refresh-{i}") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    refresh_aggregates(db_url)
    assert not errors
    assert sum(r.changes_consumed for r in results) == 4  # each change row consumed exactly once
    with HistoricalDataProvider(db_url) as provider:
        for minutes in INTERVAL_RELATIONS:
            expected = records if minutes == 1 else resample(records, minutes)
            assert_same(provider.get_candles("BTC/USD", minutes, end=T0 + timedelta(days=30)), expected)


def test_a_failed_refresh_keeps_its_change_rows(db_url, conn, timescaledb):
    insert_candles(conn, random_candles("BTC/USD", random.Random(8), days=1))
    kind = "MATERIALIZED VIEW" if timescaledb else "TABLE"
    conn.execute(f"ALTER {kind} candles_1w RENAME TO candles_1w_gone")
    conn.commit()
    with pytest.raises(psycopg.errors.UndefinedTable, match="candles_1w"):
        refresh_aggregates(db_url)
    assert conn.execute("SELECT count(*) FROM candle_changes").fetchone()[0] == 1
    if not timescaledb:  # TimescaleDB commits each level's refresh on its own
        assert conn.execute("SELECT count(*) FROM candles_5m").fetchone()[0] == 0  # rolled back whole
    conn.execute(f"ALTER {kind} candles_1w_gone RENAME TO candles_1w")
    conn.commit()
    assert refresh_aggregates(db_url).changes_consumed == 1


def test_window_arithmetic():
    a = datetime(2025, 1, 1, tzinfo=UTC)
    m = timedelta(minutes=1)
    # change rows' windows are joined by the range algebra: sorted, disjoint, touching ones joined
    assert ranges.normalize([(a + 5 * m, a + 6 * m), (a, a + m), (a + m, a + 2 * m)]) == \
        [(a, a + 2 * m), (a + 5 * m, a + 6 * m)]
    assert windows_by_symbol([("ETH/USD", a + m, a + 2 * m), ("BTC/USD", a, a + m), ("ETH/USD", a, a + m)]) == \
        {"BTC/USD": [(a, a + m)], "ETH/USD": [(a, a + 2 * m)]}
    assert widen_windows([(a + 3 * m, a + 4 * m), (a + 6 * m, a + 7 * m)], Interval(5)) == [(a, a + 10 * m)]
    assert refresh_order() == [5, 15, 30, 60, 240, 1440, 10080]


def test_mixed_vwap_buckets_weight_by_the_minutes_that_have_a_vwap(db_url, conn):
    """A bucket mixing minutes with and without vwap weighs each minute's vwap by its volume at
    every level, stored or on the fly: the children carry vwap_volume (the volume of their
    minutes with a vwap), not their full volume — which would give (10·4 + 20·1)/5 = 12 here."""
    def minute(m, vwap, volume):
        p = Decimal(vwap or 15)
        return CandleRecord(symbol="BTC/USD", time=T0 + timedelta(minutes=m), open=p, high=p, low=p, close=p,
                            volume=Decimal(volume), vwap=Decimal(vwap) if vwap else None, trades=1)

    # 5m bucket 0: 10 @ 1 and a vwap-less 3; bucket 5: 20 @ 1; bucket 10: vwap-less only
    insert_candles(conn, [minute(0, "10", "1"), minute(1, None, "3"), minute(5, "20", "1"), minute(12, None, "2")])
    refresh_aggregates(db_url)
    five = conn.execute("SELECT time, vwap, vwap_volume, volume FROM candles_5m ORDER BY time").fetchall()
    assert [(r[1], r[2], r[3]) for r in five] == [(10, 1, 4), (20, 1, 1), (None, None, 2)]
    for minutes in refresh_order()[1:]:
        (vwap, weight, volume), = conn.execute(
            f"SELECT vwap, vwap_volume, volume FROM {INTERVAL_RELATIONS[minutes]}").fetchall()
        assert (vwap, weight, volume) == (15, 2, 7), minutes
    with HistoricalDataProvider(db_url) as provider:
        for minutes in (15, 60, 10080, 20, 45, 180, 2880, 20160):  # stored, and on the fly from 5m … 1w
            (candle,) = provider.get_candles("BTC/USD", minutes, end=T0 + timedelta(days=30))
            assert (candle.vwap, candle.volume) == (15, 7), minutes
        forming = provider.get_multi_timeframe_candles("BTC/USD", T0 + timedelta(minutes=14), [60], count=1,
                                                       include_forming=True)[60]
        assert [(c.vwap, c.volume) for c in forming] == [(15, 7)]
    # A later minute with a vwap changes the weight all the way up.
    insert_candles(conn, [minute(13, "33", "2")])
    refresh_aggregates(db_url)
    assert conn.execute("SELECT vwap, vwap_volume FROM candles_1w").fetchone() == (Decimal(24), 4)


def test_every_level_is_the_bucket_rule_over_the_minutes_to_the_last_digit(db_url, conn):
    """Every relation's rows, every column, equal the one bucket rule (``rules.sql.bucket_columns``)
    applied straight to the 1-minute candles, digit for digit: each level divides the exact sums
    its minutes' direct weighting divides (vwap_notional, vwap_volume), on plain PostgreSQL (the
    refresh renders the rule level by level) and on TimescaleDB, whose continuous aggregates
    (migration 0003, history as it is) spell the rule with first()/last() instead. (Dividing
    rounded vwaps level by level used to differ by ~1e-12 from 15m up.)"""
    for symbol, seed in (("BTC/USD", 9), ("ETH/USD", 10)):
        insert_candles(conn, random_candles(symbol, random.Random(seed), days=16))
    refresh_aggregates(db_url)
    names = [name for name, _expression in bucket_column_pairs(1)]
    for minutes in refresh_order():
        iv = Interval(minutes)
        direct = conn.execute(f"""
            SELECT p.symbol, date_bin(%s, p.time, %s), {bucket_columns(1)}
            FROM candles p GROUP BY 1, 2 ORDER BY 1, 2""", (iv.delta, iv.origin)).fetchall()
        stored = conn.execute(f"SELECT symbol, time, {', '.join(names)} FROM {INTERVAL_RELATIONS[minutes]} "
                              "ORDER BY 1, 2").fetchall()
        assert direct and len(stored) == len(direct), minutes
        for got, expected in zip(stored, direct):
            assert [str(v) for v in got] == [str(v) for v in expected], (minutes, got[:2])
