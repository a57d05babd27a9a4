"""``kraken-hist stream SYMBOL...``: live trades and 1-minute candles into the database until stopped.

Builds the pieces from the settings (writer, REST client for the ids a reconnect missed,
the integration, the WebSocket client), prints one status line on stderr, and on Ctrl-C or
SIGTERM stops in the order that loses nothing: no new input, then progress recorded, then
the writer flushed. With the database down that takes a few seconds, not minutes: progress
waits at most _PROGRESS_FLUSH_TIMEOUT for the writer (it is recorded next time), the writer
spools what it cannot commit, and the final aggregate refresh is skipped.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

import click
import psycopg

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.core.errors import UnknownSymbolError
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.ops.metrics import StreamCollector, TradeTracker, stream_health
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.kraken.ratelimit import limiter_for
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.kraken.ws_client import KrakenWSClient
from kraken_hist.cli.common import friendly_errors, resolve_symbols, settings_from

logger = logging.getLogger(__name__)

#: seconds the integration's progress step waits for the writer to commit; when it cannot (the
#: database is away or far behind), the resume point is advanced on a later step instead
_PROGRESS_FLUSH_TIMEOUT = 2.0


@click.command()
@click.argument("symbols", nargs=-1)
@click.option("--ohlc", "ohlc_intervals", multiple=True, type=int, default=(1,), show_default=True,
              help="OHLC interval(s) to subscribe to, in minutes (only 1-minute candles are stored).")
@click.option("--no-ohlc", is_flag=True, help="Subscribe to trades only.")
@click.option("--flush-interval", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds trades may wait in the buffer before they are written.")
@click.option("--buffer-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Trades buffered before a write is started early.")
@click.option("--status-interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between status lines on stderr (0: none).")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Reconnect when nothing arrives for this many seconds.")
@click.option("--refresh-every", type=click.FloatRange(min=0), default=None,
              help="Seconds between refreshes of the 5m…1w relations [default: KRAKEN_HIST_REFRESH_EVERY; 0: never].")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus /metrics and /healthz on this port [default: KRAKEN_HIST_METRICS_PORT; "
                   "unset: none].")
@click.option("--adopt-unlabelled-spool", is_flag=True,
              help="Replay a spool left by an older version (which did not record its database) into this "
                   "database; only if it was written for it.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop by itself after this many seconds (as on Ctrl-C) [default: run until stopped].")
@click.pass_context
@friendly_errors
def stream(ctx: click.Context, symbols: tuple[str, ...], ohlc_intervals: tuple[int, ...], no_ohlc: bool,
           flush_interval: float, buffer_size: int, status_interval: float, heartbeat_timeout: float,
           refresh_every: float | None, metrics_port: int | None, adopt_unlabelled_spool: bool,
           duration: float | None = None) -> None:
    """Stream live trades (and 1-minute candles) of SYMBOLS into the database until Ctrl-C/SIGTERM.

    Symbols may be given in any Kraken name (BTC/USD, XBTUSD, XXBTZUSD); default: the
    configured KRAKEN_HIST_SYMBOLS. Trades missed while disconnected are fetched through REST.
    """
    settings = settings_from(ctx)
    db_url = prepare_database(settings=settings)
    try:  # any Kraken name, '*/USD' or 'all': hundreds of pairs share one connection
        canonical = resolve_symbols(settings, db_url, symbols or settings.symbols)
    except UnknownSymbolError as exc:
        raise click.BadParameter(str(exc), param_hint="SYMBOLS") from None
    refresher = PeriodicRefresh(db_url, settings.refresh_every if refresh_every is None else refresh_every)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    registry = database_registry(db_url)  # every part of the stream knows the same pairs
    writer = DatabaseWriter(db_url, trade_buffer_size=buffer_size, trade_flush_interval=flush_interval,
                            settings=settings, adopt_unlabelled_spool=adopt_unlabelled_spool, registry=registry)
    writer.start()
    rest = KrakenRestClient.from_settings(settings, registry=registry, limiter=limiter_for(settings))
    backfill = KrakenTradesBackfill(db_url, client=rest, settings=settings, registry=registry)
    integration = WebSocketDBIntegration(writer, db_url=db_url, rest=backfill, symbols=canonical,
                                         progress_interval=max(1.0, flush_interval),
                                         flush_timeout=_PROGRESS_FLUSH_TIMEOUT, registry=registry)
    tracker = TradeTracker()
    callbacks = integration.callbacks()
    callbacks["on_trade"] = tracker.wrap(callbacks["on_trade"])
    client = KrakenWSClient.from_settings(
        settings, canonical, ohlc_intervals=() if no_ohlc else ohlc_intervals,
        heartbeat_timeout=heartbeat_timeout, registry=registry, **callbacks,
    )
    port = settings.metrics_port if metrics_port is None else metrics_port
    exporter = None if port is None else StreamMetrics(
        port, settings, db_url, StreamCollector(writer=writer, client=client, integration=integration,
                                                tracker=tracker, symbols=canonical), rest,
        stream_health(client, writer))
    clean = False
    try:
        if exporter is not None:
            exporter.start()
        integration.start()
        client.start()
        click.echo(f"streaming {', '.join(canonical)} from {settings.ws_url} (Ctrl-C to stop)", err=True)
        if duration is not None:
            timer = threading.Timer(duration, stop.set)
            timer.daemon = True
            timer.start()
        _status_loop(stop, client, integration, writer, status_interval, refresher)
    finally:
        click.echo("\nstopping: writing everything received...", err=True)
        client.stop()
        integration.stop()
        clean = writer.stop()
        if clean:  # else the database is not taking writes: the changes stay queued for the next refresh
            refresher.run()
        backfill.close()
        rest.close()
        if exporter is not None:
            exporter.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = writer.get_stats()
    click.echo(
        f"stopped: {stats['trades_written']:,} trades and {stats['candles_written']:,} candles written"
        + ("" if clean else "; the rest is spooled and replayed on the next start"),
        err=True,
    )
    if not clean:
        sys.exit(1)


class StreamMetrics:
    """The stream's Prometheus endpoint: its REST calls (recorded as they happen), the state of
    its WebSocket client, integration and writer, the shared rate limit and the database's
    aggregate lag (read at each scrape)."""

    def __init__(self, port: int, settings: Any, db_url: str, collector: StreamCollector, rest: KrakenRestClient,
                 health: Any) -> None:
        from prometheus_client import REGISTRY

        from kraken_hist.ops.metrics import DatabaseCollector, LimiterCollector, MetricsServer
        from kraken_hist.query.provider import HealthCheckOnFirstUse

        self.registry = REGISTRY
        self.collectors = [collector, DatabaseCollector(HealthCheckOnFirstUse(db_url, settings)),
                           LimiterCollector(rest.limiter)]
        self.server = MetricsServer(port, self.registry, health=health)

    def start(self) -> None:
        for collector in self.collectors:
            self.registry.register(collector)
        self.server.start()
        click.echo(f"metrics on http://127.0.0.1:{self.server.port}/metrics (health: /healthz)", err=True)

    def stop(self) -> None:
        self.server.stop()
        for collector in self.collectors:
            self.registry.unregister(collector)
            close = getattr(collector, "close", None)
            if callable(close):
                close()


class PeriodicRefresh:
    """Keeps the 5m…1w relations current while streaming without Celery beat.

    Incremental (only minutes the writer changed); a failure is logged and retried next
    time, since the changes stay queued in ``candle_changes``.
    """

    def __init__(self, db_url: str, every: float) -> None:
        self.db_url = db_url
        self.every = every
        self._due = time.monotonic() + every

    def maybe(self) -> None:
        if self.every > 0 and time.monotonic() >= self._due:
            self.run()

    def run(self) -> None:
        if self.every <= 0:
            return
        from kraken_hist.core.errors import KrakenHistError
        from kraken_hist.storage.refresh import refresh_aggregates

        self._due = time.monotonic() + self.every
        try:
            result = refresh_aggregates(self.db_url)
        except (KrakenHistError, psycopg.Error, OSError, RuntimeError) as exc:
            # the stream goes on: the changes stay queued in candle_changes for the next run
            logger.warning("aggregate refresh failed (%s); retrying in %.0f s", exc, self.every,
                           extra={"event": "stream_refresh_failed"})
            return
        for symbol, reason in result.failed.items():
            logger.warning("aggregate refresh of %s failed (%s); retrying in %.0f s", symbol, reason, self.every,
                           extra={"event": "stream_refresh_failed"})


def _status_loop(stop: threading.Event, client: KrakenWSClient, integration: WebSocketDBIntegration,
                 writer: DatabaseWriter, interval: float, refresher: PeriodicRefresh) -> None:
    """Until `stop`: one status line per `interval` (rewritten in place on a terminal)."""
    tty = sys.stderr.isatty()
    last_count, last_time = 0, time.monotonic()
    while not stop.wait(interval if interval > 0 else 0.5):
        refresher.maybe()
        if interval <= 0:
            continue
        now = time.monotonic()
        live = integration.stats()
        count = live.ws_trades + live.rest_trades
        line = status_line(client.state(), live.to_dict(), writer.get_stats(), (count - last_count) / (now - last_time))
        last_count, last_time = count, now
        click.echo(("\r\x1b[2K" + line) if tty else line, nl=not tty, err=True)


def status_line(client_state: Any, live: dict[str, Any], writer_stats: dict[str, Any], rate: float) -> str:
    """``1,234.5 trades/s | received 99,000 | buffered 120 | written 98,765 | reconnects 1 | last trade 0.3s ago``."""
    buffered = writer_stats.get("trade_buffer", 0) + writer_stats.get("candle_buffer", 0) + writer_stats.get(
        "spool_pending", 0)
    age = client_state.last_trade_age
    parts = [
        f"{rate:,.1f} trades/s",
        f"received {live.get('ws_trades', 0) + live.get('rest_trades', 0):,}",
        f"buffered {buffered:,}",
        f"written {writer_stats.get('trades_written', 0):,}",
        f"reconnects {client_state.reconnects}",
        f"last trade {'-' if age is None else f'{age:.1f}s ago'}",
    ]
    if live.get("missing_ids"):
        parts.append(f"fetching {live['missing_ids']:,} missed")
    if client_state.refused:
        parts.append("REFUSED " + ",".join(sorted({s.symbol for s in client_state.refused})))
    if not client_state.connected:
        parts.append("connecting")
    return " | ".join(parts)
