"""Where a live record starts: after an archive (the first id after its end, found by REST from
there) and on a fresh start (the whole first minute). IdSequence in memory — with a property
test over any order of live frames and REST pages — then end to end against the fakes."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from kraken_hist.storage import store
from kraken_hist.core.config import Settings
from kraken_hist.ingest.archive.formats import synthetic_trade_id
from kraken_hist.core.errors import TransientError
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.ingest.live.ids import EARLY, NEW, OLD, OPENED, IdSequence
from kraken_hist.ingest.live.records import Symbol
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.fake_ws import FakeKrakenWS, next_trades
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.timeutils import floor_minute, to_unix_ns, utcnow
from kraken_hist.core.types import HistoricalTrade
from kraken_hist.kraken.ws_parsing import TradeMessage

from .helpers import MemoryWriter, stored_trades, streaming, wait_for

SYMBOL = "BTC/USD"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def trade(tid: int, when: datetime, symbol: str = SYMBOL) -> HistoricalTrade:
    return HistoricalTrade(symbol=symbol, trade_id=tid, time=when, price=Decimal("100.5"), volume=Decimal("0.1"),
                           side="b", ord_type="l")


class Tape:
    """REST Trades over a fixed list of trades of which the first `visible` have happened; pages
    of `page_size` after an exclusive ns `since`. Records every `since` and every id returned."""

    def __init__(self, trades: list[HistoricalTrade], page_size: int = 3, visible: int | None = None) -> None:
        self.trades = trades
        self.page_size = page_size
        self.visible = len(trades) if visible is None else visible
        self.calls: list[int] = []
        self.returned: set[int] = set()

    def fetch_trades_page(self, symbol: str, since: str | None) -> TradesPage:
        after = int(since or 0)
        self.calls.append(after)
        rows = [t for t in self.trades[:self.visible] if to_unix_ns(t.time) > after][: self.page_size]
        self.returned.update(t.trade_id for t in rows)
        return TradesPage(symbol=symbol, trades=rows, last=str(to_unix_ns(rows[-1].time)) if rows else str(after))


def message(trades: list[HistoricalTrade]) -> TradeMessage:
    return TradeMessage(snapshot=False, trades=tuple(trades))


def catch_up(live: WebSocketDBIntegration, symbol: str = SYMBOL, turns: int = 1) -> None:
    """What the catch-up thread does, synchronously: `turns` jobs (failures retried on the next)."""
    for _ in range(turns):
        with live._lock:
            job = live._symbols[symbol].seq.next_fetch() if symbol in live._symbols else None
        if job is None:
            return
        try:
            live._catchup.fill(symbol, job)
        except TransientError:
            pass


def drain(live: WebSocketDBIntegration, symbol: str = SYMBOL) -> None:
    for _ in range(1000):
        with live._lock:
            seq = live._symbols[symbol].seq
            if not seq.holes and not seq.tail_check:
                return
        catch_up(live, symbol)
    raise AssertionError("the catch-up does not finish")


# --- IdSequence in memory ---------------------------------------------------------------------


def test_after_an_archive_older_trades_are_not_ours_and_rest_from_the_anchor_fixes_the_start() -> None:
    end = T0 + timedelta(seconds=10)
    seq = IdSequence.after(end)
    assert seq.frontier is None and seq.next_fetch().since == to_unix_ns(end) - 1  # catch-up starts at once
    assert seq.accept(90, end - timedelta(seconds=1)) == EARLY  # a snapshot trade the archive holds
    assert seq.accept(105, end + timedelta(seconds=5)) == OPENED  # live, at/after the end: handed over
    assert seq.open_holes() == [(None, 104)] and seq.frontier is None
    assert seq.accept(103, end + timedelta(seconds=4)) == NEW  # out of order: still handed over
    assert seq.open_holes() == [(None, 102), (104, 104)]
    job = seq.next_fetch()
    assert (job.lo, job.hi, job.since) == (None, 102, to_unix_ns(end) - 1)
    # REST from the anchor: the first trade at/after it is the first id after the archive
    assert seq.accept(99, end - timedelta(microseconds=1), fixes_start=True) == EARLY
    assert seq.accept(100, end, fixes_start=True) == NEW
    assert seq.frontier == 100 and seq.frontier_time == end and seq.open_holes() == [(101, 102), (104, 104)]
    assert seq.since(seq.holes[0]) >= to_unix_ns(end) - 1  # never asks REST for anything before the end
    for tid in (101, 102, 104):
        assert seq.accept(tid, end + timedelta(seconds=tid - 100)) == NEW
    assert seq.accept(100, end) == OLD and seq.accept(50, end - timedelta(hours=1)) == OLD
    assert seq.frontier == 105 and seq.open_holes() == [] and seq.covered_from == end


def test_a_fresh_record_starts_at_its_first_trades_minute() -> None:
    seq = IdSequence()
    first = T0 + timedelta(seconds=42)
    assert seq.accept(500, first) == OPENED
    assert seq.open_holes() == [(None, 499)] and seq.covered_from == T0 and seq.frontier is None
    assert seq.accept(400, T0 - timedelta(seconds=1), fixes_start=True) == EARLY  # the minute before
    assert seq.accept(420, T0, fixes_start=True) == NEW  # the minute's first trade
    assert seq.frontier == 420 and seq.open_holes() == [(421, 499)]
    without_rest = IdSequence(exact=False)  # nothing could fetch the minute: the record starts here
    assert without_rest.accept(500, first) == NEW and without_rest.frontier == 500
    assert without_rest.covered_from == first + timedelta(microseconds=1)


def test_live_trades_before_the_rest_answer_are_handed_over_and_progress_waits() -> None:
    end = T0 + timedelta(seconds=30)
    tape = Tape([trade(i, T0 + timedelta(seconds=i)) for i in range(1, 60)], page_size=4, visible=41)
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="postgresql://nobody@127.0.0.1:9/none", rest=tape)
    live._symbols[SYMBOL] = Symbol(IdSequence.after(end))
    live.on_trade(message([trade(i, T0 + timedelta(seconds=i)) for i in range(25, 41)]))  # snapshot across the end
    live.on_trade(message([trade(41, T0 + timedelta(seconds=41))]))  # continues: the fast path
    assert writer.ids() == list(range(30, 42))  # 25..29 are the archive's
    stats = live.stats()
    assert stats.before_start == 5 and stats.frontier == {SYMBOL: None} and stats.holes_opened == 0
    assert live.persist_progress() == 0  # nothing to vouch for yet: the database is not even asked
    drain(live)
    assert writer.ids() == list(range(30, 42)) and live.stats().frontier == {SYMBOL: 41}
    assert min(tape.calls) == to_unix_ns(end) - 1 and min(tape.returned) == 30


# µs between trades: bursts share a time; otherwise more than REST_MARGIN_NS (1 ms) apart, so that a
# fetch starting that much before a hole gets to it within a page (Kraken: 1000 trades a page)
deltas = st.sampled_from([0, 0, 0, 1_001, 250_000, 1_000_000, 7_000_000, 31_000_000])
events = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 8), st.booleans()),  # trades happen (and are streamed)
        st.tuples(st.just("live"), st.lists(st.integers(0, 12), min_size=1, max_size=8)),  # any recent ids
        st.tuples(st.just("snapshot"), st.integers(1, 12)),  # the latest few again, as on a resubscribe
        st.tuples(st.just("rest"), st.integers(1, 2)),
        st.tuples(st.just("reconnect"), st.just(0)),
    ),
    max_size=30,
)


@hyp_settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(deltas, min_size=1, max_size=45),
    fresh=st.booleans(),
    anchor_at=st.integers(0, 99),  # percent of the way through the trades
    nudge=st.sampled_from([-1, 0, 1, 500_000]),
    happened=st.integers(0, 99),  # percent of the trades that happened before the start
    page_size=st.integers(1, 4),
    script=events,
)
def test_any_order_of_frames_and_pages_hands_over_each_id_from_the_anchor_on_exactly_once(
    steps: list[int], fresh: bool, anchor_at: int, nudge: int, happened: int, page_size: int, script: list
) -> None:
    times, now = [], T0
    for delta in steps:
        now += timedelta(microseconds=delta)
        times.append(now)
    trades = [trade(i + 1, when) for i, when in enumerate(times)]
    last = len(trades)
    # Pages cut by count and continued after an exclusive time cannot reach into a burst longer
    # than a page (Kraken: 1000 a page, bursts of at most ~17); so neither here.
    burst = max(sum(1 for other in times if other == when) for when in times)
    tape = Tape(trades, page_size=max(page_size, burst + 1), visible=happened * last // 100)
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="unused", rest=tape, pages_per_turn=2)
    anchor: datetime | None = None
    if not fresh:
        anchor = times[anchor_at * last // 100] + timedelta(microseconds=nudge)
        live._symbols[SYMBOL] = Symbol(IdSequence.after(anchor))
    streamed: set[int] = set()

    def stream(ids: list[int]) -> None:
        nonlocal anchor
        if not ids:
            return
        if anchor is None:  # a fresh record is anchored at the minute of the first trade it sees
            anchor = floor_minute(trades[min(ids) - 1].time)
        streamed.update(ids)
        live.on_trade(message([trades[i - 1] for i in ids]))

    def check() -> None:
        handed = writer.ids()
        assert len(handed) == len(set(handed)), "an id was handed over twice"
        if anchor is None:
            assert not handed
            return
        assert all(trades[i - 1].time >= anchor for i in handed), "a trade before the anchor was handed over"
        frontier = live.stats().frontier.get(SYMBOL)
        if frontier is not None:
            start = min(i for i in range(1, last + 1) if trades[i - 1].time >= anchor)
            assert set(range(start, frontier + 1)) <= set(handed)

    for kind, arg, *more in script:
        if kind == "advance":
            new = list(range(tape.visible + 1, min(last, tape.visible + arg) + 1))
            tape.visible += len(new)
            if more[0]:
                stream(new)
        elif kind == "live":
            stream(sorted({max(1, tape.visible - k) for k in arg}) if tape.visible else [])
            if tape.visible:
                stream([max(1, tape.visible - k) for k in arg])  # again, unsorted, with repeats
        elif kind == "snapshot":
            stream(list(range(max(1, tape.visible - arg + 1), tape.visible + 1)))
        elif kind == "rest":
            catch_up(live, turns=arg)
        else:
            live.on_connect(2)
        check()
    tape.visible = last
    if SYMBOL in live._symbols:
        drain(live)
    check()

    handed = writer.ids()
    assert anchor is None or all(since >= to_unix_ns(anchor) - 1 for since in tape.calls)
    seen = {i for i in streamed | tape.returned if anchor is not None and trades[i - 1].time >= anchor}
    if not seen:
        assert handed == []
        return
    start = min(i for i in range(1, last + 1) if trades[i - 1].time >= anchor)
    assert sorted(handed) == list(range(start, max(seen) + 1))
    assert live.open_holes() == {} and live.stats().frontier == {SYMBOL: max(seen)}


# --- end to end: fake exchange → stream → PostgreSQL --------------------------------------------


def as_rows(trades: list[HistoricalTrade]) -> list[tuple]:
    return [(t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type) for t in trades]


def candle_rows(conn: psycopg.Connection, symbol: str, start: datetime, end: datetime) -> list[tuple]:
    conn.rollback()
    return conn.execute(
        "SELECT time, open, high, low, close, vwap, volume, trades FROM candles "
        "WHERE symbol = %s AND time >= %s AND time < %s ORDER BY time", (symbol, start, end)).fetchall()


def ws_coverage(conn: psycopg.Connection, symbol: str) -> list[tuple[datetime, datetime]]:
    conn.rollback()
    return store.read_coverage(conn, symbol, "ws")


def test_fresh_start_in_a_busy_minute_stores_that_minute_whole(db_url: str, settings: Settings,
                                                               conn: psycopg.Connection) -> None:
    minute = floor_minute(utcnow()) - timedelta(minutes=3)
    clock = ManualClock(minute + timedelta(seconds=40))  # the exchange is 40 s into a busy minute
    market = FakeMarket({SYMBOL: generate_trades(SYMBOL, minute - timedelta(minutes=2), minute, seed=7)}, clock=clock)
    rng = random.Random(3)
    for offset in sorted(rng.sample(range(40_000_000), 120)):  # ~300 trades in its first 40 s, some in bursts
        market.append(SYMBOL, next_trades(market, SYMBOL, rng.choice((1, 1, 2, 3, 5)), rng=rng,
                                          when=minute + timedelta(microseconds=offset)))
    before = market.trades(SYMBOL, minute, minute + timedelta(minutes=1))
    assert len(before) > 200 and before[0].trade_id < market.next_trade_id(SYMBOL) - 50  # the snapshot is mid-minute
    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.2) as ws:
        with streaming(db_url, settings, rest.url, ws.url, SYMBOL) as (live, recording):
            ws.wait_for_subscribers("trade", [SYMBOL])
            ws.publish_new(SYMBOL, 30)
            expected = as_rows(market.trades(SYMBOL, minute, minute + timedelta(minutes=1)))
            wait_for(lambda: stored_trades(conn, SYMBOL) == expected)
            wait_for(lambda: live.stats().persisted[SYMBOL] == expected[-1][0], what="the resume point")
            stats = live.stats()
    assert stored_trades(conn, SYMBOL) == expected  # nothing before the minute, nothing missing in it
    # REST fetched the minute's start (and the 30 new ones too, if it answered before the stream)
    assert len(before) - 50 <= stats.rest_trades <= len(before) - 50 + 30 and stats.holes_opened == 0
    assert min(recording.calls) == to_unix_ns(minute) - 1
    (candle,) = market.candles(SYMBOL, 1, minute, minute + timedelta(minutes=1))
    assert candle_rows(conn, SYMBOL, minute, minute + timedelta(minutes=1)) == [
        (candle.time, candle.open, candle.high, candle.low, candle.close, candle.vwap, candle.volume, candle.trades)]
    assert candle.trades == len(expected)
    assert ws_coverage(conn, SYMBOL) == [(minute, expected[-1][1])]  # from the minute's start, not the first trade
    status = conn.execute("SELECT last_trade_id FROM sync_status WHERE symbol = %s AND data_type = 'trades'",
                          (SYMBOL,)).fetchone()
    assert status == (expected[-1][0],)


def test_after_an_archive_the_stream_stores_exactly_what_follows_its_end(db_url: str, settings: Settings,
                                                                        conn: psycopg.Connection) -> None:
    symbol = "ETH/USD"
    now = utcnow()
    history = generate_trades(symbol, floor_minute(now - timedelta(minutes=30)), now, seed=5, trades_per_minute=20)
    market = FakeMarket({symbol: history})
    # The archive ends at E, a whole second among the last 50 trades (so the snapshot straddles it).
    end = history[-30].time.replace(microsecond=0) + timedelta(seconds=1)
    after_end = [t for t in history if t.time >= end]
    archived = [t for t in history if t.time < end]
    assert 10 < len(after_end) < 50 and after_end[0].trade_id > 200
    # What an import leaves: REST trades from long before (ids far below the first after E), the
    # archive's id-less rows, coverage 'csv' up to E, sync_status at E with no trade id.
    old_rest = archived[:5]
    with conn.transaction():
        for t in old_rest:
            conn.execute("INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source) "
                         "VALUES (%s, %s, %s, %s, %s, %s, %s, 'rest')",
                         (symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type))
        ordinals: dict[int, int] = {}
        for t in archived[5:]:
            second = int(t.time.timestamp())
            ordinal = ordinals[second] = ordinals.get(second, -1) + 1
            conn.execute("INSERT INTO trades (symbol, trade_id, time, price, volume, source) "
                         "VALUES (%s, %s, %s, %s, %s, 'csv')",
                         (symbol, synthetic_trade_id(second, ordinal), t.time.replace(microsecond=0), t.price,
                          t.volume))
        store.add_coverage(conn, symbol, "csv", old_rest[-1].time, end)
        store.write_sync_status(conn, symbol, "trades", last_time=end, cursor=str(to_unix_ns(end) - 1),
                                last_trade_id=None, details={"resumed_from": "csv"})
    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.2) as ws:
        with streaming(db_url, settings, rest.url, ws.url, symbol) as (live, recording):
            ws.wait_for_subscribers("trade", [symbol])
            published = ws.publish_new(symbol, 10)
            expected = as_rows(old_rest + after_end + published)
            wait_for(lambda: [r for r in stored_trades(conn, symbol) if r[0] > 0] == expected)
            wait_for(lambda: live.stats().persisted[symbol] == published[-1].trade_id, what="the resume point")
            stats = live.stats()
    stored = stored_trades(conn, symbol)
    assert [r for r in stored if r[0] > 0] == expected  # exactly: nothing the archive holds came again
    assert len([r for r in stored if r[0] < 0]) == len(archived) - 5
    assert recording.calls and min(recording.calls) == to_unix_ns(end) - 1  # REST was never asked about before E
    assert min(recording.ids) == after_end[0].trade_id
    assert stats.frontier == {symbol: published[-1].trade_id} and stats.missing_ids == 0
    row = conn.execute("SELECT last_trade_id, last_time FROM sync_status WHERE symbol = %s AND data_type = 'trades'",
                       (symbol,)).fetchone()
    assert row == (published[-1].trade_id, published[-1].time)
    assert ws_coverage(conn, symbol) == [(end, published[-1].time)]
