"""Prometheus metrics: what every process records, and the ``/metrics`` + ``/healthz`` endpoint.

Recording is a function call anywhere (``rest_call``, ``rest_wait``, ``task_finished``);
the metric objects are made on first use, so a process that never serves metrics pays one
dictionary update per call. Values that already live in a component (the writer's counters,
the WebSocket client's state, the database's aggregate lag) are read when Prometheus
scrapes, by collectors, instead of being copied on every change.

Celery's prefork workers run tasks in child processes: there the recorded values go to
files of ``prometheus_client``'s multiprocess mode (:func:`use_multiprocess_dir`, set up by
``celery_app`` before any metric exists) and the worker's main process serves their sum.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "kraken_hist"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REST_WAIT_BUCKETS = (0.0, 0.05, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TASK_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def _get(name: str) -> Any:
    """The metric `name`, made on first use (after any multiprocess set-up of this process)."""
    metric = _metrics.get(name)
    if metric is not None:
        return metric
    with _lock:
        if not _metrics:
            from prometheus_client import Counter, Histogram

            _metrics.update(
                rest_calls=Counter(f"{PREFIX}_rest_calls", "Kraken REST calls sent, by endpoint and outcome "
                                   "(ok, throttled, transient, permanent).", ["endpoint", "outcome"]),
                rest_wait=Histogram(f"{PREFIX}_rest_wait_seconds", "Seconds a REST call waited for its slot "
                                    "of the rate limit (pace and throttle back-off).", buckets=REST_WAIT_BUCKETS),
                limiter_errors=Counter(f"{PREFIX}_rest_limiter_errors", "Failed round trips to the shared "
                                       "rate limit in Redis."),
                task_duration=Histogram(f"{PREFIX}_task_duration_seconds", "Celery task run time by task and "
                                        "final state.", ["task", "state"], buckets=TASK_BUCKETS),
            )
        return _metrics[name]


def rest_call(endpoint: str, outcome: str) -> None:
    """One REST call answered (or failed) with `outcome`: ok, throttled, transient, permanent."""
    _get("rest_calls").labels(endpoint, outcome).inc()


def rest_wait(seconds: float) -> None:
    """A REST call waited `seconds` for its slot."""
    _get("rest_wait").observe(seconds)


def limiter_error() -> None:
    _get("limiter_errors").inc()


def task_finished(task: str, state: str, seconds: float) -> None:
    """A Celery task ended in `state` (SUCCESS, FAILURE, RETRY, ...) after `seconds`."""
    _get("task_duration").labels(task, state).observe(seconds)


# --- several processes: prometheus_client's multiprocess mode -----------------------------


def use_multiprocess_dir(directory: Path) -> Path:
    """Make this process and its future children record into files in `directory`
    (emptied first: files of dead runs would be summed too). Must run before any metric
    exists in this process, so before a fork; returns the directory."""
    if "prometheus_client.values" in sys.modules and _metrics:
        raise RuntimeError("metrics were already recorded in memory; set up multiprocess mode first")
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    if "prometheus_client.values" in sys.modules:  # imported, but no value made yet: switch it
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    return directory


def process_exited(pid: int) -> None:
    """Forget the live-only values of a child process that ended (multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def multiprocess_registry() -> Any:
    """A registry that sums the files of every process (multiprocess mode)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


# --- collectors read at scrape time --------------------------------------------------------


def _families() -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    return CounterMetricFamily, GaugeMetricFamily


class TradeTracker:
    """Per symbol: trades received from the WebSocket and when the last one arrived.

    Wrap the integration's ``on_trade`` callback with :meth:`wrap`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def wrap(self, on_trade: Callable[[Any], None]) -> Callable[[Any], None]:
        def counted(message: Any) -> None:
            now = self._clock()
            with self._lock:
                for trade in message.trades:
                    self._counts[trade.symbol] = self._counts.get(trade.symbol, 0) + 1
                    self._last[trade.symbol] = now
            on_trade(message)

        return counted

    def snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        """Trades per symbol, and seconds since each symbol's last trade."""
        now = self._clock()
        with self._lock:
            return dict(self._counts), {symbol: now - t for symbol, t in self._last.items()}


class StreamCollector:
    """The stream's state at scrape time: trades received per symbol and the age of each
    symbol's last trade, the WebSocket connection, the writer (written, buffered, spooled,
    commit latency), and the REST catch-up."""

    def __init__(self, *, writer: Any, client: Any, integration: Any, tracker: TradeTracker,
                 symbols: Iterable[str] = ()) -> None:
        self.writer, self.client, self.integration, self.tracker = writer, client, integration, tracker
        self.symbols = list(symbols)

    def describe(self) -> list[Any]:
        return []  # registered without a trial scrape

    def collect(self) -> Iterator[Any]:
        counter, gauge = _families()
        counts, ages = self.tracker.snapshot()
        trades = counter(f"{PREFIX}_stream_trades", "Trades received from the WebSocket, by symbol.",
                         labels=["symbol"])
        for symbol in sorted(set(self.symbols) | set(counts)):
            trades.add_metric([symbol], counts.get(symbol, 0))
        yield trades
        age = gauge(f"{PREFIX}_stream_last_trade_age_seconds",
                    "Seconds since the last WebSocket trade of each symbol.", labels=["symbol"])
        for symbol, seconds in sorted(ages.items()):
            age.add_metric([symbol], seconds)
        yield age

        state = self.client.state()
        yield gauge(f"{PREFIX}_ws_connected", "1 while the WebSocket is connected.", value=int(state.connected))
        yield counter(f"{PREFIX}_ws_reconnects", "WebSocket reconnects since start.", value=state.reconnects)
        yield gauge(f"{PREFIX}_ws_refused_symbols", "Subscriptions Kraken refused.", value=len(state.refused))
        if state.last_message_age is not None:
            yield gauge(f"{PREFIX}_ws_last_message_age_seconds", "Seconds since the last WebSocket frame.",
                        value=state.last_message_age)

        live = self.integration.stats()
        yield counter(f"{PREFIX}_stream_rest_trades", "Trades fetched through REST to close holes in the "
                      "id sequence.", value=live.rest_trades)
        yield gauge(f"{PREFIX}_stream_missing_ids", "Trade ids known missing right now (open holes).",
                    value=live.missing_ids)

        stats = self.writer.get_stats()
        written = counter(f"{PREFIX}_writer_written", "Records committed by the writer, by kind.", labels=["kind"])
        buffered = gauge(f"{PREFIX}_writer_buffered", "Records waiting in memory, by kind.", labels=["kind"])
        for kind in ("trades", "candles"):
            written.add_metric([kind], stats.get(f"{kind}_written", 0))
            buffered.add_metric([kind], stats.get(f"{kind[:-1]}_buffer", 0))
        yield written
        yield buffered
        yield gauge(f"{PREFIX}_writer_spool_pending", "Records waiting in the on-disk spool (database "
                    "unavailable or behind).", value=stats.get("spool_pending", 0))
        yield counter(f"{PREFIX}_writer_errors", "Failed writer commits (retried or spooled).",
                      value=stats.get("errors", 0))
        latency = gauge(f"{PREFIX}_writer_commit_latency_seconds", "Seconds from accepting a trade to its "
                        "commit, over the writer's recent trades.", labels=["quantile"])
        for quantile, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms"), ("1", "latency_max_ms")):
            if key in stats:
                latency.add_metric([quantile], stats[key] / 1000)
        yield latency


class DatabaseCollector:
    """What the database says at scrape time: reachable, the aggregate refresh lag (oldest
    pending 1-minute change) and the newest candle's age per symbol."""

    def __init__(self, health_check: Callable[[], dict[str, Any]]) -> None:
        """`health_check`: the provider's report (``HistoricalDataProvider.health_check``),
        passed in so that metrics need not know how the database is read."""
        self._health = health_check

    def describe(self) -> list[Any]:
        return []  # registered without a trial scrape

    def collect(self) -> Iterator[Any]:
        _, gauge = _families()
        try:
            report = self._health()
        except Exception as exc:  # noqa: BLE001 - a scrape reports an outage, it never fails on one
            logger.warning("metrics: database check failed: %s", exc, extra={"event": "metrics.db_failed"})
            report = {"ok": False}
        yield gauge(f"{PREFIX}_database_up", "1 when the database answered the health check.",
                    value=int(bool(report.get("ok"))))
        if not report.get("ok"):
            return
        aggregates = report.get("aggregates", {})
        yield gauge(f"{PREFIX}_aggregate_lag_seconds", "Age of the oldest 1-minute change not yet in the "
                    "5m…1w relations (0 when none is pending).", value=aggregates.get("lag_seconds", 0.0))
        yield gauge(f"{PREFIX}_aggregate_pending_changes", "1-minute change windows waiting for the refresh.",
                    value=aggregates.get("pending_changes", 0))
        age = gauge(f"{PREFIX}_newest_candle_age_seconds", "Seconds since the end of each symbol's newest "
                    "stored 1-minute candle.", labels=["symbol"])
        for symbol, info in sorted(report.get("symbols", {}).items()):
            age.add_metric([symbol], info["age_seconds"])
        yield age

    def close(self) -> None:
        """Close what the health check holds open, if it holds anything (a provider's pool)."""
        close = getattr(self._health, "close", None)
        if callable(close):
            close()


class LimiterCollector:
    """The shared rate limit's state at scrape time: seconds left of its throttle block."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter

    def describe(self) -> list[Any]:
        return []  # registered without a trial scrape

    def collect(self) -> Iterator[Any]:
        _, gauge = _families()
        try:
            blocked = self.limiter.stats().blocked_until_in
        except Exception as exc:  # noqa: BLE001 - a scrape reports, it never fails
            logger.debug("metrics: limiter state unavailable: %s", exc)
            return
        yield gauge(f"{PREFIX}_rest_blocked_seconds", "Seconds left of the throttle back-off that holds "
                    "every REST call of this egress.", value=blocked)


# --- the endpoint ----------------------------------------------------------------------------


Health = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (JSON, 200 or 503) on
    `host`:`port` (0: any free port), served by a daemon thread."""

    def __init__(self, port: int, registry: Any = None, *, health: Health | None = None,
                 host: str = "0.0.0.0") -> None:
        from prometheus_client import REGISTRY

        self.registry = registry if registry is not None else REGISTRY
        self.health = health or (lambda: (True, {}))
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> "MetricsServer":
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body, kind = 200, generate_latest(outer.registry), CONTENT_TYPE_LATEST
                elif path in ("/healthz", "/health"):
                    try:
                        ok, details = outer.health()
                    except Exception as exc:  # noqa: BLE001 - a failing check is an unhealthy answer
                        ok, details = False, {"error": str(exc)}
                    body = json.dumps({"ok": ok, **details}, default=str).encode()
                    status, kind = (200 if ok else 503), "application/json"
                else:
                    status, body, kind = 404, b"not found: try /metrics or /healthz\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server name
                logger.debug("metrics: " + format, *args)

        server = ThreadingHTTPServer(self._address, Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics", self._address[0], self.port, extra={"event": "metrics.serving"})
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stream_health(client: Any, writer: Any, *, silent_after: float = 60.0) -> Health:
    """Healthy while the WebSocket is connected (or heard from within `silent_after` s) and
    the writer runs; the details say what was checked."""

    def check() -> tuple[bool, dict[str, Any]]:
        state = client.state()
        stats = writer.get_stats()
        heard = state.last_message_age is not None and state.last_message_age < silent_after
        ok = bool(state.running and (state.connected or heard) and stats.get("state") == "running")
        return ok, {
            "connected": state.connected, "last_message_age": state.last_message_age,
            "refused": sorted(str(s) for s in state.refused), "writer": stats.get("state"),
            "spool_pending": stats.get("spool_pending", 0),
        }

    return check
