"""WebSocketDBIntegration's id bookkeeping, in memory: dedupe, holes, REST filling, frontier."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kraken_hist.core.errors import DatabaseUnavailableError, ExchangeTransientError
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.core.timeutils import to_unix_ns
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade, TradeRecord, TradeSource
from kraken_hist.kraken.ws_parsing import OhlcMessage, TradeMessage, parse_frame

from .helpers import MemoryWriter, wait_for

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def trade(tid: int, symbol: str = "BTC/USD") -> HistoricalTrade:
    return HistoricalTrade(symbol=symbol, trade_id=tid, time=T0 + timedelta(seconds=tid), price=Decimal("100.5"),
                           volume=Decimal("0.1"), side="b", ord_type="l")


class FakeTrades:
    """REST Trades over ids 1..last: pages of `page_size` after an exclusive ns `since`."""

    def __init__(self, last: int, page_size: int = 3, fail: int = 0) -> None:
        self.last = last
        self.page_size = page_size
        self.fail = fail
        self.calls: list[str] = []

    def fetch_trades_page(self, symbol: str, since: str | None) -> TradesPage:
        self.calls.append(str(since))
        if self.fail:
            self.fail -= 1
            raise ExchangeTransientError("EService:Unavailable")
        after = int(since or 0)
        rows = [trade(i, symbol) for i in range(1, self.last + 1) if to_unix_ns(trade(i).time) > after]
        rows = rows[: self.page_size]
        last = str(to_unix_ns(rows[-1].time)) if rows else str(after)
        return TradesPage(symbol=symbol, trades=rows, last=last)


def message(*ids: int, snapshot: bool = False, symbol: str = "BTC/USD") -> TradeMessage:
    return TradeMessage(snapshot=snapshot, trades=tuple(trade(i, symbol) for i in ids))


def wait_until(predicate, timeout: float = 5.0) -> None:
    wait_for(predicate, timeout=timeout, interval=0.01)


def test_snapshot_replays_and_overlaps_are_dropped_by_id() -> None:
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="unused")
    live.on_trade(message(5, 6, 7, snapshot=True))
    live.on_trade(message(8))
    live.on_trade(message(6, 7, 8, 9, snapshot=True))  # reconnect snapshot overlapping
    live.on_trade(message(10, 9))  # out of order within a frame
    assert writer.ids() == [5, 6, 7, 8, 9, 10]
    assert all(t.source is TradeSource.WEBSOCKET for t in writer.trades)
    stats = live.stats()
    assert stats.duplicates == 4 and stats.holes_opened == 0 and stats.frontier == {"BTC/USD": 10}


def test_a_jump_opens_a_hole_that_pins_the_frontier_until_filled() -> None:
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="unused")
    live.on_trade(message(1, 2, 3))
    live.on_trade(message(8, 9))
    assert live.open_holes() == {"BTC/USD": [(4, 7)]}
    assert live.stats().frontier == {"BTC/USD": 3}
    live.on_trade(message(5))  # one missing id arrives (e.g. in a snapshot): the hole splits
    assert live.open_holes() == {"BTC/USD": [(4, 4), (6, 7)]}
    live.on_trade(message(4, 6, 7, 9))
    assert live.open_holes() == {}
    assert live.stats().frontier == {"BTC/USD": 9}
    assert sorted(writer.ids()) == list(range(1, 10)) and len(writer.ids()) == 9


def test_rest_fills_holes_in_pages_and_retries_transient_failures() -> None:
    writer = MemoryWriter()
    rest = FakeTrades(last=20, page_size=3, fail=1)
    live = WebSocketDBIntegration(writer, db_url="unused", rest=rest, progress_interval=3600, retry_cap=0.05)
    thread = threading.Thread(target=live._catchup.run, daemon=True)
    thread.start()
    try:
        live.on_trade(message(1, 2))
        live.on_trade(message(12, 13))  # ids 3..11 missing
        wait_until(lambda: not live.open_holes())
    finally:
        live._stop.set()
        thread.join(5)
    ids = writer.ids()
    assert sorted(ids) == list(range(1, 14)) + [i for i in range(14, 21) if i in ids]
    assert len(ids) == len(set(ids))
    stats = live.stats()
    assert stats.rest_trades >= 9 and stats.rest_calls >= 3 and stats.frontier["BTC/USD"] >= 13
    # every fetch started just before the newest trade we held, never after a missing id
    assert int(rest.calls[1]) < to_unix_ns(trade(3).time)
    assert {t.source for t in writer.trades if 3 <= t.trade_id <= 11} == {TradeSource.REST}


def test_tail_check_after_reconnect_fetches_what_traded_while_away() -> None:
    writer = MemoryWriter()
    rest = FakeTrades(last=7, page_size=1000)
    live = WebSocketDBIntegration(writer, db_url="unused", rest=rest, progress_interval=3600)
    thread = threading.Thread(target=live._catchup.run, daemon=True)
    thread.start()
    try:
        live.on_connect(1)
        live.on_trade(message(1, 2, 3))
        live.on_connect(2)  # reconnected; no trade has arrived since
        wait_until(lambda: len(writer.ids()) == 7)
    finally:
        live._stop.set()
        thread.join(5)
    assert writer.ids() == [1, 2, 3, 4, 5, 6, 7]
    assert live.stats().frontier == {"BTC/USD": 7}


def test_ohlc_candles_only_for_minutes_trades_do_not_cover() -> None:
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="unused")
    live.on_trade(message(*range(60, 300)))  # trades over minutes 12:01..12:04
    def candle(minute: int, interval: int = 1) -> HistoricalCandle:
        return HistoricalCandle(symbol="BTC/USD", interval=interval, time=T0 + timedelta(minutes=minute),
                                open=Decimal(1), high=Decimal(2), low=Decimal(1), close=Decimal(2),
                                volume=Decimal(3), vwap=Decimal("1.5"), trades=4)
    live.on_ohlc(OhlcMessage(snapshot=True, candles=(candle(0), candle(2), candle(4), candle(5), candle(5, 5))))
    # minute 2 lies inside the covered range; minute 4 is the running one; 0 predates the stream
    assert [c.time.minute for c in writer.candles] == [0, 4, 5]
    assert all(c.source.value == "ws_ohlc" for c in writer.candles)
    assert live.stats().candles_skipped == 1


def test_resume_point_does_not_advance_when_the_writer_cannot_commit() -> None:
    class StuckWriter(MemoryWriter):
        def flush(self, timeout: float | None = None) -> bool:
            return False

    live = WebSocketDBIntegration(StuckWriter(), db_url="postgresql://nobody@127.0.0.1:9/none")
    live.on_trade(message(1, 2, 3))
    with pytest.raises(DatabaseUnavailableError):
        live.persist_progress(flush_timeout=0.1)
    assert live.stats().persisted == {"BTC/USD": None}
    live.stop()  # logs, never raises: the records are still the writer's to keep


def test_records_equal_the_constructors_and_bad_trades_are_refused_but_accounted_for() -> None:
    writer = MemoryWriter()
    live = WebSocketDBIntegration(writer, db_url="unused")
    parsed = parse_frame(
        '{"channel":"trade","type":"update","data":['
        '{"symbol":"BTC/USD","side":"buy","price":83744.3,"qty":0.0004478,"ord_type":"limit","trade_id":1,'
        '"timestamp":"2025-03-01T12:00:00.844359Z"},'
        '{"symbol":"BTC/USD","side":"sell","price":83744.4,"qty":1,"ord_type":"market","trade_id":2,'
        '"timestamp":"2025-03-01T12:00:00.844359Z"}]}'
    )
    live.on_trade(parsed)
    assert writer.trades == [TradeRecord.from_trade(t, TradeSource.WEBSOCKET) for t in parsed.trades]
    zero_price = HistoricalTrade(**{**_fields(trade(4)), "price": Decimal(0)})
    negative = HistoricalTrade(**{**_fields(trade(5)), "volume": Decimal("-1")})
    as_text = HistoricalTrade(**{**_fields(trade(6)), "price": "100.5"})  # converted by TradeRecord's rules
    live.on_trade(TradeMessage(snapshot=False, trades=(trade(3), zero_price, negative, as_text)))
    assert writer.ids() == [1, 2, 3, 6] and writer.trades[-1].price == Decimal("100.5")
    stats = live.stats()
    assert stats.rejected == 2 and stats.frontier == {"BTC/USD": 6} and live.open_holes() == {}


class FailingWriter(MemoryWriter):
    """Fails on one trade id, as a writer that is stopping does."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on

    def write_trade(self, record: TradeRecord) -> None:
        if record.trade_id == self.fail_on:
            raise RuntimeError("writer is stopping")
        super().write_trade(record)


def test_a_writer_failing_midway_leaves_the_rest_to_be_fetched() -> None:
    writer = FailingWriter(fail_on=5)
    live = WebSocketDBIntegration(writer, db_url="unused")
    live.on_trade(message(1, 2))
    with pytest.raises(RuntimeError):
        live.on_trade(message(3, 4, 5, 6))
    assert writer.ids() == [1, 2, 3, 4] and live.stats().frontier == {"BTC/USD": 4}
    live.on_trade(message(7))
    assert live.open_holes() == {"BTC/USD": [(5, 6)]}


def test_a_writer_failing_midway_through_a_frame_placed_id_by_id_accounts_only_for_what_it_took() -> None:
    writer = FailingWriter(fail_on=7)
    live = WebSocketDBIntegration(writer, db_url="unused")
    live.on_trade(message(1, 2))
    with pytest.raises(RuntimeError):
        live.on_trade(message(2, 5, 6, 7, 8))  # not a plain continuation (a replay, a jump): id by id
    assert writer.ids() == [1, 2, 5, 6]
    assert live.open_holes() == {"BTC/USD": [(3, 4)]} and live.stats().frontier == {"BTC/USD": 2}
    live.on_trade(message(9))
    assert live.open_holes() == {"BTC/USD": [(3, 4), (7, 8)]}  # 7 and 8 are fetched again


def _fields(t: HistoricalTrade) -> dict:
    return {name: getattr(t, name) for name in ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type")}
