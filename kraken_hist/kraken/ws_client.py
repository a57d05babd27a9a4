"""A threaded Kraken WebSocket v2 client (websocket-client), with a lifecycle you can rely on.

One named daemon thread owns the socket: it connects, subscribes (``trade``; ``ohlc`` at
interval 1 and any others asked for), checks **every** ack — Kraken refuses a bad symbol
once and then stays silent for it while heartbeats keep flowing, so a refusal is reported
through ``on_error``, logged as an error and listed in :meth:`KrakenWSClient.state` — and a
missing ack within ``ack_timeout`` is an error too. A watchdog pings when the line is quiet
and reconnects when nothing at all arrives for ``heartbeat_timeout`` seconds. Reconnects
wait a full-jitter exponential back-off (capped; reset once a connection is fully
subscribed) and replay the subscriptions. A malformed or unknown frame is logged with its
text and skipped. The plain ``WebSocket`` class (not ``WebSocketApp.run_forever``) keeps
timeouts, the watchdog and the reconnect policy in one readable loop we control. What to
subscribe to and which ack answers what are pure decisions in ``ws_subscriptions``.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import random
import socket
import threading
import time
from typing import Callable, Iterable, Sequence

import websocket

from kraken_hist.core.config import DEFAULT_WS_URL, Settings
from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError, KrakenHistError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.kraken.ws_parsing import (
    FrameError,
    HeartbeatMessage,
    Message,
    MethodResponse,
    OhlcMessage,
    StatusMessage,
    TradeMessage,
    parse_frame,
)
from kraken_hist.kraken.ws_subscriptions import (
    SYMBOLS_PER_REQUEST,
    ClientState,
    Subscription,
    SubscriptionRefusedError,
    SubscriptionTimeoutError,
    acked_subscription,
    by_name,
    late_subscriptions,
    subscribe_requests,
    to_ws_symbol,
    wanted_subscriptions,
)
from kraken_hist.rules.backoff import Backoff

__all__ = [  # the subscription names are importable from here as before the split
    "SYMBOLS_PER_REQUEST", "ClientState", "ConnectionLostError", "KrakenWSClient", "Subscription",
    "SubscriptionRefusedError", "SubscriptionTimeoutError", "to_ws_symbol",
]

logger = logging.getLogger(__name__)

TradeCallback = Callable[[TradeMessage], None]
OhlcCallback = Callable[[OhlcMessage], None]
StatusCallback = Callable[[StatusMessage], None]
ErrorCallback = Callable[[KrakenHistError], None]
ConnectCallback = Callable[[int], None]


class ConnectionLostError(ExchangeTransientError):
    """The connection closed, failed, or went silent; the client reconnects."""


class KrakenWSClient:
    """Streams v2 ``trade``/``ohlc`` for many symbols on its own thread; ``start``/``stop``."""

    def __init__(
        self,
        url: str = DEFAULT_WS_URL,
        symbols: Iterable[str] = (),
        *,
        trades: bool = True,
        ohlc_intervals: Sequence[int] = (1,),
        trade_snapshot: bool = True,
        ohlc_snapshot: bool = True,
        on_trade: TradeCallback | None = None,
        on_ohlc: OhlcCallback | None = None,
        on_status: StatusCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_connect: ConnectCallback | None = None,
        heartbeat_timeout: float = 10.0,
        ping_after: float | None = None,
        ack_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        poll_interval: float = 0.2,
        name: str = "kraken-ws",
        registry: PairRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.on_trade, self.on_ohlc, self.on_status = on_trade, on_ohlc, on_status
        self.on_error, self.on_connect = on_error, on_connect
        self.heartbeat_timeout = heartbeat_timeout
        self.ping_after = ping_after if ping_after is not None else heartbeat_timeout / 2
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.poll_interval = poll_interval
        self.trade_snapshot, self.ohlc_snapshot = trade_snapshot, ohlc_snapshot
        self._registry = registry if registry is not None else PairRegistry()
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._wanted: list[Subscription] = []
        self._subscribed: set[Subscription] = set()
        self._pending: dict[Subscription, float] = {}  # → ack deadline (monotonic)
        self._refused: dict[Subscription, str] = {}
        self._requests: dict[int, list[Subscription]] = {}  # req_id → what it asked for
        self._commands: queue.SimpleQueue[list[Subscription]] = queue.SimpleQueue()
        self._req_ids = itertools.count(1)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._ws: websocket.WebSocket | None = None
        self._counters = dict.fromkeys(
            ("connections", "messages", "trades", "candles", "malformed", "refused_items", "errors"), 0
        )
        self._connection_id: int | None = None
        self._session_messages = 0
        self._last_message: float | None = None
        self._last_trade: float | None = None
        self._add(symbols, trades=trades, ohlc_intervals=ohlc_intervals)

    @classmethod
    def from_settings(cls, settings: Settings, symbols: Iterable[str] | None = None, **kwargs: object) -> "KrakenWSClient":
        return cls(settings.ws_url, symbols if symbols is not None else settings.symbols, **kwargs)  # type: ignore[arg-type]

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "KrakenWSClient":
        """Start the connection thread (connecting happens there, never in ``__init__``)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{self.name} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the connection (a clean close frame when possible) and join the thread."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout=max(self.poll_interval * 5, 1.0))
        if thread.is_alive():  # stuck in connect or a blocked send: cut the socket
            ws = self._ws
            if ws is not None:
                ws.abort()
            thread.join(timeout=timeout)
        if thread.is_alive():
            logger.error("%s thread did not stop within %.1fs", self.name, timeout)
        self._thread = None

    def __enter__(self) -> "KrakenWSClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until a connection is up with every subscription acked (or refused)."""
        return self._connected.wait(timeout)

    def subscribe(self, symbols: Iterable[str], *, trades: bool = True, ohlc_intervals: Sequence[int] = (1,)) -> None:
        """Add symbols (any Kraken name) or OHLC intervals; sent now if connected, replayed on reconnects."""
        added = self._add(symbols, trades=trades, ohlc_intervals=ohlc_intervals)
        if added:
            self._commands.put(added)

    def state(self) -> ClientState:
        now = time.monotonic()
        with self._lock:
            return ClientState(
                running=self.is_running,
                connected=self._connected.is_set(),
                connection_id=self._connection_id,
                connections=self._counters["connections"],
                reconnects=max(0, self._counters["connections"] - 1),
                messages=self._counters["messages"],
                trades=self._counters["trades"],
                candles=self._counters["candles"],
                malformed=self._counters["malformed"],
                errors=self._counters["errors"],
                last_message_age=None if self._last_message is None else now - self._last_message,
                last_trade_age=None if self._last_trade is None else now - self._last_trade,
                subscribed=tuple(sorted(self._subscribed, key=by_name)),
                pending=tuple(sorted(self._pending, key=by_name)),
                refused=dict(self._refused),
                refused_items=self._counters["refused_items"],
            )

    # --- the connection thread ------------------------------------------------------------

    def _add(self, symbols: Iterable[str], *, trades: bool, ohlc_intervals: Sequence[int]) -> list[Subscription]:
        wanted = wanted_subscriptions(symbols, self._registry, trades=trades, ohlc_intervals=ohlc_intervals)
        with self._lock:
            added = [s for s in dict.fromkeys(wanted) if s not in self._wanted]
            self._wanted.extend(added)
        return added

    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            if not first:
                delay = Backoff(self.backoff_base, self.backoff_cap, jitter="full").delay(attempt + 1, self._rng)
                attempt += 1
                logger.info("%s reconnecting in %.2fs (attempt %d)", self.name, delay, attempt)
                if self._stop.wait(delay):
                    break
            first = False
            try:
                ws = self._connect()
            except (OSError, websocket.WebSocketException) as exc:
                self._report(ConnectionLostError(f"cannot connect to {self.url}: {exc!r}"), level=logging.WARNING)
                continue
            self._ws = ws
            try:
                if self._session(ws):
                    attempt = 0
            finally:
                self._connected.clear()
                with self._lock:
                    self._subscribed.clear()
                    self._pending.clear()
                    self._requests.clear()
                self._close(ws)
                self._ws = None

    def _connect(self) -> websocket.WebSocket:
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
        ws.connect(self.url, timeout=self.connect_timeout)
        ws.settimeout(self.poll_interval)
        if ws.sock is not None:
            ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._counters["connections"] += 1
            number = self._counters["connections"]
            self._last_message = time.monotonic()
        logger.info("%s connected to %s (connection %d)", self.name, self.url, number)
        if self.on_connect is not None:
            self._call(self.on_connect, number)
        return ws

    def _session(self, ws: websocket.WebSocket) -> bool:
        """Subscribe and read until the connection fails or stop; True if it became fully subscribed."""
        with self._lock:
            todo = [s for s in self._wanted if s not in self._refused]
            self._session_messages = 0
            self._connection_id = None
        established = False
        try:
            self._send_subscribe(ws, todo)
            last_ping = 0.0
            while not self._stop.is_set():
                while not self._commands.empty():
                    self._send_subscribe(ws, self._commands.get_nowait())
                try:
                    opcode, data = ws.recv_data(control_frame=True)
                except websocket.WebSocketTimeoutException:
                    opcode, data = None, b""
                now = time.monotonic()
                if opcode is not None:
                    self._last_message = now
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        raise ConnectionLostError(f"server closed the connection ({_close_code(data)})")
                    if opcode == websocket.ABNF.OPCODE_TEXT:
                        self._dispatch(data)
                assert self._last_message is not None
                silent = now - self._last_message
                if silent > self.heartbeat_timeout:
                    raise ConnectionLostError(f"no message for {silent:.1f}s (watchdog)")
                if silent > self.ping_after and now - last_ping > self.ping_after:
                    ws.send(json.dumps({"method": "ping", "req_id": next(self._req_ids)}))
                    last_ping = now
                self._check_acks(now)
                if self._session_messages and not self._pending and not self._connected.is_set():
                    established = True
                    self._connected.set()
            self._close(ws, clean=True)
        except ConnectionLostError as exc:
            self._report(exc, level=logging.WARNING)
        except SubscriptionTimeoutError as exc:
            self._report(exc, level=logging.ERROR)
        except (OSError, websocket.WebSocketException) as exc:
            self._report(ConnectionLostError(f"connection lost: {exc!r}"), level=logging.WARNING)
        return established

    def _send_subscribe(self, ws: websocket.WebSocket, subs: Sequence[Subscription]) -> None:
        deadline = time.monotonic() + self.ack_timeout
        for req_id, chunk, request in subscribe_requests(subs, self._req_ids, trade_snapshot=self.trade_snapshot,
                                                         ohlc_snapshot=self.ohlc_snapshot):
            with self._lock:
                self._requests[req_id] = chunk
                for sub in chunk:
                    self._pending[sub] = deadline
            ws.send(json.dumps(request))
        if subs:
            self._connected.clear()

    def _check_acks(self, now: float) -> None:
        with self._lock:
            late = late_subscriptions(self._pending, now)
        if late:
            names = ", ".join(s.describe() for s in late)
            raise SubscriptionTimeoutError(f"no subscribe ack within {self.ack_timeout}s for {names}")

    # --- frames ---------------------------------------------------------------------------

    def _dispatch(self, data: bytes) -> None:
        try:
            message = parse_frame(data)
        except FrameError as exc:
            with self._lock:
                self._counters["malformed"] += 1
            logger.warning("%s skipped a frame: %s", self.name, exc)
            return
        refused = getattr(message, "refused", ())
        with self._lock:
            self._counters["messages"] += 1
            self._counters["refused_items"] += len(refused)
            self._session_messages += 1
        for item in refused:
            logger.warning("%s refused %s", self.name, item.reason)
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(self, message)

    def _on_trade_message(self, message: TradeMessage) -> None:
        with self._lock:
            self._counters["trades"] += len(message.trades)
            self._last_trade = time.monotonic()
        if self.on_trade is not None:
            self._call(self.on_trade, message)

    def _on_ohlc_message(self, message: OhlcMessage) -> None:
        with self._lock:
            self._counters["candles"] += len(message.candles)
        if self.on_ohlc is not None:
            self._call(self.on_ohlc, message)

    def _on_status_message(self, message: StatusMessage) -> None:
        self._connection_id = message.connection_id
        if message.system != "online":
            logger.warning("%s: exchange status %s", self.name, message.system)
        if self.on_status is not None:
            self._call(self.on_status, message)

    def _on_method_response(self, message: MethodResponse) -> None:
        if message.method in ("subscribe", "unsubscribe"):
            self._on_ack(message)
        elif message.method == "pong":
            return
        elif not message.success:
            self._report(ExchangePermanentError(f"request refused: {message.error}"), level=logging.ERROR)

    def _on_ack(self, message: MethodResponse) -> None:
        with self._lock:
            asked = self._requests.get(message.req_id, []) if message.req_id is not None else []
            sub = acked_subscription(message, asked, self._pending)
            if sub is not None:
                self._pending.pop(sub, None)
                if message.success:
                    self._subscribed.add(sub)
                else:
                    self._refused[sub] = message.error or "refused"
        if not message.success:
            self._report(
                SubscriptionRefusedError(sub.channel if sub else message.channel, message.symbol, message.error or "refused"),
                level=logging.ERROR,
            )
        elif sub is None:
            logger.warning("%s: ack for nothing pending: %s %s", self.name, message.channel, message.symbol)

    _handlers: dict[type, Callable[["KrakenWSClient", Message], None]] = {
        TradeMessage: _on_trade_message,  # type: ignore[dict-item]
        OhlcMessage: _on_ohlc_message,  # type: ignore[dict-item]
        StatusMessage: _on_status_message,  # type: ignore[dict-item]
        MethodResponse: _on_method_response,  # type: ignore[dict-item]
        HeartbeatMessage: lambda self, message: None,
    }

    # --- helpers --------------------------------------------------------------------------

    def _report(self, error: KrakenHistError, *, level: int) -> None:
        with self._lock:
            self._counters["errors"] += 1
        logger.log(level, "%s: %s", self.name, error)
        if self.on_error is not None:
            self._call(self.on_error, error)

    def _call(self, callback: Callable[..., None], argument: object) -> None:
        """Run a user callback; its failure is logged and never ends the connection thread."""
        try:
            callback(argument)
        except Exception:  # noqa: BLE001 - a callback bug must not kill the stream
            logger.exception("%s: callback %r failed", self.name, getattr(callback, "__name__", callback))
            with self._lock:
                self._counters["errors"] += 1

    def _close(self, ws: websocket.WebSocket, *, clean: bool = False) -> None:
        try:
            if clean and ws.connected:
                ws.close(timeout=1)
            else:
                ws.shutdown()
        except (OSError, websocket.WebSocketException) as exc:
            logger.debug("%s: close failed: %r", self.name, exc)


def _close_code(data: object) -> str:
    data = getattr(data, "data", data)
    if isinstance(data, (bytes, bytearray)) and len(data) >= 2:
        return f"code {int.from_bytes(data[:2], 'big')}"
    return "no code"
