"""Gap detection and filling end to end: real PostgreSQL, the fake Kraken REST server on loopback."""

from datetime import datetime, timedelta, timezone

import pytest

from kraken_hist.storage import store
from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.gaps.filler import GapFiller
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.types import GapKind
from kraken_hist.core.pairs import PAIR_MAP

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)
SYMBOL = "BTC/USD"
LATER = T0 + timedelta(days=3)  # everything of the history is outside the OHLC reach


class Exchange:
    """The fake market, its REST server and a fast client (no pace, no client-side retries)."""

    def __init__(self, histories, now):
        self.clock = ManualClock(now)
        self.market = FakeMarket(histories, clock=self.clock)
        self.server = FakeKrakenREST(self.market).start()
        self.client = KrakenRestClient(self.server.url, min_interval=0, max_retries=0, limiter=RateLimiter(0),
                                       retry_base_delay=0.001)

    def close(self):
        self.client.close()
        self.server.stop()


@pytest.fixture
def exchange_factory():
    made = []

    def make(histories, now=LATER):
        ex = Exchange(histories, now)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


def backfill(db_url, ex, symbol=SYMBOL, since=T0):
    with KrakenTradesBackfill(db_url, client=ex.client) as bf:
        bf.backfill_symbol(symbol, since=since)
    refresh_aggregates(db_url)


def filler(db_url, ex, **kwargs):
    return GapFiller(db_url, client=ex.client, clock=ex.clock, sleep=lambda s: None, **kwargs)


def snapshot(conn):
    conn.rollback()
    out = {
        "trades": conn.execute(
            "SELECT symbol, trade_id, time, price, volume, side, ord_type, source FROM trades ORDER BY 1, 2"
        ).fetchall(),
        "candles": conn.execute(
            "SELECT symbol, time, open, high, low, close, vwap, volume, trades, source FROM candles ORDER BY 1, 2"
        ).fetchall(),
    }
    for relation in ("candles_5m", "candles_1h", "candles_1d"):
        out[relation] = conn.execute(f"SELECT * FROM {relation} ORDER BY symbol, time").fetchall()
    conn.rollback()
    return out


def delete_ids(conn, ranges, symbol=SYMBOL):
    for lo, hi in ranges:
        conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s", (symbol, lo, hi))
    conn.commit()


@pytest.fixture
def history():
    return generate_trades(SYMBOL, T0, T0 + timedelta(hours=4), trades_per_minute=8)


def test_deleted_trades_are_found_exactly_and_filled_back(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    original = snapshot(conn)
    holes = [(40, 40), (300, 420), (1000, 1003), (1500, 1700)]
    delete_ids(conn, holes)

    with filler(db_url, ex) as service:
        found = service.detect_gaps()
        assert [(g.kind, g.first_missing_id, g.last_missing_id) for g in found] == [
            (GapKind.TRADE_IDS, lo, hi) for lo, hi in holes
        ]
        report = service.fill_all_gaps(max_concurrent=3)
        assert report.found == 4 and report.filled == 4 and report.failed == 0
        assert report.symbols[SYMBOL].trades_stored == sum(hi - lo + 1 for lo, hi in holes)
        assert report.symbols[SYMBOL].methods == {"trades": 4}
        assert service.detect_gaps() == []
    assert snapshot(conn) == original


def test_deleted_candles_are_rebuilt_without_calling_the_exchange(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    original = snapshot(conn)
    conn.execute("DELETE FROM candles WHERE time >= %s AND time < %s", (T0 + timedelta(minutes=30), T0 + timedelta(minutes=95)))
    conn.execute("DELETE FROM candles WHERE time >= %s AND time < %s", (T0 + timedelta(hours=3), T0 + timedelta(hours=3, minutes=2)))
    conn.commit()
    ex.server.reset_calls()

    with filler(db_url, ex) as service:
        found = service.detect_gaps()
        assert {g.kind for g in found} == {GapKind.CANDLES}
        assert found[0].start >= T0 + timedelta(minutes=30) and found[-1].end <= T0 + timedelta(hours=3, minutes=2)
        report = service.fill_all_gaps()
        assert report.filled == len(found) and report.symbols[SYMBOL].methods == {"rebuild": len(found)}
    assert ex.server.calls["total"] == 0
    assert snapshot(conn) == original


def test_an_illiquid_pair_has_no_gaps_and_a_second_fill_calls_nothing(db_url, conn, exchange_factory):
    quiet = generate_trades("DOGE/USD", T0, T0 + timedelta(days=2), trades_per_minute=0.02, quiet_fraction=0.98)
    assert max(b.time - a.time for a, b in zip(quiet, quiet[1:])) > timedelta(hours=2)
    ex = exchange_factory({"DOGE/USD": quiet})
    backfill(db_url, ex, "DOGE/USD")
    ex.server.reset_calls()

    with filler(db_url, ex, symbols=["DOGE/USD"]) as service:
        assert service.detect_gaps() == []
        first = service.fill_all_gaps()
        second = service.fill_all_gaps()
    assert first.found == second.found == 0
    assert ex.server.calls["total"] == 0


def test_a_range_found_empty_is_covered_and_never_fetched_again(db_url, conn, exchange_factory):
    early = generate_trades(SYMBOL, T0, T0 + timedelta(hours=1), trades_per_minute=3)
    late = generate_trades(SYMBOL, T0 + timedelta(hours=3), T0 + timedelta(hours=4), trades_per_minute=3,
                           first_trade_id=early[-1].trade_id + 1)
    ex = exchange_factory({SYMBOL: early + late})
    # the early hour came from an id-less CSV import; REST started two quiet hours later
    with conn.cursor().copy("COPY trades (symbol, trade_id, time, price, volume, source) FROM STDIN") as copy:
        for i, t in enumerate(early):
            copy.write_row((SYMBOL, -(i + 1), t.time, t.price, t.volume, "csv"))
    store.rebuild_candles(conn, SYMBOL, T0, T0 + timedelta(hours=1), decimals=PAIR_MAP[SYMBOL].price_decimals)
    store.add_coverage(conn, SYMBOL, "csv", T0, T0 + timedelta(hours=1))
    conn.commit()
    backfill(db_url, ex, since=T0 + timedelta(hours=3))
    before = snapshot(conn)

    with filler(db_url, ex) as service:
        (gap,) = service.detect_gaps()
        assert (gap.kind, gap.start, gap.end) == (GapKind.UNCOVERED, T0 + timedelta(hours=1), T0 + timedelta(hours=3))
        report = service.fill_all_gaps()
        assert report.verified_empty == 1 and report.filled == 0
        ex.server.reset_calls()
        assert service.detect_gaps() == []
        again = service.fill_all_gaps()
    assert again.found == 0 and ex.server.calls["total"] == 0
    assert snapshot(conn) == before


def test_an_uncovered_range_with_trades_is_filled_and_covered(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    cut, resume = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    with conn.cursor().copy("COPY trades (symbol, trade_id, time, price, volume, source) FROM STDIN") as copy:
        for i, t in enumerate(t for t in history if t.time < cut):
            copy.write_row((SYMBOL, -(i + 1), t.time, t.price, t.volume, "csv"))
    store.rebuild_candles(conn, SYMBOL, T0, cut, decimals=PAIR_MAP[SYMBOL].price_decimals)
    store.add_coverage(conn, SYMBOL, "csv", T0, cut)
    conn.commit()
    backfill(db_url, ex, since=resume)

    with filler(db_url, ex) as service:
        (gap,) = service.detect_gaps()
        assert (gap.start, gap.end) == (cut, resume)
        report = service.fill_all_gaps()
        assert report.filled == 1
        assert service.detect_gaps() == []
    expected = [t.trade_id for t in history if cut <= t.time < resume]
    stored = [r[0] for r in conn.execute(
        "SELECT trade_id FROM trades WHERE time >= %s AND time < %s AND trade_id > 0 ORDER BY 1", (cut, resume))]
    assert stored == expected


def delete_window(conn, start, end):
    conn.execute("DELETE FROM trades WHERE time >= %s AND time < %s", (start, end))
    conn.execute("DELETE FROM candles WHERE time >= %s AND time < %s", (start, end))
    conn.commit()


def test_a_gap_older_than_the_ohlc_window_goes_through_trades_only(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history}, now=T0 + timedelta(hours=4, minutes=5))
    backfill(db_url, ex)
    delete_window(conn, T0 + timedelta(minutes=20), T0 + timedelta(minutes=50))
    ex.clock.set(T0 + timedelta(hours=13))  # the gap is now older than the 720 newest candles
    ex.server.inject("invalid", 5, endpoint="Trades")
    ex.server.reset_calls()
    with filler(db_url, ex) as service:
        report = service.fill_all_gaps()
    (fill,) = report.fills
    assert fill.status == "failed" and "Invalid arguments" in fill.reason
    assert ex.server.calls["OHLC"] == 0


def test_a_fresh_gap_uses_ohlc_when_trades_cannot_be_had_then_trades_later(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history}, now=T0 + timedelta(hours=4, minutes=5))
    backfill(db_url, ex)
    original = snapshot(conn)
    start, end = T0 + timedelta(hours=3), T0 + timedelta(hours=3, minutes=40)
    delete_window(conn, start, end)
    ex.server.inject("invalid", 1, endpoint="Trades")
    ex.server.reset_calls()

    with filler(db_url, ex) as service:
        report = service.fill_all_gaps()
        (fill,) = report.fills
        assert (fill.status, fill.method) == ("partial", FillMethod.OHLC)
        assert ex.server.calls["OHLC"] == 1
        rows = conn.execute(
            "SELECT time, open, high, low, close, vwap, volume, trades, source FROM candles "
            "WHERE time >= %s AND time < %s ORDER BY time", (start, end)).fetchall()
        conn.rollback()
        want = [c[1:9] for c in original["candles"] if start <= c[1] < end]
        assert [r[:8] for r in rows] == want  # the exchange's candles equal ours, to the digit
        assert {r[8] for r in rows} == {"rest_ohlc"}
        # trades are still missing, so the gap is still there; with Trades back it is filled
        assert [g.kind for g in service.detect_gaps()] == [GapKind.TRADE_IDS]
        second = service.fill_all_gaps()
        assert second.filled == 1 and second.fills[0].method is FillMethod.TRADES
    assert snapshot(conn) == original


def test_transient_faults_are_retried(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    original = snapshot(conn)
    delete_ids(conn, [(100, 150), (900, 950)])
    ex.server.inject("5xx", 1)
    ex.server.inject("unavailable", 1)
    ex.server.inject("drop", 1)
    with filler(db_url, ex, max_retries=3) as service:
        report = service.fill_all_gaps(max_concurrent=1)
    assert report.filled == 2 and report.failed == 0
    assert sum(f.attempts for f in report.fills) == 5
    assert snapshot(conn) == original


def test_a_permanent_failure_is_reported_and_the_rest_still_fill(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    delete_ids(conn, [(100, 150), (900, 950), (1500, 1510)])
    ex.server.inject("invalid", 1, endpoint="Trades")
    with filler(db_url, ex, max_retries=1) as service:
        report = service.fill_all_gaps(max_concurrent=2)
        assert report.found == 3 and report.filled == 2 and report.failed == 1
        ((gap, reason),) = report.symbols[SYMBOL].failed
        assert "Invalid arguments" in reason
        assert [(g.first_missing_id, g.last_missing_id) for g in service.detect_gaps()] == [
            (gap.first_missing_id, gap.last_missing_id)
        ]
        as_dict = report.to_dict()
    assert as_dict["symbols"][SYMBOL]["failed"][0]["reason"] == reason
    assert as_dict["filled"] == 2


def test_retries_are_bounded(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    delete_ids(conn, [(100, 150)])
    ex.server.inject("unavailable", 50, endpoint="Trades")
    with filler(db_url, ex, max_retries=2) as service:
        report = service.fill_all_gaps()
    (fill,) = report.fills
    assert fill.status == "failed" and fill.attempts == 3 and "Unavailable" in fill.reason


def test_fill_status_is_recorded_apart_from_the_trades_resume_point(db_url, conn, exchange_factory, history):
    ex = exchange_factory({SYMBOL: history})
    backfill(db_url, ex)
    resume = store.read_sync_status(conn, SYMBOL, "trades")
    delete_ids(conn, [(100, 150)])
    with filler(db_url, ex) as service:
        service.fill_all_gaps()
    conn.rollback()
    assert store.read_sync_status(conn, SYMBOL, "trades")["cursor"] == resume["cursor"]
    status = store.read_sync_status(conn, SYMBOL, "gaps")
    assert status["last_time"] > history[-1].time
    assert status["details"]["filled"] == 1
