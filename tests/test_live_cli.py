"""``kraken-hist stream`` as a real process: SIGTERM with trades still buffered, then a restart."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket
from kraken_hist.core.timeutils import floor_minute, utcnow

from .helpers import StreamProcess

SYMBOLS = ("BTC/USD", "ETH/USD")


@pytest.fixture
def exchange() -> Iterator[tuple[FakeMarket, FakeKrakenWS, FakeKrakenREST]]:
    now = utcnow()
    market = FakeMarket({s: generate_trades(s, floor_minute(now - timedelta(minutes=10)), now, seed=4) for s in SYMBOLS})
    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.3) as ws:
        yield market, ws, rest


def stored_ids(conn: psycopg.Connection, symbol: str) -> list[int]:
    conn.rollback()
    return [r[0] for r in conn.execute("SELECT trade_id FROM trades WHERE symbol = %s ORDER BY trade_id", (symbol,))]


def test_sigterm_writes_everything_buffered_and_a_restart_continues(
    db_url: str, tmp_path: Path, conn: psycopg.Connection, exchange: tuple[FakeMarket, FakeKrakenWS, FakeKrakenREST]
) -> None:
    market, ws, rest = exchange
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
        "KRAKEN_HIST_DATABASE_URL": db_url,
        "KRAKEN_HIST_WS_URL": ws.url,
        "KRAKEN_HIST_REST_URL": rest.url,
        "KRAKEN_HIST_DATA_DIR": str(tmp_path / "data"),
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
    }
    # a long flush interval: the trades are still buffered when SIGTERM arrives
    args = ("XBTUSD", "eth/usd", "--flush-interval", "60", "--status-interval", "0.1", "--heartbeat-timeout", "3")
    # a fresh start stores whole minutes: from the first trade of the minute of the snapshot's oldest trade
    start_ids = {s: market.trades(s, floor_minute(market.trades(s)[-50].time))[0].trade_id for s in SYMBOLS}
    first = StreamProcess(env, *args)
    try:
        ws.wait_for_subscribers("trade", SYMBOLS, timeout=30)
        for symbol in SYMBOLS:
            ws.publish_new(symbol, 25)
        # snapshot + updates through WebSocket, the start of the snapshot's first minute through REST
        first.wait_received(sum(market.next_trade_id(s) - start_ids[s] for s in SYMBOLS))
        assert stored_ids(conn, "BTC/USD") == []  # nothing written yet: all of it is in the buffer
    finally:
        code = first.terminate()
    assert code == 0, "\n".join(first.lines)
    assert any("stopped:" in line for line in first.lines)
    first_ids = {s: stored_ids(conn, s) for s in SYMBOLS}
    for symbol in SYMBOLS:
        assert first_ids[symbol] == list(range(start_ids[symbol], market.next_trade_id(symbol)))

    for symbol in SYMBOLS:  # trading goes on while nothing runs: more than a snapshot brings back
        for _ in range(4):
            ws.publish_new(symbol, 40)
    second = StreamProcess(env, *args)
    try:
        ws.wait_for_subscribers("trade", SYMBOLS, timeout=30)
        for symbol in SYMBOLS:
            ws.publish_new(symbol, 5)
        second.wait_received(2 * (160 + 5))
    finally:
        code = second.terminate()
    assert code == 0, "\n".join(second.lines)
    for symbol in SYMBOLS:
        ids = stored_ids(conn, symbol)
        assert ids == list(range(first_ids[symbol][0], market.next_trade_id(symbol)))
        conn.rollback()
        status = conn.execute(
            "SELECT last_trade_id FROM sync_status WHERE symbol = %s AND data_type = 'trades'", (symbol,)
        ).fetchone()
        assert status == (market.next_trade_id(symbol) - 1,)
    assert rest.calls["Trades"] >= 2  # the missed ids came through REST
    # the interval relations were refreshed on the way out: nothing left queued, 5m rows there
    pending = conn.execute("SELECT count(*) FROM candle_changes").fetchone()[0]
    fives = conn.execute("SELECT count(*) FROM candles_5m").fetchone()[0]
    assert pending == 0 and fives > 0


def test_unknown_symbol_is_a_usage_error(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
           "KRAKEN_HIST_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "kraken_hist", "stream", "NOPE/USD"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "NOPE/USD" in result.stderr
