"""HistoricalDataProvider against a real PostgreSQL: look-ahead, forming buckets, fill, frames, metadata."""

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pandas as pd
import psycopg
import pytest

from kraken_hist.storage import store
from kraken_hist.rules.candles import resample
from kraken_hist.core.errors import DatabaseUnavailableError, UnknownSymbolError
from kraken_hist.query.provider import (
    FRAME_COLUMNS,
    INTERVAL_VIEWS,
    HistoricalDataProvider,
    InsufficientDataError,
    candles_to_frame,
)
from kraken_hist.storage.refresh import refresh_aggregates

from .trade_data import assert_same, insert_candles, random_candles

UTC = timezone.utc
T0 = datetime(2025, 3, 5, tzinfo=UTC)
END = datetime(2025, 3, 9, 13, 34, 30, tzinfo=UTC)  # mid-minute, mid-hour, mid-day, mid-week


def at(when):
    return lambda: when


@pytest.fixture
def loaded(db_url, conn):
    """Ten days of BTC/USD and ETH/USD minutes, refreshed; returns the 1-minute records."""
    rng = random.Random(11)
    data = {s: random_candles(s, rng, days=10) for s in ("BTC/USD", "ETH/USD")}
    for records in data.values():
        insert_candles(conn, records)
    refresh_aggregates(db_url)
    return data


def test_interval_views_are_the_stored_relations():
    assert INTERVAL_VIEWS == {1: "candles", 5: "candles_5m", 15: "candles_15m", 30: "candles_30m",
                              60: "candles_1h", 240: "candles_4h", 1440: "candles_1d", 10080: "candles_1w"}


def test_complete_buckets_only_by_default_and_names_are_normalised(db_url, loaded):
    now = loaded["BTC/USD"][-1].time - timedelta(hours=5, seconds=30)
    with HistoricalDataProvider(db_url, clock=at(now)) as provider:
        got = provider.get_candles("XBTUSD", "1h", start=T0)
        assert got[-1].end <= now and got[-1].end > now - timedelta(hours=1)
        assert_same(got, [c for c in resample(loaded["BTC/USD"], 60) if c.end <= now])
        assert provider.get_candles("xxbtzusd", 60, start=T0, limit=3) == got[:3]
        # start inside a bucket: the first bucket returned starts at or after it
        assert provider.get_candles("BTC/USD", "4h", start=T0 + timedelta(minutes=1))[0].time == T0 + timedelta(hours=4)
        with pytest.raises(UnknownSymbolError):
            provider.get_candles("NOPE", 60)
        with pytest.raises(ValueError, match="timezone-aware"):
            provider.get_candles("BTC/USD", 60, start=datetime(2025, 3, 5))
        with pytest.raises(ValueError, match="cannot read interval"):
            provider.get_candles("BTC/USD", "1y")


def test_latest_and_forming_bucket_live(db_url, loaded):
    minutes = loaded["BTC/USD"]
    now = minutes[-40].time + timedelta(seconds=20)  # inside a stored minute
    with HistoricalDataProvider(db_url, clock=at(now)) as provider:
        latest = provider.get_latest_candles("BTC/USD", 15, 5)
        assert len(latest) == 5 and latest[-1].end <= now
        with_forming = provider.get_latest_candles("BTC/USD", 15, 5, include_forming=True)
        assert with_forming[:5] == latest
        forming = with_forming[-1]
        assert forming.time == latest[-1].time + timedelta(minutes=15) or forming.time > latest[-1].time
        # live: the forming bucket includes the current (stored) minute
        expected = resample([c for c in minutes if forming.time <= c.time <= now], 15)
        assert_same([forming], expected)


def test_warmup_and_multi_timeframe_contain_nothing_closed_after_end(db_url, loaded):
    minutes = loaded["BTC/USD"]
    with HistoricalDataProvider(db_url) as provider:
        warm = provider.get_warmup_data("BTC/USD", "1h", 30, end=END)
        assert len(warm) == 30 and all(c.end <= END for c in warm)
        assert_same(warm, [c for c in resample(minutes, 60) if c.end <= END][-30:])
        arbitrary = provider.get_warmup_data("BTC/USD", 45, 12, end=END)
        assert_same(arbitrary, [c for c in resample(minutes, 45) if c.end <= END][-12:])
        with pytest.raises(InsufficientDataError, match="only"):
            provider.get_warmup_data("BTC/USD", "1d", 50, end=END)

        frames = provider.get_multi_timeframe_candles("BTC/USD", END, [1, 5, 60, 240, 1440, 10080, 120], count=10)
        assert set(frames) == {1, 5, 60, 240, 1440, 10080, 120}
        for interval, series in frames.items():
            assert all(c.end <= END for c in series), interval
            assert_same(series, [c for c in resample(minutes, interval) if c.end <= END][-10:] if interval > 1
                        else [c for c in minutes if c.time + timedelta(minutes=1) <= END][-10:])
        assert frames[10080] == []  # the only week containing END has not closed

        # The forming bucket is built only from minutes closed by END — never from the stored
        # 1h/4h/1d/1w rows, which already hold the data after END.
        known = [c for c in minutes if c.time + timedelta(minutes=1) <= END]
        later = [c for c in minutes if c.time + timedelta(minutes=1) > END]
        assert later and later[0].time < END + timedelta(hours=1)
        forming = provider.get_multi_timeframe_candles("BTC/USD", END, [1, 60, 240, 1440, 10080, 120], count=3,
                                                       include_forming=True)
        for interval, series in forming.items():
            if interval == 1:
                assert series[-1].end <= END  # the 13:34 minute closes after END: no forming 1m candle
                continue
            head, last = series[:-1], series[-1]
            assert all(c.end <= END for c in head) and last.time < END < last.end, interval
            expected = [c for c in resample(known, interval) if c.time == last.time]
            assert_same([last], expected)
            stored_bucket = [c for c in resample(minutes, interval) if c.time == last.time][0]
            assert last.volume < stored_bucket.volume, interval  # data after END is really there, and excluded


def test_quiet_minutes_filled_on_request(db_url, conn):
    def minute(m, price, volume="1"):
        p = Decimal(price)
        return dict(time=T0 + timedelta(minutes=m), open=p, high=p, low=p, close=p, volume=Decimal(volume), vwap=p, trades=1)

    from kraken_hist.core.types import CandleRecord

    records = [CandleRecord(symbol="BTC/USD", **minute(m, price)) for m, price in ((2, "10.5"), (3, "11"), (7, "12"))]
    insert_candles(conn, records)
    refresh_aggregates(db_url)
    with HistoricalDataProvider(db_url, clock=at(T0 + timedelta(hours=1))) as provider:
        assert [c.time.minute for c in provider.get_candles("BTC/USD", 1, T0, T0 + timedelta(minutes=10))] == [2, 3, 7]
        # limit counts buckets that exist, also for on-the-fly intervals across a long empty stretch
        sparse = provider.get_candles("BTC/USD", 3, T0 - timedelta(days=3), limit=2)
        assert [(c.time.minute, c.trades) for c in sparse] == [(0, 1), (3, 1)]
        assert [c.time.minute for c in provider.get_candles("BTC/USD", 3, None, limit=5)] == [0, 3, 6]
        filled = provider.get_candles("BTC/USD", 1, T0, T0 + timedelta(minutes=10), fill_quiet=True)
        # nothing before the first known price; quiet minutes carry the previous close
        assert [c.time.minute for c in filled] == [2, 3, 4, 5, 6, 7, 8, 9]
        quiet = filled[2]
        assert (quiet.open, quiet.high, quiet.low, quiet.close, quiet.volume, quiet.trades, quiet.vwap) == (
            Decimal(11), Decimal(11), Decimal(11), Decimal(11), Decimal(0), 0, None)
        assert filled[-1].close == Decimal(12)
        # a window starting in a quiet stretch takes the close from before it
        later = provider.get_candles("BTC/USD", 1, T0 + timedelta(minutes=4), limit=3, fill_quiet=True)
        assert [(c.time.minute, c.close, c.volume) for c in later] == [(4, 11, 0), (5, 11, 0), (6, 11, 0)]
        # other intervals too: 3-minute buckets 0-2, 3-5, 6-8, ... up to the hour
        three = provider.get_latest_candles("BTC/USD", 3, 20, fill_quiet=True)
        assert len(three) == 20 and three[-1].close == Decimal(12) and three[-1].volume == 0
        assert provider.get_warmup_data("BTC/USD", 5, 12, fill_quiet=True)[-1].time == T0 + timedelta(minutes=55)
        # on the fly without filling: the window widens over the quiet hour down to the first minute
        assert [(c.time.minute, c.trades) for c in provider.get_latest_candles("BTC/USD", 3, 3)] == \
            [(0, 1), (3, 1), (6, 1)]
        with pytest.raises(InsufficientDataError, match="only 3"):
            provider.get_warmup_data("BTC/USD", 3, 4)


def test_frames_have_the_shape_backtesting_libraries_take(db_url, loaded):
    with HistoricalDataProvider(db_url) as provider:
        frame = provider.get_candles_df("BTC/USD", "1h", T0, T0 + timedelta(days=2))
        candles = provider.get_candles("BTC/USD", "1h", T0, T0 + timedelta(days=2))
        exact = provider.get_warmup_df("BTC/USD", 60, 5, END, exact=True)
        multi = provider.get_multi_timeframe_df("BTC/USD", END, [5, 60], count=4)
    assert list(frame.columns) == list(FRAME_COLUMNS)
    assert isinstance(frame.index, pd.DatetimeIndex) and str(frame.index.tz) == "UTC" and frame.index.name == "time"
    assert frame.index.is_monotonic_increasing and len(frame) == len(candles)
    assert {c: str(t) for c, t in frame.dtypes.items()} == {
        "open": "float64", "high": "float64", "low": "float64", "close": "float64", "volume": "float64",
        "vwap": "float64", "trades": "int64"}
    assert frame["close"].iloc[0] == float(candles[0].close) and frame.attrs == {"symbol": "BTC/USD", "interval": 60}
    assert exact["close"].dtype == object and isinstance(exact["close"].iloc[0], Decimal) and len(exact) == 5
    assert set(multi) == {5, 60} and all(len(f) == 4 for f in multi.values())
    empty = candles_to_frame([])
    assert list(empty.columns) == list(FRAME_COLUMNS) and len(empty) == 0 and str(empty.index.tz) == "UTC"


def test_missing_vwap_is_nan_in_frames(db_url, conn):
    from kraken_hist.core.types import CandleRecord

    p = Decimal("5")
    insert_candles(conn, [CandleRecord(symbol="BTC/USD", time=T0, open=p, high=p, low=p, close=p, volume=p, vwap=None,
                                       trades=1)])
    with HistoricalDataProvider(db_url) as provider:
        frame = provider.get_candles_df("BTC/USD", 1, T0)
    assert frame["vwap"].isna().all() and frame["volume"].iloc[0] == 5.0


def test_metadata_symbols_range_sync_status(db_url, conn, loaded):
    store.write_sync_status(conn, "BTC/USD", "trades", last_time=T0, cursor="123", last_trade_id=7, details={"a": 1})
    conn.commit()
    with HistoricalDataProvider(db_url) as provider:
        assert provider.get_symbols() == ["BTC/USD", "ETH/USD"]
        data_range = provider.get_data_range("XBTUSD")
        assert data_range.first == loaded["BTC/USD"][0].time and data_range.last == loaded["BTC/USD"][-1].time
        assert data_range.end == data_range.last + timedelta(minutes=1)
        assert provider.get_data_range("SOL/USD") is None
        status = provider.get_sync_status("XBTUSD")
        assert [(s["symbol"], s["data_type"], s["cursor"], s["last_trade_id"], s["details"]) for s in status] == [
            ("BTC/USD", "trades", "123", 7, {"a": 1})]
        assert provider.get_sync_status("ETH/USD") == []


def test_health_check_reports_age_and_lag(db_url, conn, loaded, timescaledb):
    now = loaded["BTC/USD"][-1].time + timedelta(minutes=10)
    store.record_candle_change(conn, "BTC/USD", T0, T0 + timedelta(minutes=1))
    conn.commit()
    with HistoricalDataProvider(db_url, clock=at(now)) as provider:
        report = provider.health_check()
        assert report["ok"] is True
        assert report["database"]["reachable"] is True and report["database"]["latency_ms"] >= 0
        assert report["database"]["timescaledb"] is timescaledb
        assert report["symbols"]["BTC/USD"]["age_seconds"] == 540.0
        assert set(report["symbols"]) == {"BTC/USD", "ETH/USD"}
        assert report["aggregates"]["pending_changes"] == 1 and report["aggregates"]["oldest_pending"]
        result = provider.refresh_aggregates()
        assert result.changes_consumed == 1
        assert provider.health_check()["aggregates"] == {"pending_changes": 0, "oldest_pending": None, "lag_seconds": 0.0}


def test_health_check_of_a_database_that_is_not_there():
    provider = HistoricalDataProvider("postgresql://postgres@127.0.0.1:9/nothing")
    report = provider.health_check()
    assert report["ok"] is False and report["database"]["reachable"] is False and report["database"]["error"]
    with pytest.raises(DatabaseUnavailableError):
        provider.get_candles("BTC/USD", 60)


def test_reads_lend_the_pooled_connection_back_as_they_found_it(db_url, conn, loaded):
    """get_candles reads through the driver connection in autocommit: it goes back to the pool
    with its own autocommit setting and no transaction, also after a failed query."""
    from kraken_hist.storage.db import create_engine

    engine = create_engine(db_url, pool_size=1, max_overflow=0)
    try:
        with HistoricalDataProvider(engine=engine) as provider:
            first = provider.get_candles("BTC/USD", 60, T0, limit=5)
            assert_same(first, resample(loaded["BTC/USD"], 60)[:5])
            conn.execute("ALTER TABLE candles_1h RENAME TO candles_1h_gone")
            conn.commit()
            with pytest.raises(psycopg.errors.UndefinedTable):
                provider.get_candles("BTC/USD", 60, T0, limit=5)
            conn.execute("ALTER TABLE candles_1h_gone RENAME TO candles_1h")
            conn.commit()
            assert provider.get_candles("BTC/USD", 60, T0, limit=5) == first  # the same (only) connection
            assert provider.get_latest_candles("BTC/USD", 60, 3) == provider.get_candles("BTC/USD", 60, T0)[-3:]
            assert engine.pool.checkedout() == 0
            with engine.connect() as sa_conn:
                driver = sa_conn.connection.driver_connection
                assert driver.autocommit is False and driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        engine.dispose()


def test_constructor_checks_pool_sizes():
    with pytest.raises(ValueError, match="pool"):
        HistoricalDataProvider("postgresql://x@127.0.0.1/db", pool_min_size=5, pool_max_size=2)


def test_reads_survive_the_server_ending_the_pooled_connections(db_url, conn, loaded):
    """A pooled connection is checked without a round trip (has the server said goodbye?): one
    the server ended (a restart, pg_terminate_backend) is replaced, and the read works."""
    with HistoricalDataProvider(db_url, pool_min_size=2) as provider:
        first = provider.get_candles("BTC/USD", 60, T0, limit=5)
        for _ in range(2):
            ended = conn.execute("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                                 "AND backend_type = 'client backend'").fetchone()[0]
            assert ended >= 1
            assert provider.get_candles("BTC/USD", 60, T0, limit=5) == first
            assert provider.get_data_range("BTC/USD") is not None  # the SQLAlchemy path too


def test_every_read_hands_out_an_interval_s_vwap_at_the_pair_decimals(db_url, conn, loaded):
    """Above one minute a vwap is the exact quotient of its bucket's sums rounded down to the
    pair's price decimals (rules.candles.vwap_at_decimals), digit for digit, on every read path;
    a 1-minute vwap is handed out as stored."""
    from kraken_hist.rules.candles import vwap_at_decimals
    from kraken_hist.core.intervals import Interval

    places = {"BTC/USD": 1, "ETH/USD": 2}

    def exact(symbol, minutes, before):
        iv = Interval(minutes)
        rows = conn.execute("""
            SELECT date_bin(%s, time, %s), sum(vwap * volume) / NULLIF(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0)
            FROM candles WHERE symbol = %s AND time < %s GROUP BY 1""", (iv.delta, iv.origin, symbol, before)).fetchall()
        return {t: None if v is None or minutes == 1 else str(vwap_at_decimals(v, places[symbol])) for t, v in rows}

    def check(candles, symbol, minutes, before=END):
        assert candles
        expected = exact(symbol, minutes, before)
        if minutes == 1:
            expected = {t: str(v) if v is not None else None for t, v in conn.execute(
                "SELECT time, vwap FROM candles WHERE symbol = %s", (symbol,)).fetchall()}
        assert {c.time: None if c.vwap is None else str(c.vwap) for c in candles} == \
            {c.time: expected[c.time] for c in candles}, (symbol, minutes)

    with HistoricalDataProvider(db_url) as provider:
        for symbol in places:
            for minutes in (1, 5, 60, 1440, 3, 45, 120):
                check(provider.get_candles(symbol, minutes, T0, END), symbol, minutes)
                check(provider.get_candles(symbol, minutes, T0, END, limit=40), symbol, minutes)
                check(provider.get_warmup_data(symbol, minutes, 3, END), symbol, minutes)
                check(list(provider.replay_candles(symbol, minutes, T0, END)), symbol, minutes)
            forming = provider.get_multi_timeframe_candles(symbol, END, [60], count=1, include_forming=True)[60]
            check(forming[-1:], symbol, 60, END.replace(second=0))  # in progress at END: minutes closed by then
        hours = provider.get_candles("ETH/USD", 60, T0, END)
    assert any(c.vwap is not None and -c.vwap.as_tuple().exponent == 2 for c in hours)  # rounded, not vacuous
