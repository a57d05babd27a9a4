"""Functions and classes several test modules use: waiting, test databases, reading a database
whole, scraping metrics, running celery and ``kraken-hist stream`` processes, a live stream in
process. Fixtures are in ``conftest.py``; generated trades and candles in ``trade_data.py``.
Test modules import from here, never from one another."""

from __future__ import annotations

import contextlib
import gc
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from celery import Celery

    from kraken_hist.core.config import Settings
    from kraken_hist.core.types import CandleRecord, TradeRecord
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.ingest.live import WebSocketDBIntegration
    from kraken_hist.kraken.rest_parsing import TradesPage


def wait_for(check: Any, timeout: float = 20.0, what: str = "condition", interval: float = 0.1) -> Any:
    """Call `check` until it returns something true, and return that; AssertionError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# ----- test databases


def database_url(admin_url: str, name: str) -> str:
    """`admin_url` pointed at database `name` (keeps host, port, socket query)."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def to_url(conninfo: str) -> str:
    """A libpq key=value string → a postgresql:// URL (what our settings take)."""
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = info.get("host", "")
    user = info.get("user", "postgres")
    port = info.get("port")
    dbname = info.get("dbname", "postgres")
    if host.startswith("/"):
        return f"postgresql://{user}@/{dbname}?host={host}" + (f"&port={port}" if port else "")
    return f"postgresql://{user}@{host}{':' + str(port) if port else ''}/{dbname}"


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        conn.execute(statement)
    return to_url(database_url(admin_url, name))


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def close_to_connections(admin_url: str, name: str, timeout: float = 10.0) -> None:
    """Make database `name` a quiet template: no new connections, none left open.

    ``CREATE DATABASE ... TEMPLATE`` fails while anyone is connected to the template, and
    TimescaleDB's scheduler (a background worker) connects to every database that has the
    extension and allows connections; its launcher skips databases that do not.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        while True:
            pids = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))]
            if not pids:
                return
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if time.monotonic() > deadline:
                raise RuntimeError(f"template database {name} still has connections: {pids}")
            time.sleep(0.05)


# ----- a database read whole


def read(db_url: str, query: str, params: Any = None) -> list[tuple]:
    """Rows of `query` (without `params`, a ``%`` in it is just a character)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    """Every stored row an import or a fill may write (no wall-clock columns), in key order."""
    return {
        "trades": read(db_url, "SELECT symbol, trade_id, time, price, volume, side, ord_type, source FROM trades "
                               "ORDER BY symbol, trade_id"),
        "candles": read(db_url, "SELECT symbol, time, open, high, low, close, vwap, volume, trades, source "
                                "FROM candles ORDER BY symbol, time"),
        "candles_1h": read(db_url, "SELECT * FROM candles_1h ORDER BY symbol, time"),
        "exchange": read(db_url, "SELECT * FROM exchange_candles ORDER BY symbol, interval, time"),
        "coverage": read(db_url, "SELECT symbol, source, ranges::text FROM coverage ORDER BY 1, 2"),
        "sync": read(db_url, "SELECT symbol, data_type, last_time, cursor, last_trade_id FROM sync_status ORDER BY 1, 2"),
    }


def stored_trades(conn: psycopg.Connection, symbol: str) -> list[tuple]:
    """`symbol`'s stored trades by id (a fresh transaction: what others committed is seen)."""
    conn.rollback()
    return conn.execute(
        "SELECT trade_id, time, price, volume, side, ord_type FROM trades WHERE symbol = %s ORDER BY trade_id",
        (symbol,),
    ).fetchall()


# ----- HTTP endpoints and Prometheus metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# ----- celery


def close_app(app: "Celery") -> None:
    """Close the result listener (a Redis pub/sub connection) and the broker pool.

    Collect garbage first: a dead AsyncResult unsubscribes in ``__del__``, which would
    reopen the pub/sub connection after it was closed."""
    gc.collect()
    app.backend.result_consumer.stop()
    app.backend.client.connection_pool.disconnect()
    app.close()


def celery_command(line: str) -> list[str]:
    """A README line as a shell would split it, run with this interpreter's celery."""
    argv = shlex.split(line)
    executable = Path(sys.executable).with_name("celery")
    argv[0] = str(executable) if executable.exists() else (shutil.which("celery") or "celery")
    return argv


# ----- live streams

#: The pairs of the fake exchange that ``conftest.exchange`` serves.
LIVE_SYMBOLS = ("BTC/USD", "ETH/USD")

#: WebSocket client timings for tests: a lost connection is noticed and redone in well under a second.
FAST_WS = dict(heartbeat_timeout=1.0, ack_timeout=2.0, backoff_base=0.05, backoff_cap=0.2, poll_interval=0.05)


class StreamProcess:
    """`kraken-hist stream` in a subprocess, its stderr collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        command = [sys.executable, "-m", "kraken_hist", "stream", *args]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def received(self) -> int:
        counts = [int(m.group(1).replace(",", "")) for line in list(self.lines)
                  if (m := re.search(r"received ([\d,]+)", line))]
        return counts[-1] if counts else 0

    def wait_received(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"stream received {self.received()} < {count}:\n" + "\n".join(self.lines))
            time.sleep(0.05)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._reader.join(5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        return code


class MemoryWriter:
    """A writer keeping what it is given, for a live integration without a database."""

    def __init__(self) -> None:
        self.trades: list["TradeRecord"] = []
        self.candles: list["CandleRecord"] = []
        self.lock = threading.Lock()

    def write_trade(self, record: "TradeRecord") -> None:
        with self.lock:
            self.trades.append(record)

    def write_candle(self, record: "CandleRecord") -> None:
        self.candles.append(record)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def ids(self) -> list[int]:
        with self.lock:
            return [t.trade_id for t in self.trades]


class RecordingRest:
    """The integration's REST fetcher, recording each ``since`` asked and each id received."""

    def __init__(self, inner: "KrakenTradesBackfill") -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.ids: list[int] = []

    def fetch_trades_page(self, symbol: str, since: str | None) -> "TradesPage":
        self.calls.append(int(since or 0))
        page = self.inner.fetch_trades_page(symbol, since)
        self.ids.extend(t.trade_id for t in page.trades)
        return page


@contextlib.contextmanager
def streaming(db_url: str, settings: "Settings", rest_url: str, ws_url: str, symbol: str
              ) -> Iterator[tuple["WebSocketDBIntegration", RecordingRest]]:
    """`symbol` streamed into the database in this process (writer, REST catch-up, WebSocket
    client), stopped and flushed on the way out."""
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.ingest.live import WebSocketDBIntegration
    from kraken_hist.kraken.ratelimit import RateLimiter
    from kraken_hist.kraken.rest_client import KrakenRestClient
    from kraken_hist.kraken.ws_client import KrakenWSClient
    from kraken_hist.storage.writer import DatabaseWriter

    writer = DatabaseWriter(db_url, trade_flush_interval=0.2, candle_flush_interval=0.2,
                            settings=settings, data_dir=settings.data_dir)
    writer.start()
    backfill = KrakenTradesBackfill(db_url, client=KrakenRestClient(rest_url, limiter=RateLimiter(0.0),
                                                                    retry_base_delay=0.02))
    rest = RecordingRest(backfill)
    integration = WebSocketDBIntegration(writer, db_url=db_url, rest=rest, symbols=[symbol],
                                         progress_interval=0.3, retry_cap=0.2)
    integration.start()
    client = KrakenWSClient(ws_url, [symbol], **integration.callbacks(), rng=random.Random(5), ohlc_intervals=(),
                            **FAST_WS)
    client.start()
    try:
        assert client.wait_connected(5)
        yield integration, rest
    finally:
        client.stop()
        integration.stop()
        assert writer.stop() is True
        backfill.close()
