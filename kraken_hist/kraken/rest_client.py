"""Kraken public REST client: one Session, explicit timeouts, the process limiter, bounded retries.

Every answer goes through :func:`unwrap`, the one place where ``{"error": [...], "result": ...}``
and HTTP failures become :class:`ExchangeTransientError` (retry later) or
:class:`ExchangePermanentError` (fix something first). Unknown errors are permanent: retrying
what we do not understand would only hammer the exchange.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import requests
import urllib3

from kraken_hist.core.config import DEFAULT_REST_URL
from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError, ExchangeUnreachableError, UnknownSymbolError
from kraken_hist.core.pairs import Pair, PairRegistry
from kraken_hist.kraken.rest_parsing import (
    OhlcPage,
    OhlcRow,
    ParseError,
    SystemStatus,
    TradesPage,
    loads,
    parse_asset_pairs,
    parse_ohlc_result,
    parse_server_time,
    parse_system_status,
    parse_trades_result,
)
from kraken_hist.ops import metrics
from kraken_hist.kraken.ratelimit import Limiter, limiter_for, process_limiter
from kraken_hist.core.timeutils import check_aware, to_unix_ns, to_unix_seconds
from kraken_hist.rules.backoff import Backoff

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "ExchangeThrottledError",
    "KrakenRestClient",
    "OhlcPage",
    "OhlcRow",
    "SystemStatus",
    "TradesPage",
    "classify_error",
    "unwrap",
]

THROTTLE_ERRORS = frozenset({"EGeneral:Too many requests", "EAPI:Rate limit exceeded"})
TRANSIENT_ERRORS = THROTTLE_ERRORS | {
    "EService:Unavailable",
    "EService:Busy",
    "EGeneral:Internal error",
    "EDatabase:Internal error",
}
OHLC_INTERVALS = (1, 5, 15, 30, 60, 240, 1440, 10080, 21600)
#: The largest answer read (bytes, after decompression). A full Trades page is about 100 KB and
#: AssetPairs of every pair about 1 MB: anything far bigger is not Kraken talking.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: Seconds one HTTP attempt may take in total, however the server paces its bytes.
ANSWER_DEADLINE = 60.0
#: seconds a client that has never had an answer keeps retrying connection failures before it
#: says the exchange cannot be reached (a new user without network learns it in seconds, not
#: after minutes of back-off); once the host has answered, outages get the full retry budget
UNREACHABLE_AFTER = 5.0
_READ_SIZE = 1 << 16


class ExchangeThrottledError(ExchangeTransientError):
    """Kraken's rate limit answered: the whole process must slow down, not just this call."""


def classify_error(messages: list[str]) -> type[ExchangeTransientError] | type[ExchangePermanentError]:
    """The error class for a non-empty Kraken ``error`` array (a pure decision, table-tested).

    Messages may carry detail after the code (``EService:Unavailable:...``), so codes are
    matched on their first two parts.
    """
    codes = {":".join(str(m).split(":")[:2]) for m in messages}
    if codes & THROTTLE_ERRORS:
        return ExchangeThrottledError
    if codes and codes <= TRANSIENT_ERRORS:
        return ExchangeTransientError
    return ExchangePermanentError


def unwrap(status: int, text: str | bytes, what: str) -> Any:
    """HTTP status and body of one answer → its ``result``, or the typed error.

    HTTP 429, 5xx (Cloudflare's 520–522 included) and bodies that are not JSON (a truncated
    transfer) are transient; an ``error`` array is classified by :func:`classify_error`
    whatever the HTTP status (Kraken sends most errors with 200).
    """
    try:
        payload = loads(text)
    except ParseError as exc:
        if status == 429:
            raise ExchangeThrottledError(f"{what}: HTTP 429") from None
        if status >= 500:
            raise ExchangeTransientError(f"{what}: HTTP {status}") from None
        if status != 200:
            raise ExchangePermanentError(f"{what}: HTTP {status} without a Kraken answer") from None
        raise ExchangeTransientError(f"{what}: malformed answer ({exc})") from exc
    errors = payload.get("error") if isinstance(payload, Mapping) else None
    if errors:
        messages = [str(e) for e in errors] if isinstance(errors, list) else [str(errors)]
        cls = classify_error(messages)
        if status == 429 or status >= 500:
            cls = ExchangeThrottledError if cls is ExchangeThrottledError else ExchangeTransientError
        raise cls(f"{what}: {', '.join(messages)}")
    if status == 429:
        raise ExchangeThrottledError(f"{what}: HTTP 429")
    if status >= 500:
        raise ExchangeTransientError(f"{what}: HTTP {status}")
    if status != 200:
        raise ExchangePermanentError(f"{what}: HTTP {status}")
    if not isinstance(payload, Mapping) or "result" not in payload:
        raise ExchangeTransientError(f"{what}: answer without a result")
    return payload["result"]


def _unreachable(what: str, kind: str, exc: Exception) -> ExchangeUnreachableError:
    """A connection failure as an error whose `reason` is short (the innermost cause, without
    urllib3's pool and URL repeated): "connection refused", "name or service not known"."""
    cause: BaseException = exc
    while cause.__context__ is not None or cause.__cause__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause).split("] ", 1)[-1].split(": ", 1)[-1] if str(cause) else kind
    error = ExchangeUnreachableError(f"{what}: {kind} ({exc})")
    error.reason = f"{kind}: {text}".lower() if text != kind else kind
    return error


def _never_connected(exc: BaseException) -> bool:
    """Whether a connection error happened before any connection existed (DNS, refused,
    unroutable), not a connection the other side dropped."""
    seen: BaseException | None = exc
    for _ in range(20):  # a chain of causes, bounded
        if seen is None:
            return False
        if isinstance(seen, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__ or (seen.args[0] if seen.args and isinstance(
            seen.args[0], BaseException) else None) or getattr(seen, "reason", None)
        if not isinstance(seen, BaseException):
            return False
    return False


#: The longest wait between two tries of a call that failed transiently.
RETRY_CAP_SECONDS = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStats:
    calls: int
    retries: int
    throttled: int
    failures: int


class KrakenRestClient:
    """Blocking client of Kraken's public endpoints; symbols in and out are canonical (``BTC/USD``)."""

    def __init__(
        self,
        base_url: str = DEFAULT_REST_URL,
        *,
        min_interval: float = 1.0,
        timeout: tuple[float, float] = (3.05, 30.0),
        max_retries: int = 6,
        limiter: Limiter | None = None,
        session: requests.Session | None = None,
        retry_base_delay: float = 1.0,
        registry: PairRegistry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        deadline: float = ANSWER_DEADLINE,
        unreachable_after: float = UNREACHABLE_AFTER,
    ) -> None:
        if max_answer_bytes < 1 or not deadline > 0:
            raise ValueError(f"max_answer_bytes and deadline must be positive, got {max_answer_bytes}, {deadline}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self.deadline = deadline
        self.max_retries = max_retries
        self.unreachable_after = unreachable_after
        self._answered = False  # whether the host ever answered this client (then outages are retried in full)
        self.retry_base_delay = retry_base_delay
        self.limiter = limiter if limiter is not None else process_limiter(min_interval)
        # names → pairs: the registry given (a service's), or the client's own, which learns
        # Kraken's whole AssetPairs answer the first time a name is not a built-in pair
        self.registry = registry if registry is not None else PairRegistry()
        self._learns_pairs = registry is None
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._session.headers.setdefault("User-Agent", "kraken-hist")
        self._sleep = sleep
        self._stats_lock = threading.Lock()
        self._calls = self._retries = self._throttled = self._failures = 0

    @classmethod
    def from_settings(cls, settings: "Settings", **overrides: Any) -> "KrakenRestClient":
        """The client the settings describe: base URL, and the rate limit shared through Redis
        (``rest_limiter``, ``egress_id``) or the process-wide one, at the configured pace."""
        options: dict[str, Any] = {"min_interval": settings.rest_min_interval}
        options.update(overrides)
        if "limiter" not in options:
            options["limiter"] = limiter_for(settings)
        return cls(settings.rest_url, **options)

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> "KrakenRestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> ClientStats:
        with self._stats_lock:
            return ClientStats(calls=self._calls, retries=self._retries, throttled=self._throttled,
                               failures=self._failures)

    def _bump(self, name: str) -> None:
        with self._stats_lock:
            setattr(self, name, getattr(self, name) + 1)

    # --- the one request path ---------------------------------------------------------------

    def request(self, method: str, params: Mapping[str, Any] | None = None, *, pair: str | None = None) -> Any:
        """GET ``/0/public/<method>``, paced and retried; returns the unwrapped ``result``.

        Transient failures are retried up to ``max_retries`` times (a throttle answer also
        blocks every caller sharing the limiter); permanent ones raise at once. `pair` (the
        canonical symbol of a Trades/OHLC call) takes that pair's slot of the limit too.
        """
        url = f"{self.base_url}/0/public/{method}"
        what = f"{method} {dict(params or {})}"
        attempt = 0
        first_try = time.monotonic()
        while True:
            self.limiter.acquire(pair)
            self._bump("_calls")
            try:
                status, body = self._get(url, params, what)
                result = unwrap(status, body, what)
            except ExchangeThrottledError as exc:
                self._bump("_throttled")
                metrics.rest_call(method, "throttled")
                self.limiter.throttled(pair)
                error: ExchangeTransientError = exc
            except ExchangeTransientError as exc:
                metrics.rest_call(method, "transient")
                error = exc
            except ExchangePermanentError:
                metrics.rest_call(method, "permanent")
                self._bump("_failures")
                raise
            else:
                metrics.rest_call(method, "ok")
                self.limiter.succeeded(pair)
                return result
            attempt += 1
            if attempt > self.max_retries:
                self._bump("_failures")
                raise ExchangeTransientError(f"{error} (gave up after {attempt} attempts)") from error
            if isinstance(error, ExchangeUnreachableError) and not self._answered:
                delay = Backoff(self.retry_base_delay, RETRY_CAP_SECONDS).delay(attempt)
                if time.monotonic() - first_try + delay > self.unreachable_after:
                    self._bump("_failures")
                    raise ExchangeUnreachableError(
                        f"cannot reach Kraken at {self.base_url} ({error.reason}): check the network connection "
                        "(proxy, firewall, DNS) or KRAKEN_HIST_REST_URL; to try kraken-hist offline: kraken-hist demo"
                    ) from error
            self._bump("_retries")
            if not isinstance(error, ExchangeThrottledError):
                delay = Backoff(self.retry_base_delay, RETRY_CAP_SECONDS).delay(attempt)
                logger.info("%s; retry %d/%d in %.2f s", error, attempt, self.max_retries, delay)
                self._sleep(delay)

    def _get(self, url: str, params: Mapping[str, Any] | None, what: str) -> tuple[int, bytes]:
        """One HTTP attempt → (status, body), the body streamed under a size cap and the whole
        attempt under a deadline: a 240 MB answer or one trickled a byte at a time is an error
        after at most ``max_answer_bytes`` of memory and about ``deadline`` seconds (plus one
        read timeout), never a hang. Too big is permanent (it is not Kraken), too slow transient."""
        started = time.monotonic()
        try:
            response = self._session.get(url, params=params, timeout=self.timeout, stream=True)
        except requests.ConnectTimeout as exc:
            raise _unreachable(what, "connect timed out", exc) from exc
        except requests.Timeout as exc:
            raise ExchangeTransientError(f"{what}: timed out ({exc.__class__.__name__})") from exc
        except requests.ConnectionError as exc:
            if _never_connected(exc):
                raise _unreachable(what, "connection failed", exc) from exc
            raise ExchangeTransientError(f"{what}: connection failed ({exc})") from exc
        self._answered = True
        with response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_answer_bytes:
                raise ExchangePermanentError(
                    f"{what}: answer of {int(declared):,} bytes is larger than the {self.max_answer_bytes:,} bytes allowed")
            pieces: list[bytes] = []
            size = 0
            try:
                while True:
                    if time.monotonic() - started > self.deadline:
                        raise ExchangeTransientError(
                            f"{what}: no complete answer within {self.deadline:g} s ({size:,} bytes received)")
                    piece = response.raw.read1(_READ_SIZE, decode_content=True)
                    if not piece:
                        break
                    size += len(piece)
                    if size > self.max_answer_bytes:
                        raise ExchangePermanentError(
                            f"{what}: answer larger than the {self.max_answer_bytes:,} bytes allowed")
                    pieces.append(piece)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise ExchangeTransientError(f"{what}: reading the answer failed ({exc.__class__.__name__})") from exc
            return response.status_code, b"".join(pieces)

    def _pair_name(self, symbol: "str | Pair") -> tuple[str, str]:
        if isinstance(symbol, Pair):
            return symbol.symbol, symbol.altname
        try:
            pair = self.registry.get(symbol)
        except UnknownSymbolError:
            if not self._learns_pairs:
                raise
            self.get_asset_pairs(register=True)
            self._learns_pairs = False  # once: a name Kraken does not list stays unknown
            pair = self.registry.get(symbol)
        return pair.symbol, pair.altname

    # --- endpoints ----------------------------------------------------------------------------

    def get_trades(self, symbol: "str | Pair", since: str | int | datetime | None = None, count: int = 1000) -> TradesPage:
        """Up to `count` trades of `symbol` (any name, or the Pair) after `since` (a ``last``
        cursor as received, ns as int, or a datetime), oldest first."""
        canonical, name = self._pair_name(symbol)
        params: dict[str, Any] = {"pair": name, "count": count}
        if since is not None:
            params["since"] = str(to_unix_ns(check_aware(since))) if isinstance(since, datetime) else str(since)
        result = self.request("Trades", params, pair=canonical)
        try:
            return parse_trades_result(result, canonical, since=params.get("since"))
        except ParseError as exc:
            raise ExchangeTransientError(f"Trades {canonical}: {exc}") from exc

    def get_ohlc(self, symbol: "str | Pair", interval: int = 1, since: int | datetime | None = None) -> OhlcPage:
        """OHLC rows (at most the 720 most recent; since exclusive, in unix seconds); filler
        rows and the unfinished last row included."""
        if interval not in OHLC_INTERVALS:
            raise ValueError(f"interval must be one of {OHLC_INTERVALS}, got {interval}")
        canonical, name = self._pair_name(symbol)
        params: dict[str, Any] = {"pair": name, "interval": interval}
        if since is not None:
            params["since"] = to_unix_seconds(since) if isinstance(since, datetime) else int(since)
        result = self.request("OHLC", params, pair=canonical)
        try:
            return parse_ohlc_result(result, canonical, interval)
        except ParseError as exc:
            raise ExchangeTransientError(f"OHLC {canonical}: {exc}") from exc

    def get_asset_pairs(self, symbols: list[str] | None = None, *, register: bool = False) -> dict[str, dict[str, Any]]:
        """AssetPairs info keyed by REST pair key; with `register`, names are added to the registry."""
        params = {"pair": ",".join(self._pair_name(s)[1] for s in symbols)} if symbols else None
        result = self.request("AssetPairs", params)
        try:
            return parse_asset_pairs(result, self.registry if register else None)
        except ParseError as exc:
            raise ExchangeTransientError(f"AssetPairs: {exc}") from exc

    def get_server_time(self) -> datetime:
        try:
            return parse_server_time(self.request("Time"))
        except ParseError as exc:  # a malformed answer is the exchange's fault, like any other
            raise ExchangeTransientError(f"Time: {exc}") from exc

    def get_system_status(self) -> SystemStatus:
        return parse_system_status(self.request("SystemStatus"))
