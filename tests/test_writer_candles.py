"""DatabaseWriter's incremental 1-minute candles: after any stream, every stored candle equals
store.rebuild_candles of the same minutes (and the pure twin), and the fast path is really taken."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg

from kraken_hist.rules import candles as aggregates

from kraken_hist.storage import store

from kraken_hist.storage.writer import candles as writer_candles
from kraken_hist.storage.writer.sums import EXACT, MinuteSums
from kraken_hist.core.types import CandleRecord, CandleSource, TradeRecord, TradeSource
from kraken_hist.storage import ownership
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.core.pairs import PAIR_MAP

T0 = datetime(2024, 6, 3, 10, 0, tzinfo=timezone.utc)
CANDLE_COLUMNS = "symbol, time, open, high, low, close, vwap, volume, trades, source"
DECIMALS = {"BTC/USD": 1, "ETH/USD": 2, "DOGE/USD": 7}
BASE = {"BTC/USD": Decimal("60000"), "ETH/USD": Decimal("3000"), "DOGE/USD": Decimal("0.12")}


def make_trade(symbol: str, trade_id: int, when: datetime, price: Decimal, volume: Decimal) -> TradeRecord:
    return TradeRecord(symbol=symbol, trade_id=trade_id, time=when, price=price, volume=volume,
                       side="b" if trade_id % 2 else "s", ord_type="l", source=TradeSource.WEBSOCKET)


def generate(rng: random.Random, symbol: str, first_id: int, minutes: int, dense: int) -> list[TradeRecord]:
    """Time-ordered trades with contiguous ids: quiet, busy and one dense minute, bursts sharing
    one timestamp, prices at (and sometimes beyond, with trailing zeros) the pair's decimals,
    volumes with 8 decimals, some zero or written with a positive exponent."""
    quantum = Decimal(1).scaleb(-DECIMALS[symbol])
    out: list[TradeRecord] = []
    trade_id = first_id
    for minute in range(minutes):
        count = dense if minute == minutes // 2 else rng.choice([0, 1, 3, 12, 40])
        offsets = sorted(rng.randrange(60_000_000) for _ in range(count))
        index = 0
        while index < len(offsets):
            burst = rng.choice([1, 1, 1, 2, 5, 17])  # trades sharing one timestamp
            when = T0 + timedelta(minutes=minute, microseconds=offsets[index])
            for _ in range(min(burst, len(offsets) - index)):
                price = (BASE[symbol] * (1 + Decimal(rng.randint(-500, 500)) / 10_000)).quantize(quantum)
                if rng.random() < 0.1:
                    price = Decimal(f"{price}00")  # same value, larger scale
                roll = rng.random()
                if roll < 0.03:
                    volume = Decimal(0)
                elif roll < 0.06:
                    volume = Decimal(f"{rng.randint(1, 9)}E+1")
                else:
                    volume = Decimal(rng.randint(1, 500_000_000)).scaleb(-8)
                out.append(make_trade(symbol, trade_id, when, price, volume))
                trade_id += 1
                index += 1
    return out


def fold(trades: list[TradeRecord]) -> MinuteSums:
    first, *rest = trades
    sums = MinuteSums.of_trade(first.time, first.trade_id, first.price, first.volume,
                               EXACT.multiply(first.price, first.volume))
    for t in rest:
        sums.add(t.time, t.trade_id, t.price, t.volume, EXACT.multiply(t.price, t.volume))
    return sums


def test_minute_sums_in_any_order_and_merged_are_the_minute_s_candle():
    """A minute's summary does not depend on the order its trades came in, nor on how they were
    split into batches: its open/high/low/close/volume/count are the pure candle's."""
    rng = random.Random(11)
    minute = [t for t in generate(rng, "BTC/USD", 1, 3, dense=400)  # the middle minute is the dense one
              if t.time.replace(second=0, microsecond=0) == T0 + timedelta(minutes=1)]
    (candle,) = aggregates.candles_from_trades(minute, price_decimals=DECIMALS["BTC/USD"])
    for _ in range(5):
        shuffled = rng.sample(minute, len(minute))
        cut = rng.randrange(1, len(shuffled))
        whole, merged = fold(shuffled), fold(shuffled[:cut]).merged(fold(shuffled[cut:]))
        for sums in (whole, merged):
            assert (sums.first_price, sums.high, sums.low, sums.last_price, sums.volume, sums.trades) == (
                candle.open, candle.high, candle.low, candle.close, candle.volume, candle.trades)
            assert sums.notional == sum((t.price * t.volume for t in minute), Decimal(0))
            assert (sums.first_id, sums.last_id) == (min(minute, key=lambda t: (t.time, t.trade_id)).trade_id,
                                                     max(minute, key=lambda t: (t.time, t.trade_id)).trade_id)


def candle_rows(conn: psycopg.Connection) -> dict:
    rows = conn.execute(f"SELECT {CANDLE_COLUMNS} FROM candles ORDER BY symbol, time").fetchall()
    return {(r[0], r[1]): r[2:] for r in rows}


def rebuilt_rows(db_url: str) -> dict:
    """The candles table as store.rebuild_candles makes it from every stored trade, built in
    another transaction that is rolled back."""
    with psycopg.connect(db_url) as conn:
        spans = conn.execute("SELECT symbol, min(time), max(time) FROM trades GROUP BY symbol").fetchall()
        for symbol, first, last in spans:
            store.rebuild_candles(conn, symbol, first, last + timedelta(minutes=1),
                decimals=PAIR_MAP[symbol].price_decimals)
        rows = candle_rows(conn)
        conn.rollback()
    return rows


def twin_rows(trades: list[TradeRecord]) -> dict:
    distinct = {(t.symbol, t.trade_id): t for t in trades}
    return {
        (c.symbol, c.time): (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, "trades")
        for c in aggregates.candles_from_trades(distinct.values())
    }


def assert_exact(conn: psycopg.Connection, db_url: str, trades: list[TradeRecord] | None = None) -> dict:
    stored = candle_rows(conn)
    assert stored == rebuilt_rows(db_url)
    if trades is not None:
        assert stored == twin_rows(trades)
    return stored


def other_source_stores(db_url: str, trades: list[TradeRecord]) -> None:
    """Another trade writer (as the backfill does): under the trades lock, insert what is not
    stored and rebuild the touched minutes' candles, one transaction."""
    with psycopg.connect(db_url) as conn:
        for symbol in sorted({t.symbol for t in trades}):
            ownership.lock_symbol(conn, symbol)
        for t in trades:
            conn.execute(
                "INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, 'rest') ON CONFLICT DO NOTHING",
                (t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type),
            )
        for symbol in {t.symbol for t in trades}:
            times = [t.time for t in trades if t.symbol == symbol]
            store.rebuild_candles(conn, symbol, min(times), max(times) + timedelta(microseconds=1),
                decimals=PAIR_MAP[symbol].price_decimals)
        conn.commit()


def new_writer(settings, **kwargs) -> DatabaseWriter:
    options = {"trade_buffer_size": 40, "trade_flush_interval": 0.05, "candle_flush_interval": 0.05,
               "max_retry_delay": 0.2} | kwargs
    return DatabaseWriter(settings.database_url, settings=settings, **options).start()


def test_dense_minute_over_many_flushes_is_maintained_incrementally(settings, conn, db_url):
    rng = random.Random(7)
    trades = [t for t in generate(rng, "BTC/USD", 1, 3, dense=2_000)]
    w = new_writer(settings, trade_buffer_size=50)
    try:
        for index, t in enumerate(trades, 1):
            w.write_trade(t)
            if index % 50 == 0:
                assert w.flush(timeout=60)  # a batch per flush: the dense minute spans 40 of them
        assert w.flush(timeout=60)
        stats = w.get_stats()
    finally:
        w.stop()
    assert stats["trades_written"] == len(trades)
    assert stats["flushes"] >= len(trades) // 50
    # every touched minute of every batch merged; nothing re-aggregated from stored trades
    assert stats["candles_incremental"] >= stats["flushes"]
    assert (stats["candles_fallback"], stats["candles_rebuilt"], stats["merge_fallbacks"]) == (0, 0, 0)
    stored = assert_exact(conn, db_url, trades)
    assert stored[("BTC/USD", T0 + timedelta(minutes=1))][6] == 2_000
    changes = conn.execute("SELECT count(*), min(start_time), max(end_time) FROM candle_changes").fetchone()
    last = max(t.time for t in trades).replace(second=0, microsecond=0)
    assert changes[0] >= stats["flushes"]
    assert (changes[1], changes[2]) == (min(minute for _, minute in stored), last + timedelta(minutes=1))


def test_doubtful_minutes_are_rebuilt_and_then_merged_again(settings, conn, db_url):
    minute = T0 + timedelta(minutes=10)

    def at(second: float, trade_id: int, price: str = "60000.5", volume: str = "0.5") -> TradeRecord:
        return make_trade("BTC/USD", trade_id, minute + timedelta(seconds=second), Decimal(price), Decimal(volume))

    before = [at(1, 100), at(2, 101)]
    other_source_stores(db_url, before)  # the minute already holds trades: the cache is cold
    w = new_writer(settings)
    sent = list(before)
    try:
        def deliver(*trades: TradeRecord) -> dict:
            sent.extend(trades)
            for t in trades:
                w.write_trade(t)
            assert w.flush(timeout=30)
            assert_exact(conn, db_url, sent)
            return w.get_stats()

        stats = deliver(at(3, 102), at(3, 103, "60001.0"))
        assert (stats["candles_fallback"], stats["candles_seeded"], stats["candles_incremental"]) == (1, 1, 0)
        stats = deliver(at(4, 104, "59990.0"))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (1, 1)
        # older than the cached first trade (delivered late), then a burst on the cached last timestamp
        stats = deliver(at(0.5, 98, "59000.0", "2"), at(0.5, 99, "59500.0", "0"))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (1, 2)
        stats = deliver(at(4, 105, "61000.0"))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (1, 3)

        # another writer adds a trade to the minute (and rebuilds it): the cache no longer matches
        other_source_stores(db_url, [at(5, 10_000, "62000.0")])
        sent.append(at(5, 10_000, "62000.0"))
        stats = deliver(at(6, 106))
        assert (stats["candles_fallback"], stats["candles_seeded"], stats["candles_incremental"]) == (2, 2, 3)
        stats = deliver(at(7, 107))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (2, 4)

        # ids already stored: the merge path rebuilds (and re-seeds) the minutes it adds to
        stats = deliver(at(7, 107), at(8, 108))
        assert stats["merge_fallbacks"] == 1 and stats["candles_fallback"] == 2 and stats["candles_seeded"] == 3
        stats = deliver(at(9, 109))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (2, 5)

        # an exchange candle in a minute without trades is replaced by the trades' candle
        quiet = T0 + timedelta(minutes=11)
        w.write_candle(CandleRecord(symbol="BTC/USD", time=quiet, open=Decimal(1), high=Decimal(2), low=Decimal(1),
                                    close=Decimal(2), volume=Decimal(3), vwap=Decimal("1.5"), trades=9,
                                    source=CandleSource.WS_OHLC))
        assert w.flush(timeout=30)
        stats = deliver(make_trade("BTC/USD", 110, quiet + timedelta(seconds=1), Decimal("60000.0"), Decimal(1)))
        assert (stats["candles_fallback"], stats["candles_incremental"]) == (2, 6)
        row = conn.execute("SELECT source, trades FROM candles WHERE symbol = 'BTC/USD' AND time = %s",
                           (quiet,)).fetchone()
        assert row == ("trades", 1)
    finally:
        w.stop()


def test_vwap_is_truncated_exactly_like_the_rebuild_and_the_twin(settings, conn, db_url):
    """Σp·v/Σv = 60000.1 - 1e-14: truncated exactly (rules.sql.kraken_vwap) that is 60000.0, where a
    division rounded before trunc would say 60000.1; the merged candle (computed in SQL from the
    exact sums, with their scales) says what the rebuild and the pure twin say. DOGE: sums with
    15 decimals."""
    minute = T0 + timedelta(minutes=20)
    batches = [
        [make_trade("BTC/USD", 1, minute, Decimal("60000.1"), Decimal("99999.99999999"))],
        [make_trade("BTC/USD", 2, minute + timedelta(seconds=1), Decimal("60000.0"), Decimal("0.00000001")),
         make_trade("DOGE/USD", 1, minute, Decimal("0.1234567"), Decimal("3.00000000"))],
        [make_trade("DOGE/USD", 2, minute, Decimal("0.1234568"), Decimal("0.00000007")),
         make_trade("DOGE/USD", 3, minute, Decimal("0.1000000"), Decimal("7E+1"))],
    ]
    w = new_writer(settings)
    try:
        for batch in batches:
            for t in batch:
                w.write_trade(t)
            assert w.flush(timeout=30)
        stats = w.get_stats()
    finally:
        w.stop()
    assert stats["candles_incremental"] == 4 and stats["candles_fallback"] == 0
    stored = assert_exact(conn, db_url, [t for batch in batches for t in batch])
    assert stored[("BTC/USD", minute)][4] == Decimal("60000.0")


def test_spooled_batches_keep_their_sums(settings, conn, db_url):
    """Batches spooled because the database fell behind are merged on replay too."""

    class SmallBuffers(DatabaseWriter):
        MAX_TRADE_BUFFER_SIZE = 300

    rng = random.Random(3)
    trades = generate(rng, "ETH/USD", 1, 4, dense=3_000)
    w = SmallBuffers(settings.database_url, trade_buffer_size=300, trade_flush_interval=0.05,
                     settings=settings).start()
    try:
        for t in trades:
            w.write_trade(t)
        assert w.flush(timeout=60)
        stats = w.get_stats()
    finally:
        w.stop()
    assert stats["spooled"] > 0 and stats["replayed"] > 0
    assert stats["candles_incremental"] > 0
    assert (stats["candles_fallback"], stats["candles_rebuilt"]) == (0, 0)
    assert_exact(conn, db_url, trades)


def test_random_streams_with_duplicates_disorder_a_second_writer_and_a_rollback(settings, conn, db_url,
                                                                                  monkeypatch):
    rng = random.Random(2024)
    streams = {
        "BTC/USD": generate(rng, "BTC/USD", 1_000, 8, dense=1_500),
        "ETH/USD": generate(rng, "ETH/USD", 50_000, 8, dense=600),
        "DOGE/USD": generate(rng, "DOGE/USD", 7, 8, dense=400),
    }
    # delivery: symbols interleaved; windows of trades swapped (out of order across batches);
    # 2% duplicates of recent trades, some in the same batch, some in later ones
    delivery: list[TradeRecord] = []
    cursors = {symbol: 0 for symbol in streams}
    while cursors:
        symbol = rng.choice(sorted(cursors))
        stream, at = streams[symbol], cursors[symbol]
        window = stream[at:at + rng.randint(1, 60)]
        if rng.random() < 0.2 and at + len(window) < len(stream):
            later = stream[at + len(window):at + len(window) + rng.randint(1, 60)]
            window = later + window
        delivery.extend(window)
        cursors[symbol] = at + len(window)
        if cursors[symbol] >= len(stream):
            del cursors[symbol]
        for _ in range(len(window) // 50):
            delivery.append(rng.choice(delivery[-200:]))
    everything = [t for stream in streams.values() for t in stream]

    # one failure after the incremental upsert ran: the transaction rolls back, the batch is spilled
    real_upsert = writer_candles.upsert_from_sums
    calls = {"n": 0}

    def failing_once(conn_, merged, decimals):
        real_upsert(conn_, merged, decimals)
        calls["n"] += 1
        if calls["n"] == 25:
            raise psycopg.OperationalError("injected: connection lost before COMMIT")

    monkeypatch.setattr(writer_candles, "upsert_from_sums", failing_once)

    first = new_writer(settings)
    second = new_writer(settings, trade_buffer_size=25)  # its own spool slot
    try:
        for index, t in enumerate(delivery):
            first.write_trade(t)
            if rng.random() < 0.08:
                second.write_trade(t)  # the same trades, from another writer
            if index % 700 == 350:  # another source stores a stretch of the stream
                other_source_stores(db_url, delivery[max(0, index - 30):index + 30])
            if index % 120 == 60:  # and trades this writer never sees, in the minute it is writing
                foreign = make_trade(t.symbol, 900_000_000 + index, t.time, t.price, Decimal("1.5"))
                other_source_stores(db_url, [foreign])
                everything.append(foreign)
            if rng.random() < 0.03:
                assert first.flush(timeout=60)
    finally:
        clean = [first.stop(), second.stop()]
    assert clean == [True, True]
    stats = first.get_stats()
    assert calls["n"] > 10 and stats["retries"] >= 1 and stats["replayed"] > 0
    assert stats["candles_incremental"] > 0 and stats["merge_fallbacks"] > 0
    assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == len(everything)
    assert_exact(conn, db_url, everything)
