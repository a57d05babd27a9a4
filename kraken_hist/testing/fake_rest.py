"""A local fake of Kraken's public REST API, in its exact formats, with its rate limit and faults.

Serves ``/0/public/{Trades,OHLC,AssetPairs,Time,SystemStatus}`` on loopback from a
:class:`FakeMarket`. What it copies from the real exchange (KRAKEN.md):

- every answer is ``{"error": [...], "result": ...}``, errors with HTTP 200;
- Trades: rows ``[price, volume, time, side, ord_type, misc, trade_id]`` with prices padded to
  at least 5 decimals, volumes at 8, the time a JSON float with up to 7 decimals; ``last`` a
  nanosecond **string**; the result keyed by the pair's REST key (``XXBTZUSD``), or by the
  name asked for when that is a ``BASE/QUOTE`` symbol (as Kraken answered in 2026);
- Trades ``since`` is **exclusive** by default: up to ``count`` trades whose nanosecond time is
  greater than ``since``. Because ``last`` is the time of the page's last trade, a page cut
  in the middle of a burst of trades sharing one timestamp makes the next page skip the rest
  of the burst: a real hazard that a client must catch from the trade ids. With
  ``since_inclusive=True`` the same page boundary repeats trades instead;
- OHLC: only the 720 most recent candles relative to the market clock, filler candles for
  quiet buckets, the unfinished candle last, ``last`` = open time of the last finished candle,
  ``since`` exclusive;
- a per-IP token bucket; once throttled it answers ``EGeneral:Too many requests`` (HTTP 200)
  and every call during the block extends it.

Faults on demand: ``inject(kind, count=1)`` with kind in :data:`FAULTS`.

Try it by hand::

    python -m kraken_hist.testing.fake_rest --port 8080
    KRAKEN_HIST_REST_URL=http://127.0.0.1:8080 kraken-hist backfill BTC/USD
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kraken_hist.core.timeutils import EPOCH, floor_minute, to_unix_ns, to_unix_seconds, utcnow
from kraken_hist.testing.history import format_trade_time, generate_trades
from kraken_hist.testing.market import FakeMarket
from kraken_hist.testing.universe import Listing, default_universe

logger = logging.getLogger(__name__)

#: Fault kinds for :meth:`FakeKrakenREST.inject` and what each answer looks like.
FAULTS = {
    "throttle": (200, "EGeneral:Too many requests"),
    "rate_limit": (200, "EAPI:Rate limit exceeded"),
    "unavailable": (200, "EService:Unavailable"),
    "busy": (200, "EService:Busy"),
    "internal": (200, "EGeneral:Internal error"),
    "invalid": (200, "EGeneral:Invalid arguments"),
    "429": (429, None),
    "5xx": (502, None),
    "520": (520, None),
    "slow": (200, None),  # answers correctly, after slow_seconds
    "drop": (0, None),  # closes the connection without an answer
    "malformed": (200, None),  # HTTP 200 with a truncated JSON body
}

OHLC_INTERVALS = (1, 5, 15, 30, 60, 240, 1440, 10080, 21600)
MAX_TRADES_COUNT = 1000
_SECONDS_LIMIT = 10**12  # a ``since`` below this is seconds (Kraken accepts both), above: ns


class _Throttled(Exception):
    pass


class _ApiError(Exception):
    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _TokenBucket:
    """Kraken-like public limit per IP: a bucket of `burst` calls refilled at `rate`/s; an empty
    bucket blocks the IP for `block_seconds`, and each call while blocked extends the block."""

    def __init__(self, rate: float, burst: float, block_seconds: float, extension: float, max_block: float) -> None:
        self.rate, self.burst = rate, burst
        self.block_seconds, self.extension, self.max_block = block_seconds, extension, max_block
        self._lock = threading.Lock()
        self._state: dict[str, list[float]] = {}  # ip -> [tokens, updated, blocked_until]

    def admit(self, ip: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, updated, blocked_until = self._state.get(ip, [self.burst, now, 0.0])
            tokens = min(self.burst, tokens + (now - updated) * self.rate)
            if now < blocked_until:
                blocked_until = min(blocked_until + self.extension, now + self.max_block)
                admitted = False
            elif tokens >= 1:
                tokens -= 1
                admitted = True
            else:
                blocked_until = now + self.block_seconds
                admitted = False
            self._state[ip] = [tokens, now, blocked_until]
            return admitted


class FakeKrakenREST:
    """Kraken's public REST API on 127.0.0.1, served from `market` in a named daemon thread."""

    def __init__(
        self,
        market: FakeMarket,
        *,
        rate_limit_per_second: float | None = None,
        burst: float = 3.0,
        block_seconds: float = 2.0,
        block_extension: float = 0.5,
        max_block_seconds: float = 15.0,
        since_inclusive: bool = False,
        slow_seconds: float = 2.0,
        ohlc_last_as_string: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.market = market
        self.since_inclusive = since_inclusive
        self.slow_seconds = slow_seconds
        self.ohlc_last_as_string = ohlc_last_as_string
        self.system_status = "online"
        self._limiter = (
            _TokenBucket(rate_limit_per_second, burst, block_seconds, block_extension, max_block_seconds)
            if rate_limit_per_second
            else None
        )
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._faults: list[list[Any]] = []  # [kind, remaining, endpoint or None]
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "FakeKrakenREST":
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer((self._host, self._port), handler)
        server.daemon_threads = True
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kraken-rest", daemon=True
        )
        self._thread.start()
        logger.info("fake Kraken REST listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "FakeKrakenREST":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- observation and faults -----------------------------------------------------------

    @property
    def calls(self) -> Counter[str]:
        """A snapshot of counters: ``total``, one per endpoint (``Trades``...), ``throttled``
        (throttle answers, injected or earned), ``fault:<kind>`` per injected fault served."""
        with self._lock:
            return Counter(self._calls)

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def inject(self, kind: str, count: int = 1, *, endpoint: str | None = None) -> None:
        """Answer the next `count` calls (to `endpoint` only, e.g. ``"Trades"``, if given) with
        fault `kind` (see :data:`FAULTS`)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        with self._lock:
            self._faults.append([kind, count, endpoint])

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f[1] for f in self._faults)

    def _take_fault(self, endpoint: str) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault[2] in (None, endpoint):
                    fault[1] -= 1
                    if fault[1] <= 0:
                        self._faults.remove(fault)
                    self._calls[f"fault:{fault[0]}"] += 1
                    return str(fault[0])
        return None

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._calls[name] += 1

    # --- request handling -----------------------------------------------------------------

    def handle(self, path: str, query: dict[str, list[str]], ip: str) -> tuple[int, bytes] | None:
        """Status and body for one GET, or None to drop the connection."""
        endpoint = path.rsplit("/", 1)[-1] if path.startswith("/0/public/") else path
        self._count("total", endpoint)
        fault = self._take_fault(endpoint)
        if fault == "drop":
            return None
        if fault == "slow":
            self._stopping.wait(self.slow_seconds)
        elif fault == "malformed":
            return 200, b'{"error":[],"result":{"XXBTZUSD":[["1054'
        elif fault is not None:
            status, message = FAULTS[fault]
            if fault in ("throttle", "rate_limit"):
                self._count("throttled")
            if message is not None:
                return status, _envelope_error(message)
            return status, f"<html><body><h1>{status} error</h1></body></html>".encode()
        if self._limiter is not None and not self._limiter.admit(ip):
            self._count("throttled")
            return 200, _envelope_error("EGeneral:Too many requests")
        params = {key: values[-1] for key, values in query.items()}
        routes = {
            "Trades": self._trades,
            "OHLC": self._ohlc,
            "AssetPairs": self._asset_pairs,
            "Time": self._time,
            "SystemStatus": self._system_status,
        }
        route = routes.get(endpoint) if path.startswith("/0/public/") else None
        if route is None:
            return 404, _envelope_error("EGeneral:Unknown method")
        try:
            return 200, route(params)
        except _ApiError as exc:
            return exc.status, _envelope_error(exc.message)

    def _pair(self, params: dict[str, str]) -> tuple[Listing, str]:
        """The pair asked for (by altname, REST key or v2 name) and the key its answer is filed under."""
        name = params.get("pair", "").strip()
        if not name:
            raise _ApiError("EGeneral:Invalid arguments")
        pair = self.market.universe.find(name)
        if pair is None or not pair.listed or not self.market.has(pair.symbol):
            raise _ApiError("EQuery:Unknown asset pair")
        key = name.upper() if "/" in name else pair.rest_key
        return pair, key

    def _trades(self, params: dict[str, str]) -> bytes:
        pair, key = self._pair(params)
        count = _int_param(params, "count", MAX_TRADES_COUNT)
        if not 1 <= count <= MAX_TRADES_COUNT:
            raise _ApiError("EGeneral:Invalid arguments")
        since_ns = _since_ns(params.get("since"))
        rows = self.market.trades_since(pair.symbol, since_ns, count, inclusive=self.since_inclusive)
        price_places = max(5, pair.price_decimals)
        parts = []
        for trade, ns in rows:
            parts.append(
                f'["{trade.price:.{price_places}f}","{trade.volume:.8f}",{format_trade_time(ns)},'
                f'"{trade.side or "b"}","{trade.ord_type or "l"}","",{trade.trade_id}]'
            )
        if rows:
            last = rows[-1][1]
        elif since_ns is not None:
            last = since_ns
        else:
            last = to_unix_ns(self.market.now())
        body = f'{{"error":[],"result":{{{json.dumps(key)}:[{",".join(parts)}],"last":"{last}"}}}}'
        return body.encode()

    def _ohlc(self, params: dict[str, str]) -> bytes:
        pair, key = self._pair(params)
        interval = _int_param(params, "interval", 1)
        if interval not in OHLC_INTERVALS:
            raise _ApiError("EGeneral:Invalid arguments")
        since = params.get("since")
        try:
            since_seconds = int(Decimal(since)) if since not in (None, "") else None
        except InvalidOperation:
            raise _ApiError("EGeneral:Invalid arguments") from None
        width = interval * 60
        now_seconds = to_unix_seconds(self.market.now())
        current = now_seconds - now_seconds % width
        first = current - 719 * width
        start = EPOCH + timedelta(seconds=first)
        built = {
            to_unix_seconds(c.time): c
            for c in self.market.candles(pair.symbol, interval, start, EPOCH + timedelta(seconds=current + width))
        }
        previous = self.market.last_trade_before(pair.symbol, start)
        close = previous.price if previous is not None else None
        dec = pair.price_decimals
        parts = []
        for bucket in range(first, current + width, width):
            candle = built.get(bucket)
            if candle is not None:
                row = (candle.open, candle.high, candle.low, candle.close, candle.vwap or Decimal(0),
                       candle.volume, candle.trades)
                close = candle.close
            elif close is not None:
                row = (close, close, close, close, Decimal(0), Decimal(0), 0)
            else:
                continue  # before the pair's first trade: Kraken has no candle
            if since_seconds is not None and bucket <= since_seconds:
                continue
            o, h, low, c, vwap, volume, count = row
            parts.append(
                f'[{bucket},"{o:.{dec}f}","{h:.{dec}f}","{low:.{dec}f}","{c:.{dec}f}",'
                f'"{vwap:.{dec}f}","{volume:.8f}",{count}]'
            )
        last = current - width
        last_text = f'"{last}"' if self.ohlc_last_as_string else str(last)
        return f'{{"error":[],"result":{{{json.dumps(key)}:[{",".join(parts)}],"last":{last_text}}}}}'.encode()

    def _asset_pairs(self, params: dict[str, str]) -> bytes:
        """Every listed pair that has a history here (the whole market when it generates
        histories), or the ones asked for; delisted pairs are absent, as on Kraken."""
        wanted = [name for name in params.get("pair", "").split(",") if name.strip()]
        universe = self.market.universe
        if wanted:
            found = [universe.find(name) for name in wanted]
            if any(p is None or not p.listed or not self.market.has(p.symbol) for p in found):
                raise _ApiError("EQuery:Unknown asset pair")
            result = universe.asset_pairs([p.symbol for p in found if p is not None])
        else:
            result = {key: entry for key, entry in universe.asset_pairs().items()
                      if self.market.has(universe.find(key).symbol)}  # type: ignore[union-attr]
        return json.dumps({"error": [], "result": result}).encode()

    def _time(self, params: dict[str, str]) -> bytes:
        now = self.market.now()
        result = {"unixtime": to_unix_seconds(now), "rfc1123": now.strftime("%a, %d %b %y %H:%M:%S +0000")}
        return json.dumps({"error": [], "result": result}).encode()

    def _system_status(self, params: dict[str, str]) -> bytes:
        now = self.market.now().replace(microsecond=0)
        result = {"status": self.system_status, "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return json.dumps({"error": [], "result": result}).encode()



def _envelope_error(message: str) -> bytes:
    return json.dumps({"error": [message]}).encode()


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise _ApiError("EGeneral:Invalid arguments") from None


def _since_ns(raw: str | None) -> int | None:
    """Trades ``since`` in nanoseconds; Kraken takes seconds (possibly fractional) or ns."""
    if raw in (None, ""):
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _ApiError("EGeneral:Invalid arguments") from None
    if not value.is_finite() or value < 0:
        raise _ApiError("EGeneral:Invalid arguments")
    if value < _SECONDS_LIMIT:
        return int(value.scaleb(9))
    return int(value)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKrakenREST
    protocol_version = "HTTP/1.1"  # keep-alive, as requests.Session expects
    server_version = "cloudflare"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        split = urlsplit(self.path)
        answer = self.fake.handle(split.path, parse_qs(split.query), self.client_address[0])
        if answer is None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer is already gone; nothing left to drop
            return
        status, body = answer
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # the client gave up first (a read timeout during a 'slow' fault): expected
            logger.debug("fake REST: client %s left before the answer", self.client_address[0])
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("fake REST %s " + format, self.client_address[0], *args)


def demo_market(
    symbols: list[str], *, days: float, trades_per_minute: float, seed: int, now: datetime | None = None,
    ahead: float | None = None,
) -> FakeMarket:
    """A market on the real clock whose history runs from `days` ago to `ahead` days ahead
    (default: `days`), so new trades keep appearing as time passes (a live market to catch up
    with). ``ahead=0`` ends the history now, for a server that publishes live trades itself
    (:mod:`kraken_hist.testing.fake_exchange`)."""
    centre = floor_minute(now or utcnow())
    span = timedelta(days=days)
    future = span if ahead is None else timedelta(days=ahead)
    universe = default_universe()

    def history(symbol: str) -> list:
        return generate_trades(symbol, centre - span, centre + future, seed=seed, trades_per_minute=trades_per_minute)

    if any(s.strip().lower() == "all" for s in symbols):  # the whole market, each pair made when first asked for
        return FakeMarket({}, universe=universe, generate=history)
    names = [universe.find(s) for s in symbols]
    unknown = [s for s, listing in zip(symbols, names) if listing is None]
    if unknown:
        raise ValueError(f"the fake exchange lists no pair {', '.join(unknown)}")
    return FakeMarket({listing.symbol: history(listing.symbol) for listing in names if listing is not None},
                      universe=universe)


def main(argv: list[str] | None = None) -> None:
    """``python -m kraken_hist.testing.fake_rest --port 8080``: serve a generated market."""
    parser = argparse.ArgumentParser(description="A fake Kraken public REST API on loopback, for trying kraken-hist offline.")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--symbols", default="BTC/USD,ETH/USD",
                        help="comma-separated pairs, or 'all' for every listed pair (default %(default)s)")
    parser.add_argument("--days", type=float, default=1.0, help="days of history before now (default %(default)s)")
    parser.add_argument("--trades-per-minute", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate-limit", type=float, default=1.0, help="calls per second per IP; 0 = unlimited")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    market = demo_market(
        [s for s in args.symbols.split(",") if s.strip()],
        days=args.days,
        trades_per_minute=args.trades_per_minute,
        seed=args.seed,
    )
    fake = FakeKrakenREST(market, rate_limit_per_second=args.rate_limit or None, host=args.host, port=args.port)
    fake.start()
    print(f"fake Kraken REST on {fake.url} serving {', '.join(market.symbols())}", flush=True)
    print(f"try: KRAKEN_HIST_REST_URL={fake.url} kraken-hist backfill {market.symbols()[0]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
