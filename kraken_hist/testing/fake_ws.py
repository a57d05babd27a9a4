"""A fake Kraken WebSocket v2 server on loopback: a small RFC 6455 server on stdlib sockets.

It speaks v2 as KRAKEN.md and the recorded frames show: a ``status`` frame on connect (with
a ``connection_id`` above 2^63), one subscribe ack per symbol with ``time_in``/``time_out``,
refusals of unknown or legacy names (``XBT/USD`` → "Currency pair not supported XBT/USD"),
heartbeats about once a second when idle, ping → pong, ``trade`` and ``ohlc`` snapshots and
updates with JSON numbers, ohlc rows keyed by ``interval_begin`` with quiet minutes absent.

It reads the same :class:`FakeMarket` as the fake REST server, so both agree on trade ids.
``publish`` appends live trades to the market and broadcasts them. Faults on demand:
``drop_connections`` (abrupt TCP reset: the client sees 1006), ``stall`` (stop sending and
reading without closing) and ``send_malformed``. No new dependency, full control over faults.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Sequence

from kraken_hist.core.intervals import Interval
from kraken_hist.core.timeutils import EPOCH, utcnow
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade
from kraken_hist.testing.market import FakeMarket
from kraken_hist.testing.ws_frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameReader, accept_key, frame_header
from kraken_hist.testing.ws_messages import (
    MALFORMED_FRAMES,
    OHLC_INTERVALS,
    TRADE_SNAPSHOT_DEPTH,
    RunningCandle,
    candle_item,
    next_trades,
    rfc3339,
    trade_item,
)

logger = logging.getLogger(__name__)

@dataclass
class _Connection:
    """One client socket and what it subscribed to."""

    sock: socket.socket
    number: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    subscriptions: set[tuple[str, str, int]] = field(default_factory=set)  # (channel, symbol, interval)
    heartbeats: bool = False
    stalled: bool = False
    closed: bool = False
    last_sent: float = field(default_factory=time.monotonic)


class FakeKrakenWS:
    """The fake v2 endpoint; ``url`` is ``ws://127.0.0.1:PORT/v2`` once started."""

    def __init__(
        self,
        market: FakeMarket,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval: float = 1.0,
        max_trades_per_frame: int = 100,
        ohlc_snapshot_depth: int = 60,
        refuse: Iterable[str] = (),
        mute: Iterable[str] = (),
    ) -> None:
        self.market = market
        self.heartbeat_interval = heartbeat_interval
        self.max_trades_per_frame = max_trades_per_frame
        self.ohlc_snapshot_depth = ohlc_snapshot_depth
        self.refused = set(refuse)  # extra symbols to refuse although known
        self.muted = set(mute)  # symbols whose subscribe gets no answer at all (a lost ack)
        self._host, self._port = host, port
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()  # subscribe/publish/drop: a snapshot never races an update
        self._connections: dict[int, _Connection] = {}
        self._running: dict[tuple[str, int], RunningCandle] = {}
        self._numbers = 0
        self.stats = {"connections": 0, "frames_sent": 0, "trades_sent": 0, "requests": 0, "drops": 0}

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeKrakenWS is not started")
        host, port = self._server.getsockname()[:2]
        return f"ws://{host}:{port}/v2"

    def start(self) -> "FakeKrakenWS":
        server = socket.create_server((self._host, self._port), reuse_port=False)
        server.settimeout(0.2)
        self._server = server
        for name, target in (("fake-ws-accept", self._accept_loop), ("fake-ws-heartbeat", self._heartbeat_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        with self._lock:
            for conn in list(self._connections.values()):
                self._close(conn, abrupt=True)
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> "FakeKrakenWS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- push API and faults --------------------------------------------------------------

    def publish(self, symbol: str, trades: Sequence[HistoricalTrade]) -> None:
        """Trades "happen": appended to the market, then sent to every trade/ohlc subscriber."""
        canonical = self.market.canonical(symbol)
        with self._lock:
            self.market.append(canonical, trades)
            self._broadcast_trades(canonical, trades)

    def broadcast(self, symbol: str, trades: Sequence[HistoricalTrade]) -> None:
        """Send trades already appended to the market (benchmarks make them before timing)."""
        with self._lock:
            self._broadcast_trades(self.market.canonical(symbol), trades)

    def publish_new(self, symbol: str, count: int, *, rng: random.Random | None = None) -> list[HistoricalTrade]:
        """Make `count` new trades of `symbol` at the market's now and publish them."""
        with self._lock:
            trades = next_trades(self.market, symbol, count, rng=rng)
            self.publish(symbol, trades)
        return trades

    def drop_connections(self) -> int:
        """Cut every connection abruptly (TCP reset, no close frame: the client sees 1006)."""
        with self._lock:
            conns = list(self._connections.values())
            for conn in conns:
                self._close(conn, abrupt=True)
            self.stats["drops"] += len(conns)
        return len(conns)

    def stall(self) -> int:
        """Stop talking on every current connection without closing it (no heartbeats either).
        New connections behave normally."""
        with self._lock:
            conns = list(self._connections.values())
            for conn in conns:
                conn.stalled = True
        return len(conns)

    def send_malformed(self, frames: Iterable[str] = MALFORMED_FRAMES) -> None:
        """Send each text in `frames` to every live connection."""
        texts = list(frames)
        with self._lock:
            for conn in list(self._connections.values()):
                for text in texts:
                    self._send_text(conn, text)

    def connection_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections.values() if not c.stalled)

    def subscribers(self, channel: str, symbol: str) -> int:
        """How many live connections are subscribed to `channel` for `symbol`."""
        with self._lock:
            return sum(
                1 for c in self._connections.values()
                if not c.stalled and any(s[0] == channel and s[1] == symbol for s in c.subscriptions)
            )

    def wait_for_subscribers(self, channel: str, symbols: Iterable[str], timeout: float = 10.0) -> None:
        """Block until each symbol has a live `channel` subscriber; TimeoutError otherwise."""
        wanted = list(symbols)
        deadline = time.monotonic() + timeout
        while not all(self.subscribers(channel, s) for s in wanted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {channel} subscriber for {wanted} within {timeout}s")
            time.sleep(0.01)

    # --- connections ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._numbers += 1
                conn = _Connection(sock=sock, number=self._numbers)
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"fake-ws-conn-{conn.number}", daemon=True)
            thread.start()

    def _serve(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            sock.settimeout(5)
            if not self._handshake(sock):
                sock.close()
                return
            sock.settimeout(0.5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections[conn.number] = conn
                self.stats["connections"] += 1
            self._send_json(conn, {
                "channel": "status", "type": "update",
                "data": [{
                    "version": "2.0.10", "system": "online", "api_version": "v2",
                    "connection_id": (1 << 63) + random.getrandbits(62) + 1,
                    "upcoming_maintenance": [], "emergency": [],
                }],
            })
            reader = FrameReader(sock)
            while not self._stop.is_set() and not conn.closed:
                try:
                    frame = reader.read()
                except socket.timeout:
                    continue
                if frame is None:
                    break
                if conn.stalled:
                    continue
                opcode, payload = frame
                if opcode == OP_TEXT:
                    self._on_request(conn, payload.decode("utf-8", "replace"))
                elif opcode == OP_PING:
                    self._send_frame(conn, OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    self._send_frame(conn, OP_CLOSE, payload[:2] or struct.pack("!H", 1000))
                    break
        except (OSError, ValueError) as exc:
            logger.debug("fake ws connection %d ended: %r", conn.number, exc)
        finally:
            with self._lock:
                self._close(conn, abrupt=False)

    def _handshake(self, sock: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
            if len(data) > 65536:
                return False
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if not key or "websocket" not in headers.get("upgrade", "").lower():
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return False
        accept = accept_key(key)
        sock.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        return True

    def _close(self, conn: _Connection, *, abrupt: bool) -> None:
        """Caller holds the lock. Abrupt: RST via SO_LINGER 0, so no close frame is ever seen."""
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop(conn.number, None)
        locked = conn.send_lock.acquire(timeout=1.0)  # do not close under a sender's feet
        try:
            if abrupt:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
        except OSError as exc:
            logger.debug("fake ws connection %d already gone: %r", conn.number, exc)
        finally:
            if locked:
                conn.send_lock.release()

    # --- requests -------------------------------------------------------------------------

    def _on_request(self, conn: _Connection, text: str) -> None:
        self.stats["requests"] += 1
        time_in = rfc3339(utcnow())
        try:
            request = json.loads(text)
            method = request["method"]
        except (ValueError, KeyError, TypeError):
            self._send_json(conn, {"error": "Malformed request", "success": False,
                                   "time_in": time_in, "time_out": rfc3339(utcnow())})
            return
        req_id = request.get("req_id")
        extra = {"req_id": req_id} if isinstance(req_id, int) else {}
        if method == "ping":
            self._send_json(conn, {"method": "pong", **extra, "time_in": time_in, "time_out": rfc3339(utcnow())})
        elif method in ("subscribe", "unsubscribe"):
            self._on_subscribe(conn, method, request.get("params") or {}, extra, time_in)
        else:
            self._send_json(conn, {"error": f"Method not found {method}", "method": method, "success": False,
                                   **extra, "time_in": time_in, "time_out": rfc3339(utcnow())})

    def _accepts(self, symbol: object) -> bool:
        """Only exact canonical v2 names: ``XBT/USD`` and lower case are refused, like Kraken."""
        if not isinstance(symbol, str) or symbol in self.refused:
            return False
        if self.market.has(symbol):
            return True
        listing = self.market.universe.find(symbol)
        return listing is not None and listing.symbol == symbol and listing.listed

    def _on_subscribe(self, conn: _Connection, method: str, params: dict, extra: dict, time_in: str) -> None:
        channel = params.get("channel")
        symbols = params.get("symbol") or []
        interval = params.get("interval", 1) if channel == "ohlc" else 0
        snapshot = params.get("snapshot", channel == "ohlc")
        conn.heartbeats = True
        if channel not in ("trade", "ohlc") or not isinstance(symbols, list) or (
            channel == "ohlc" and interval not in OHLC_INTERVALS
        ):
            self._send_json(conn, {"error": f"Unsupported request for channel {channel!r}", "method": method,
                                   "success": False, **extra, "time_in": time_in, "time_out": rfc3339(utcnow())})
            return
        for symbol in symbols:
            if symbol in self.muted:
                continue
            if not self._accepts(symbol):
                self._send_json(conn, {"error": f"Currency pair not supported {symbol}", "method": method,
                                       "success": False, "symbol": symbol, **extra,
                                       "time_in": time_in, "time_out": rfc3339(utcnow())})
                continue
            result: dict[str, Any] = {"channel": channel}
            if channel == "ohlc":
                result["interval"] = interval
            result["snapshot"] = bool(snapshot)
            result["symbol"] = symbol
            if channel == "ohlc":
                result["warnings"] = ["timestamp is deprecated, use interval_begin"]
            with self._lock:  # the ack, the snapshot and the registration are one step
                key = (channel, symbol, interval)
                if method == "subscribe":
                    conn.subscriptions.add(key)
                else:
                    conn.subscriptions.discard(key)
                self._send_json(conn, {"method": method, "result": result, "success": True, **extra,
                                       "time_in": time_in, "time_out": rfc3339(utcnow())})
                if method == "subscribe" and snapshot and self.market.has(symbol):
                    self._send_snapshot(conn, channel, symbol, interval)

    def _send_snapshot(self, conn: _Connection, channel: str, symbol: str, interval: int) -> None:
        if channel == "trade":
            trades = [t for t, _ in self.market.trades_since(symbol, None, TRADE_SNAPSHOT_DEPTH)]
            items = ",".join(trade_item(t) for t in trades)
            self._send_text(conn, f'{{"channel":"trade","type":"snapshot","data":[{items}]}}')
            return
        now = self.market.now()
        start = Interval(interval).bucket_start(now) - timedelta(minutes=interval * (self.ohlc_snapshot_depth - 1))
        candles = self.market.candles(symbol, interval, start, now + timedelta(minutes=interval))
        items = ",".join(candle_item(c) for c in candles)
        self._send_text(conn, f'{{"channel":"ohlc","type":"snapshot","timestamp":"{rfc3339(utcnow(), 9)}",'
                              f'"data":[{items}]}}')

    # --- broadcasting ---------------------------------------------------------------------

    def _broadcast_trades(self, symbol: str, trades: Sequence[HistoricalTrade]) -> None:
        """Caller holds the lock. One trade frame per chunk, then the running candles."""
        trade_conns = [c for c in self._connections.values() if ("trade", symbol, 0) in c.subscriptions]
        if trade_conns and trades:
            for lo in range(0, len(trades), self.max_trades_per_frame):
                chunk = trades[lo:lo + self.max_trades_per_frame]
                text = '{"channel":"trade","type":"update","data":[' + ",".join(trade_item(t) for t in chunk) + "]}"
                for conn in trade_conns:
                    self._send_text(conn, text, trades=len(chunk))
        # (by lookups, not a scan of every subscription: a connection may hold hundreds of pairs)
        intervals = {i for i in OHLC_INTERVALS for c in self._connections.values() if ("ohlc", symbol, i) in c.subscriptions}
        for interval in sorted(intervals):
            candles = self._update_running(symbol, interval, trades)
            items = ",".join(candle_item(c) for c in candles)
            text = (f'{{"channel":"ohlc","type":"update","timestamp":"{rfc3339(utcnow(), 9)}",'
                    f'"data":[{items}]}}')
            for conn in list(self._connections.values()):
                if ("ohlc", symbol, interval) in conn.subscriptions:
                    self._send_text(conn, text)

    def _update_running(self, symbol: str, interval: int, trades: Sequence[HistoricalTrade]) -> list[HistoricalCandle]:
        """Running candles of the buckets `trades` touched (already appended to the market)."""
        decimals = self.market.universe.get(symbol).price_decimals
        seconds = interval * 60
        touched: list[HistoricalCandle] = []
        state = self._running.get((symbol, interval))
        index = 0
        while index < len(trades):
            key = int((trades[index].time - EPOCH).total_seconds()) // seconds
            group_end = index
            while group_end < len(trades) and int((trades[group_end].time - EPOCH).total_seconds()) // seconds == key:
                group_end += 1
            if state is None or state.key != key:
                start = EPOCH + timedelta(seconds=key * seconds)
                # first time this bucket is seen: every stored trade of it, the new ones included
                bucket = self.market.trades(symbol, start, start + timedelta(seconds=seconds))
                bucket = bucket or list(trades[index:group_end])
                state = RunningCandle(key=key, open=bucket[0].price, high=bucket[0].price,
                                 low=bucket[0].price, close=bucket[0].price)
                for trade in bucket:
                    state.add(trade)
            else:
                for trade in trades[index:group_end]:
                    state.add(trade)
            touched.append(state.candle(symbol, interval, decimals))
            index = group_end
        if state is not None:
            self._running[(symbol, interval)] = state
        return touched

    def _heartbeat_loop(self) -> None:
        tick = max(0.01, self.heartbeat_interval / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                conns = list(self._connections.values())
            for conn in conns:
                if conn.heartbeats and now - conn.last_sent >= self.heartbeat_interval:
                    self._send_text(conn, '{"channel":"heartbeat"}')

    # --- frames out -----------------------------------------------------------------------

    def _send_json(self, conn: _Connection, obj: dict) -> None:
        self._send_text(conn, json.dumps(obj, separators=(",", ":")))

    def _send_text(self, conn: _Connection, text: str, *, trades: int = 0) -> None:
        self._send_frame(conn, OP_TEXT, text.encode("utf-8"))
        if not conn.closed and not conn.stalled:
            self.stats["trades_sent"] += trades

    def _send_frame(self, conn: _Connection, opcode: int, payload: bytes) -> None:
        if conn.closed or conn.stalled:
            return
        header = frame_header(opcode, len(payload))
        with conn.send_lock:
            try:
                conn.sock.sendall(header + payload)
            except OSError:
                conn.closed = True  # the reader thread notices and cleans up
                return
            conn.last_sent = time.monotonic()
            self.stats["frames_sent"] += 1


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kraken_hist.testing.fake_ws --port 8081``: serve generated trades, live."""
    import argparse

    from kraken_hist.testing.fake_rest import demo_market

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--symbols", default="BTC/USD,ETH/USD")
    parser.add_argument("--rate", type=float, default=5.0, help="new trades per second per symbol")
    args = parser.parse_args(argv)
    now = utcnow()
    # History ends now: the trades published below continue it (a history running into the
    # future would put them out of order). For REST and WebSocket on one market, use
    # python -m kraken_hist.testing.fake_exchange.
    market = demo_market([s for s in args.symbols.split(",") if s.strip()], days=2 / 24, trades_per_minute=20.0,
                         seed=1, now=now, ahead=0)
    symbols = market.symbols()
    with FakeKrakenWS(market, port=args.port) as server:
        print(f"fake Kraken WebSocket v2 at {server.url}", flush=True)
        try:
            while True:
                time.sleep(1)
                for symbol in symbols:
                    server.publish_new(symbol, max(1, round(random.expovariate(1 / args.rate))))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
