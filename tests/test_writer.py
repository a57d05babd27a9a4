"""DatabaseWriter on the real PostgreSQL: concurrency, dedupe, candle rules, bad input, lifecycle."""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kraken_hist.rules import candles as aggregates
from kraken_hist.core.types import CandleRecord, CandleSource, TradeRecord, TradeSource
from kraken_hist.storage.writer import DatabaseWriter, InvalidRecordError

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)


def trade(trade_id: int, *, symbol: str = "BTC/USD", seconds: float | None = None, price: str = "60000.5",
          volume: str = "0.01") -> TradeRecord:
    offset = trade_id * 0.7 if seconds is None else seconds
    return TradeRecord(
        symbol=symbol, trade_id=trade_id, time=T0 + timedelta(seconds=offset),
        price=Decimal(price) + Decimal(trade_id % 13), volume=Decimal(volume), side="b", ord_type="l",
        source=TradeSource.WEBSOCKET,
    )


def candle(minute: int, close: str, *, source: CandleSource = CandleSource.WS_OHLC, symbol: str = "ETH/USD") -> CandleRecord:
    c = Decimal(close)
    return CandleRecord(
        symbol=symbol, time=T0 + timedelta(minutes=minute), open=Decimal("100"), high=max(c, Decimal("100")),
        low=min(c, Decimal("100")), close=c, volume=Decimal("2.5"), vwap=Decimal("100.1"), trades=4, source=source,
    )


@pytest.fixture
def writer(settings):
    w = DatabaseWriter(settings.database_url, trade_buffer_size=500, trade_flush_interval=0.5,
                       candle_flush_interval=0.2, settings=settings)
    w.start()
    yield w
    w.stop()


def test_eight_threads_with_duplicates_store_exactly_the_distinct_set(writer, conn):
    per_thread, threads = 10_000, 8
    distinct = 9_000 * threads
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def produce(index: int) -> None:
        rng = random.Random(index)
        own = list(range(index * 9_000 + 1, (index + 1) * 9_000 + 1))
        dups = [rng.randint(1, distinct) for _ in range(per_thread - len(own))]  # 10%, any thread's ids
        ids = own + dups
        rng.shuffle(ids)
        barrier.wait()
        try:
            for trade_id in ids:
                writer.write_trade(trade(trade_id))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=produce, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert writer.flush(timeout=60)

    count, low, high, unique = conn.execute(
        "SELECT count(*), min(trade_id), max(trade_id), count(DISTINCT trade_id) FROM trades"
    ).fetchone()
    assert (count, low, high, unique) == (distinct, 1, distinct, distinct)
    stats = writer.get_stats()
    assert stats["trades_accepted"] == per_thread * threads
    assert stats["trades_written"] == distinct
    assert stats["trades_written"] + stats["trades_duplicate"] + stats["trades_rejected"] == stats["trades_accepted"]
    assert stats["trade_buffer"] == 0 and stats["spool_pending"] == 0
    # 1m candles were rebuilt from all stored trades of the touched minutes.
    assert conn.execute("SELECT sum(trades), sum(volume) FROM candles WHERE symbol = 'BTC/USD'").fetchone() == (
        distinct, Decimal("0.01") * distinct)


def test_candles_built_from_flushed_trades_match_the_pure_twin(writer, conn):
    records = [trade(i) for i in range(1, 2001)]
    for record in reversed(records):  # any order, several flushes
        writer.write_trade(record)
    assert writer.flush(timeout=30)
    stored = conn.execute("SELECT time, open, high, low, close, vwap, volume, trades FROM candles "
                          "WHERE symbol = 'BTC/USD' ORDER BY time").fetchall()
    twin = aggregates.candles_from_trades(records)
    assert [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades) for c in twin] == stored


def test_trades_already_stored_by_another_writer_take_the_merge_path(writer, conn):
    conn.execute("INSERT INTO trades (symbol, trade_id, time, price, volume, source) "
                 "VALUES ('BTC/USD', 5, %s, 1, 1, 'rest')", (T0,))
    conn.commit()
    for i in range(1, 11):
        writer.write_trade(trade(i))
    assert writer.flush(timeout=10)
    rows = conn.execute("SELECT trade_id, source FROM trades ORDER BY trade_id").fetchall()
    assert [r[0] for r in rows] == list(range(1, 11))
    assert dict(rows)[5] == "rest"  # the stored one is kept, never doubled
    assert writer.get_stats()["trades_duplicate"] == 1


def test_candle_resends_last_value_wins_and_buckets_are_marked_changed(writer, conn):
    for close in ("101", "102", "103"):  # one bucket re-sent while it forms
        writer.write_candle(candle(0, close))
    writer.write_candle(candle(1, "99"))
    assert writer.flush(timeout=10)
    writer.write_candle(candle(1, "98"))  # a later flush replaces it again
    assert writer.flush(timeout=10)

    rows = conn.execute("SELECT time, close, source FROM candles WHERE symbol = 'ETH/USD' ORDER BY time").fetchall()
    assert rows == [(T0, Decimal("103"), "ws_ohlc"), (T0 + timedelta(minutes=1), Decimal("98"), "ws_ohlc")]
    changes = conn.execute("SELECT start_time, end_time FROM candle_changes WHERE symbol = 'ETH/USD'").fetchall()
    assert any(s <= T0 and e >= T0 + timedelta(minutes=2) for s, e in changes)
    assert any(s <= T0 + timedelta(minutes=1) < e for s, e in changes[1:])  # the second flush marked bucket 1
    stats = writer.get_stats()
    assert stats["candles_accepted"] == 5
    assert stats["candles_written"] + stats["candles_unchanged"] == 5


def test_exchange_candles_never_overwrite_candles_built_from_trades(writer, conn):
    writer.write_trade(trade(1, symbol="ETH/USD", seconds=10, price="100"))
    assert writer.flush(timeout=10)
    writer.write_candle(candle(0, "150"))  # WebSocket ohlc for the same minute
    writer.write_candle(candle(5, "150", source=CandleSource.REST_OHLC))  # a minute without trades
    assert writer.flush(timeout=10)
    rows = conn.execute("SELECT time, close, trades, source FROM candles WHERE symbol = 'ETH/USD' ORDER BY time").fetchall()
    assert rows == [
        (T0, Decimal("101"), 1, "trades"),
        (T0 + timedelta(minutes=5), Decimal("150"), 4, "rest_ohlc"),
    ]


def _tampered(record, **changes):
    for name, value in changes.items():
        object.__setattr__(record, name, value)
    return record


class DuckTrade:
    symbol, trade_id, time = "BTC/USD", 1, T0
    price, volume, side, ord_type, source = Decimal(1), Decimal(1), None, None, TradeSource.REST


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (lambda: {"symbol": "BTC/USD"}, "TradeRecord"),
        (lambda: DuckTrade(), "TradeRecord"),
        (lambda: _tampered(trade(900), price=Decimal("NaN")), "price"),
        (lambda: _tampered(trade(900), price=Decimal("Infinity")), "price"),
        (lambda: _tampered(trade(900), price=Decimal("-1")), "price"),
        (lambda: _tampered(trade(900), price=Decimal("0")), "price"),
        (lambda: _tampered(trade(900), volume=Decimal("-0.1")), "volume"),
        (lambda: _tampered(trade(900), time=datetime(2024, 1, 1)), "time"),
        (lambda: _tampered(trade(900), symbol="NOPE/USD"), "symbol"),
        (lambda: _tampered(trade(900), trade_id=2**70), "trade_id"),
        (lambda: _tampered(trade(900), price=60000.5), "price"),
    ],
)
def test_bad_trades_are_refused_with_the_field_and_good_ones_in_the_burst_are_stored(writer, conn, bad, field):
    writer.write_trade(trade(1))
    with pytest.raises(InvalidRecordError, match=field):
        writer.write_trade(bad())
    writer.write_trade(trade(2))
    assert writer.flush(timeout=10)
    assert [r[0] for r in conn.execute("SELECT trade_id FROM trades ORDER BY 1")] == [1, 2]
    assert writer.get_stats()["trades_accepted"] == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"low": Decimal("200")}, "low"), ({"close": Decimal("500")}, "close"), ({"time": T0 + timedelta(seconds=5)}, "time"),
     ({"trades": -1}, "trades"), ({"vwap": Decimal("NaN")}, "vwap")],
)
def test_bad_candles_are_refused_with_the_field(writer, conn, changes, field):
    with pytest.raises(InvalidRecordError, match=field):
        writer.write_candle(_tampered(candle(0, "101"), **changes))
    with pytest.raises(InvalidRecordError, match="CandleRecord"):
        writer.write_candle(trade(1))
    writer.write_candle(candle(1, "101"))
    assert writer.flush(timeout=10)
    assert conn.execute("SELECT count(*) FROM candles").fetchone() == (1,)


def test_a_row_the_database_refuses_is_isolated_and_the_rest_of_its_batch_kept(settings, conn):
    rejected = []
    with DatabaseWriter(settings.database_url, trade_buffer_size=1000, trade_flush_interval=60,
                        settings=settings, on_reject=lambda kind, row, reason: rejected.append((kind, row[1]))) as w:
        for i in range(1, 201):
            # numeric allows 131072 digits before the point: this price is finite, positive and unstorable
            w.write_trade(trade(i, price="1E+200000") if i == 77 else trade(i))
        assert w.flush(timeout=30)
        stats = w.get_stats()
    assert rejected == [("trades", 77)]
    assert stats["trades_written"] == 199 and stats["trades_rejected"] == 1
    ids = [r[0] for r in conn.execute("SELECT trade_id FROM trades ORDER BY 1")]
    assert ids == [i for i in range(1, 201) if i != 77]


def test_sync_status_is_written_after_the_records_before_it_and_keeps_the_cursor(writer, conn):
    conn.execute("INSERT INTO sync_status (symbol, data_type, last_time, cursor, last_trade_id) "
                 "VALUES ('BTC/USD', 'trades', %s, '123', 7)", (T0,))
    conn.commit()
    for i in range(1, 101):
        writer.write_trade(trade(i))
    writer.update_sync_status("BTC/USD", "trades", T0 + timedelta(hours=1), last_trade_id=100, via="ws")
    writer.update_sync_status("BTC/USD", "trades", T0 - timedelta(hours=1))  # never moves back
    assert writer.flush(timeout=10)
    row = conn.execute("SELECT last_time, cursor, last_trade_id, details FROM sync_status "
                       "WHERE symbol = 'BTC/USD' AND data_type = 'trades'").fetchone()
    assert row == (T0 + timedelta(hours=1), "123", 100, {"via": "ws"})
    with pytest.raises(InvalidRecordError, match="timestamp"):
        writer.update_sync_status("BTC/USD", "trades", datetime(2024, 1, 1))


def test_interval_flushes_without_explicit_flush(settings, conn):
    with DatabaseWriter(settings.database_url, trade_buffer_size=1000, trade_flush_interval=0.2,
                        candle_flush_interval=0.2, settings=settings) as w:
        w.write_trade(trade(1))
        w.write_candle(candle(3, "101"))
        deadline = datetime.now(timezone.utc) + timedelta(seconds=30)
        while w.get_stats()["written"] < 2 and datetime.now(timezone.utc) < deadline:
            threading.Event().wait(0.05)
        assert w.get_stats()["written"] == 2  # committed by the interval, no flush() call
    assert conn.execute("SELECT count(*) FROM trades").fetchone() == (1,)


@pytest.mark.parametrize("kind", ["candle", "trades"])
def test_an_idle_writer_commits_a_lone_record_within_its_interval(settings, conn, kind):
    """An idle flush thread (nothing buffered) must learn of a first record's deadline."""
    with DatabaseWriter(settings.database_url, trade_buffer_size=1000, trade_flush_interval=0.3,
                        candle_flush_interval=0.3, settings=settings) as w:
        threading.Event().wait(0.5)  # the flush thread is now waiting with nothing to do
        if kind == "candle":
            w.write_candle(candle(7, "101"))
            query, expected = "SELECT count(*) FROM candles WHERE symbol = 'ETH/USD'", 1
        else:
            for i in (1, 2, 3):
                w.write_trade(trade(i))
            query, expected = "SELECT count(*) FROM trades", 3
        deadline = datetime.now(timezone.utc) + timedelta(seconds=0.3 + 10)
        while conn.execute(query).fetchone()[0] < expected and datetime.now(timezone.utc) < deadline:
            conn.rollback()
            threading.Event().wait(0.05)
        assert conn.execute(query).fetchone()[0] == expected  # no flush() call was needed
        assert w.get_stats()["written"] == expected


def test_stop_is_idempotent_flushes_everything_and_refuses_later_writes(settings, conn):
    w = DatabaseWriter(settings.database_url, trade_buffer_size=10_000, trade_flush_interval=3600,
                       candle_flush_interval=3600, settings=settings)
    with pytest.raises(RuntimeError, match="start"):
        w.write_trade(trade(1))
    w.start()
    for i in range(1, 1001):
        w.write_trade(trade(i))
    w.write_candle(candle(100, "101"))
    assert w.stop() is True
    assert w.stop() is True
    assert conn.execute("SELECT count(*) FROM trades").fetchone() == (1000,)
    assert conn.execute("SELECT count(*) FROM candles WHERE symbol = 'ETH/USD'").fetchone() == (1,)
    with pytest.raises(RuntimeError, match="stopped"):
        w.write_trade(trade(5000))
    stats = w.get_stats()
    assert (stats["trades_written"], stats["candles_written"], stats["state"]) == (1000, 1, "stopped")


def test_constructor_refuses_impossible_settings(settings):
    with pytest.raises(ValueError, match="trade_buffer_size"):
        DatabaseWriter(settings.database_url, trade_buffer_size=DatabaseWriter.MAX_TRADE_BUFFER_SIZE + 1)
    with pytest.raises(ValueError, match="pool"):
        DatabaseWriter(settings.database_url, pool_min_size=5, pool_max_size=2)


