"""Live ingestion end to end: fake WebSocket + fake REST on one market → writer → PostgreSQL."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

import psycopg
import pytest

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.core.config import Settings
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket
from kraken_hist.core.timeutils import floor_minute, utcnow
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.kraken.ws_client import KrakenWSClient, Subscription

from .helpers import FAST_WS, stored_trades

SYMBOLS = ("BTC/USD", "ETH/USD", "DOGE/USD")


@dataclass
class Exchange:
    market: FakeMarket
    rest: FakeKrakenREST
    ws: FakeKrakenWS
    start: datetime


@pytest.fixture
def exchange() -> Iterator[Exchange]:
    now = utcnow()
    start = floor_minute(now - timedelta(minutes=20))
    market = FakeMarket({s: generate_trades(s, start, now, seed=11, trades_per_minute=15) for s in SYMBOLS})
    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.2, refuse=["SOL/USD"]) as ws:
        yield Exchange(market, rest, ws, start)


def rest_client(exchange: Exchange) -> KrakenRestClient:
    return KrakenRestClient(exchange.rest.url, limiter=RateLimiter(0.0), retry_base_delay=0.02)


def seed(db_url: str, exchange: Exchange, symbols=SYMBOLS) -> None:
    """What a user does first: backfill history through REST."""
    with KrakenTradesBackfill(db_url, client=rest_client(exchange)) as backfill:
        for symbol in symbols:
            backfill.backfill_symbol(symbol, since=exchange.start)


@dataclass
class Live:
    writer: DatabaseWriter
    integration: WebSocketDBIntegration
    client: KrakenWSClient


@contextlib.contextmanager
def running(db_url: str, settings: Settings, exchange: Exchange, symbols=SYMBOLS, **client_options) -> Iterator[Live]:
    writer = DatabaseWriter(db_url, trade_flush_interval=0.2, candle_flush_interval=0.2,
                            settings=settings, data_dir=settings.data_dir)
    writer.start()
    backfill = KrakenTradesBackfill(db_url, client=rest_client(exchange))
    integration = WebSocketDBIntegration(writer, db_url=db_url, rest=backfill, symbols=symbols,
                                         progress_interval=0.3, retry_cap=0.2)
    integration.start()
    options = {**FAST_WS, **client_options}
    client = KrakenWSClient(exchange.ws.url, symbols, **integration.callbacks(), rng=random.Random(5), **options)
    client.start()
    try:
        yield Live(writer, integration, client)
    finally:
        client.stop()
        integration.stop()
        assert writer.stop() is True
        backfill.close()


def market_trades(exchange: Exchange, symbol: str, first_id: int = 1) -> list[tuple]:
    return [(t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type)
            for t in exchange.market.trades(symbol) if t.trade_id >= first_id]


def stored_candles(conn: psycopg.Connection, symbol: str) -> list[tuple]:
    conn.rollback()
    return conn.execute(
        "SELECT time, open, high, low, close, vwap, volume, trades, source FROM candles WHERE symbol = %s ORDER BY time",
        (symbol,),
    ).fetchall()


def market_candles(exchange: Exchange, symbol: str, source: str = "trades") -> list[tuple]:
    end = utcnow() + timedelta(minutes=5)
    return [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, source)
            for c in exchange.market.candles(symbol, 1, exchange.start - timedelta(hours=1), end)]


def wait_for_database(conn: psycopg.Connection, exchange: Exchange, symbols=SYMBOLS, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if all(stored_trades(conn, s) == market_trades(exchange, s) for s in symbols):
            return
        if time.monotonic() > deadline:
            counts = {s: (len(stored_trades(conn, s)), len(market_trades(exchange, s))) for s in symbols}
            raise AssertionError(f"database did not catch up with the market: {counts}")
        time.sleep(0.1)


def test_streamed_trades_and_candles_equal_the_exchange(db_url: str, settings: Settings, exchange: Exchange,
                                                        conn: psycopg.Connection) -> None:
    seed(db_url, exchange)
    exchange.rest.reset_calls()
    with running(db_url, settings, exchange) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("trade", SYMBOLS)
        rng = random.Random(1)
        for _ in range(10):
            for symbol in SYMBOLS:
                exchange.ws.publish_new(symbol, rng.randint(1, 40), rng=rng)
            time.sleep(0.02)
        wait_for_database(conn, exchange)
        stats = live.integration.stats()
    for symbol in SYMBOLS:
        assert stored_candles(conn, symbol) == market_candles(exchange, symbol)
        status = conn.execute("SELECT last_trade_id FROM sync_status WHERE symbol = %s AND data_type = 'trades'",
                              (symbol,)).fetchone()
        assert status == (exchange.market.next_trade_id(symbol) - 1,)
        covered = conn.execute("SELECT NOT isempty(ranges) FROM coverage WHERE symbol = %s AND source = 'ws'",
                               (symbol,)).fetchone()
        assert covered == (True,)
        sources = dict(conn.execute("SELECT source, count(*) FROM trades WHERE symbol = %s GROUP BY 1",
                                    (symbol,)).fetchall())
        assert sources["ws"] > 0
    assert stats.holes_opened == 0 and stats.missing_ids == 0
    assert exchange.rest.calls["Trades"] == 0  # nothing was missed, so REST was never asked


def test_drops_during_bursts_and_a_stall_lose_nothing(db_url: str, settings: Settings, exchange: Exchange,
                                                      conn: psycopg.Connection) -> None:
    seed(db_url, exchange)
    stop = threading.Event()

    def publisher() -> None:
        rng = random.Random(2)
        while not stop.is_set():
            for symbol in SYMBOLS:
                exchange.ws.publish_new(symbol, rng.randint(1, 60), rng=rng)
            time.sleep(0.005)

    with running(db_url, settings, exchange) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("trade", SYMBOLS)
        thread = threading.Thread(target=publisher, name="test-publisher", daemon=True)
        thread.start()
        try:
            for _ in range(3):
                time.sleep(0.3)
                exchange.ws.wait_for_subscribers("trade", SYMBOLS)
                assert exchange.ws.drop_connections() == 1  # mid-burst: trades go on while we are away
            time.sleep(0.3)
            exchange.ws.wait_for_subscribers("trade", SYMBOLS)
            assert exchange.ws.stall() == 1
            time.sleep(1.5)  # the watchdog (1 s) notices the silence and reconnects
        finally:
            stop.set()
            thread.join()
        wait_for_database(conn, exchange)
        wait_until_whole = time.monotonic() + 5
        while live.integration.open_holes() and time.monotonic() < wait_until_whole:
            time.sleep(0.05)
        stats = live.integration.stats()
        state = live.client.state()
    assert state.reconnects >= 4
    assert stats.holes_opened >= 1 and stats.rest_trades > 0 and stats.missing_ids == 0
    for symbol in SYMBOLS:
        assert stored_candles(conn, symbol) == market_candles(exchange, symbol)
        status = conn.execute("SELECT last_trade_id FROM sync_status WHERE symbol = %s AND data_type = 'trades'",
                              (symbol,)).fetchone()
        assert status == (exchange.market.next_trade_id(symbol) - 1,)


def test_restart_fetches_what_traded_while_down(db_url: str, settings: Settings, exchange: Exchange,
                                                conn: psycopg.Connection) -> None:
    seed(db_url, exchange, symbols=("ETH/USD",))
    with running(db_url, settings, exchange, symbols=("ETH/USD",)) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("trade", ["ETH/USD"])
        exchange.ws.publish_new("ETH/USD", 30)
        wait_for_database(conn, exchange, symbols=("ETH/USD",))
    # down: 300 trades happen, more than a reconnect snapshot (50) could bring back
    for _ in range(10):
        exchange.ws.publish_new("ETH/USD", 30)
    with running(db_url, settings, exchange, symbols=("ETH/USD",)) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("trade", ["ETH/USD"])
        exchange.ws.publish_new("ETH/USD", 5)
        wait_for_database(conn, exchange, symbols=("ETH/USD",))
        stats = live.integration.stats()
    assert stats.rest_trades >= 250 and stats.holes_opened == 1
    assert stored_candles(conn, "ETH/USD") == market_candles(exchange, "ETH/USD")


def test_refused_symbol_is_an_error_while_the_others_are_stored(db_url: str, settings: Settings,
                                                                exchange: Exchange, conn: psycopg.Connection) -> None:
    with running(db_url, settings, exchange, symbols=("SOL/USD", "BTC/USD")) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("trade", ["BTC/USD"])
        published = exchange.ws.publish_new("BTC/USD", 20)
        deadline = time.monotonic() + 10
        while len(stored_trades(conn, "BTC/USD")) < 50 + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        state = live.client.state()
    assert state.refused[Subscription("trade", "SOL/USD")] == "Currency pair not supported SOL/USD"
    ids = [row[0] for row in stored_trades(conn, "BTC/USD")]
    assert ids[-20:] == [t.trade_id for t in published]
    assert ids == list(range(ids[0], ids[-1] + 1))  # snapshot + updates, contiguous
    assert stored_trades(conn, "SOL/USD") == []


def test_ohlc_fills_minutes_without_stored_trades_but_never_replaces_trade_candles(
    db_url: str, settings: Settings, exchange: Exchange, conn: psycopg.Connection
) -> None:
    half = exchange.start + timedelta(minutes=10)
    with KrakenTradesBackfill(db_url, client=rest_client(exchange)) as backfill:
        backfill.backfill_symbol("BTC/USD", since=exchange.start, until=half)
    with running(db_url, settings, exchange, symbols=("BTC/USD",), trades=False) as live:
        assert live.client.wait_connected(5)
        exchange.ws.wait_for_subscribers("ohlc", ["BTC/USD"])
        exchange.ws.publish_new("BTC/USD", 10)
        expected = {row[0]: row for row in market_candles(exchange, "BTC/USD")}
        deadline = time.monotonic() + 10
        while live.integration.stats().candles < len(expected) and time.monotonic() < deadline:
            time.sleep(0.05)
    rows = stored_candles(conn, "BTC/USD")  # stop() wrote everything accepted
    assert [r[0] for r in rows] == sorted(expected)
    for row in rows:
        source = "trades" if row[0] < floor_minute(half) else "ws_ohlc"
        assert row[-1] == source, row
        assert row[:-1] == expected[row[0]][:-1]
