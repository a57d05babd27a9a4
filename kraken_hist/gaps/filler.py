"""Find every hole in the stored history and fill it, without ever chasing a quiet market.

Detection is :mod:`gaps.detection` (SQL, no network). Filling picks a method per gap with the
pure :func:`gaps.plan.choose_fill_method`:

* candle gaps are rebuilt from the stored trades (no network);
* trade-id holes and uncovered ranges go through the Trades endpoint, from just before the
  gap to its end, with the backfill's checked pagination and idempotent page store (trades,
  candles of the touched minutes and the proven coverage in one transaction). A range found
  empty is thereby recorded as covered and never fetched again;
* when Trades cannot be had (it failed after the retries) and the gap is still inside the
  OHLC endpoint's reach (the 720 newest 1-minute candles), OHLC fills the minutes' candles
  (source ``rest_ohlc``, only where no candle built from trades exists; filler rows are not
  trading and are not stored). The trades stay missing, so the gap is found again next time.

Every REST call goes through the process-wide limiter (``kraken_hist.kraken.ratelimit``), however
many fills run at once. Here is the service (lifecycle, detection, the fill of every gap, the
bookkeeping); the outcomes are :mod:`gaps.report`, the retries :mod:`gaps.attempts`, the fills
:mod:`gaps.trade_fill` and :mod:`gaps.ohlc_fallback`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from kraken_hist.core.errors import KrakenHistError, TransientError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import check_aware, utcnow
from kraken_hist.core.types import DataGap
from kraken_hist.gaps import ohlc_fallback, plan, trade_fill
from kraken_hist.gaps.attempts import with_retries
from kraken_hist.gaps.detection import SymbolScan, read_symbol_gaps
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.gaps.report import GapFill, GapFillReport, SymbolFillReport
from kraken_hist.rules.sql import skip_scan_symbols
from kraken_hist.storage import store
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.kraken.rest_client import KrakenRestClient

__all__ = ["FillMethod", "GapFill", "GapFillReport", "GapFiller", "SymbolFillReport"]

logger = logging.getLogger(__name__)

SYNC_TYPE = "gaps"

#: The query of GapFiller.read_symbols.
_READ_SYMBOLS = f"""
WITH RECURSIVE {skip_scan_symbols("trades", "t")}, {skip_scan_symbols("candles", "c")}
SELECT symbol FROM t WHERE symbol IS NOT NULL
UNION SELECT symbol FROM c WHERE symbol IS NOT NULL
UNION SELECT symbol FROM coverage
ORDER BY 1
"""


class GapFiller:
    """Detect and fill gaps of `symbols` (default: every symbol with stored data).

    `client` (a :class:`KrakenRestClient`) is handed in or built from `settings` (its pace:
    ``settings.rest_min_interval`` when settings are given, else `rate_limit_delay`) and
    then closed by :meth:`stop`. A fill that fails transiently is retried `max_retries`
    times. `clock` gives "now" for the OHLC reach (tests pass the fake market's clock).
    """

    def __init__(
        self,
        db_url: str | None = None,
        symbols: Iterable[str] | None = None,
        rate_limit_delay: float = 1.1,
        max_retries: int = 3,
        *,
        client: "KrakenRestClient | None" = None,
        settings: "Settings | None" = None,
        clock: Callable[[], datetime] | None = None,
        detect_workers: int = 2,
        sleep: Callable[[float], None] = time.sleep,
        registry: PairRegistry | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must not be negative, got {max_retries}")
        self._explicit_settings = settings is not None
        self._db_url_arg = db_url
        self._settings = settings
        self._symbol_names = list(symbols) if symbols else None
        self._symbols: list[str] | None = None
        self._registry = registry
        self.rate_limit_delay = rate_limit_delay
        self.max_retries = max_retries
        self.detect_workers = max(1, detect_workers)
        self._clock = clock or utcnow
        self._sleep = sleep
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()
        self._db_url: str | None = None
        self._local = threading.local()  # one backfill (one connection) per filling thread
        self._backfills: list["KrakenTradesBackfill"] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> "GapFiller":
        """Resolve the database (migrating an embedded one) and build the REST client."""
        with self._lock:
            if self._db_url is None:
                from kraken_hist.storage.migrate import prepare_database

                self._db_url = prepare_database(self._db_url_arg, self._settings)
            if self._client is None:
                from kraken_hist.core.config import settings_or_env
                from kraken_hist.kraken.rest_client import KrakenRestClient

                settings = settings_or_env(self._settings)
                pace = settings.rest_min_interval if self._explicit_settings else self.rate_limit_delay
                self._client = KrakenRestClient.from_settings(replace(settings, rest_min_interval=pace),
                                                              max_retries=self.max_retries, registry=self.registry)
        return self

    def _close_backfills(self) -> None:
        with self._lock:
            for backfill in self._backfills:
                backfill.close()
            self._backfills.clear()
            self._local = threading.local()

    def stop(self) -> None:
        """Close what this filler opened (connections, and the client if it built it)."""
        self._close_backfills()
        with self._lock:
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None

    close = stop

    def __enter__(self) -> "GapFiller":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def db_url(self) -> str:
        if self._db_url is None:
            self.start()
        return self._db_url  # type: ignore[return-value]

    registry = GivenOrDatabaseRegistry()  # the registry given, else the database's

    @property
    def symbols(self) -> list[str] | None:
        """The canonical symbols asked for (None: every symbol with stored trades)."""
        if self._symbols is None and self._symbol_names is not None:
            self._symbols = [self.registry.normalize(s) for s in self._symbol_names]
        return self._symbols

    @property
    def client(self) -> "KrakenRestClient":
        if self._client is None:
            self.start()
        return self._client  # type: ignore[return-value]

    def _backfill(self) -> "KrakenTradesBackfill":
        backfill = getattr(self._local, "backfill", None)
        if backfill is None:
            from kraken_hist.ingest.backfill import KrakenTradesBackfill

            backfill = KrakenTradesBackfill(self.db_url, client=self.client, settings=self._settings,
                                           registry=self.registry)
            self._local.backfill = backfill
            with self._lock:
                self._backfills.append(backfill)
        return backfill

    # --- detection ------------------------------------------------------------------------

    def detect_gaps(self, min_gap_minutes: float = 2, *, since: datetime | None = None,
                    verify_candles: bool = False) -> list[DataGap]:
        """Every gap of the symbols, sorted by symbol then as :func:`read_symbol_gaps` orders them."""
        return [g for scan in self.scan(min_gap_minutes, since=since, verify_candles=verify_candles) for g in scan.gaps]

    def scan(self, min_gap_minutes: float = 2, *, since: datetime | None = None,
             verify_candles: bool = False) -> list[SymbolScan]:
        """Detection per symbol, several symbols at once on their own connections."""
        symbols = self.symbols if self.symbols is not None else self.read_symbols()
        if not symbols:
            return []

        pairs = self.registry
        decimals = {s: pairs.get(s).price_decimals if pairs.is_known(s) else None for s in symbols}

        def one(symbol: str) -> SymbolScan:
            with connect(self.db_url) as conn, translate_errors():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                try:
                    return read_symbol_gaps(conn, symbol, min_gap_minutes=min_gap_minutes, since=since,
                                            verify_candles=verify_candles, price_decimals=decimals[symbol])
                finally:
                    conn.rollback()

        workers = min(self.detect_workers, len(symbols))
        if workers == 1:
            return [one(s) for s in symbols]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gap-detect") as pool:
            return list(pool.map(one, symbols))

    def read_symbols(self) -> list[str]:
        """Symbols with stored trades, candles or coverage (skip scans of the primary keys)."""
        with connect(self.db_url) as conn, translate_errors():
            return [row[0] for row in conn.execute(_READ_SYMBOLS)]

    # --- filling --------------------------------------------------------------------------

    def fill_all_gaps(
        self,
        max_concurrent: int = 3,
        *,
        min_gap_minutes: float = 2,
        since: datetime | None = None,
        gaps: list[DataGap] | None = None,
        on_fill: Callable[[GapFill], None] | None = None,
        refresh: bool = True,
    ) -> GapFillReport:
        """Detect (unless `gaps` are given) and fill every gap, up to `max_concurrent` at once.

        Concurrency never exceeds Kraken's pace: all fills share the process-wide limiter.
        Afterwards the symbols' resume-independent bookkeeping (sync_status 'gaps') is
        updated and the interval aggregates are refreshed from the changed candles.
        """
        began = time.monotonic()
        report = GapFillReport()
        scans: list[SymbolScan] = []
        if gaps is None:
            scans = self.scan(min_gap_minutes, since=since)
            gaps = [g for s in scans for g in s.gaps]
        for gap in gaps:
            report.symbol(gap.symbol).found += 1
        for scan in scans:
            report.symbol(scan.symbol)
        if gaps:
            workers = max(1, min(max_concurrent, len(gaps)))
            try:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gap-fill") as pool:
                    futures = [pool.submit(self.fill_gap, gap) for gap in gaps]
                    for future in as_completed(futures):
                        fill = future.result()
                        report.add(fill)
                        if on_fill is not None:
                            on_fill(fill)
            finally:
                self._close_backfills()  # the pool's threads are gone: so are their connections' users
        for scan in scans:
            if scan.newest_time is not None:
                self.update_sync_status(scan.symbol, scan.newest_time, report=report.symbol(scan.symbol))
        changed = sorted({f.gap.symbol for f in report.fills if f.trades_stored or f.candles_written})
        if refresh and changed:
            for symbol in changed:
                self.refresh_continuous_aggregates(symbol)
            report.refreshed = True
        report.seconds = time.monotonic() - began
        logger.info("gap fill done: %s", report.to_dict(), extra={"event": "gaps.filled"})
        return report

    def fill_gap(self, gap: DataGap) -> GapFill:
        """Fill one gap by the method :func:`gaps.plan.choose_fill_method` picks; never raises for
        an exchange or database failure (it is in the result)."""
        method = plan.choose_fill_method(gap, self._clock())
        if method is FillMethod.REBUILD:
            return self._with_retries(gap, method, self.fill_gap_candles)
        result = self._with_retries(gap, method, self.fill_gap_trades)
        if result.status != "failed" or not plan.within_ohlc_reach(gap, self._clock()):
            return result
        # Trades cannot be had: keep at least the minutes' candles while OHLC still has them
        logger.warning("%s: trades unavailable (%s); filling its candles through OHLC", gap.symbol, result.reason)
        fallback = self._with_retries(gap, FillMethod.OHLC, self.fill_gap_ohlc)
        if fallback.status == "failed":
            return GapFill(gap=gap, status="failed", method=FillMethod.OHLC,
                           attempts=result.attempts + fallback.attempts,
                           reason=f"trades: {result.reason}; ohlc: {fallback.reason}")
        return GapFill(gap=gap, status="partial", method=FillMethod.OHLC,
                       candles_written=fallback.candles_written, attempts=result.attempts + fallback.attempts,
                       reason=f"candles from OHLC only; trades: {result.reason}")

    def _with_retries(self, gap: DataGap, method: FillMethod, fill: Callable[[DataGap], GapFill]) -> GapFill:
        return with_retries(gap, method, fill, max_retries=self.max_retries, sleep=self._sleep)

    def fill_gap_trades(self, gap: DataGap) -> GapFill:
        """Fetch the gap's trades and store them, then rebuild the window's candles
        (:func:`trade_fill.fill_from_trades`). Raises the exchange's errors (the caller retries)."""
        return trade_fill.fill_from_trades(gap, self._backfill(), self.db_url)

    def fill_gap_candles(self, gap: DataGap) -> GapFill:
        """Rebuild the gap's 1-minute candles from the stored trades (no network)."""
        return trade_fill.rebuild_gap_candles(gap, self._backfill())

    def fill_gap_ohlc(self, gap: DataGap) -> GapFill:
        """Fill the gap's minutes' candles from the OHLC endpoint (:mod:`gaps.ohlc_fallback`)."""
        return ohlc_fallback.fill_from_ohlc(gap, db_url=self.db_url, client=self.client,
                                            pair=self.registry.get(gap.symbol), now=self._clock())

    # --- bookkeeping ----------------------------------------------------------------------

    def update_sync_status(
        self, symbol: str, newest_time: datetime, *, report: SymbolFillReport | None = None
    ) -> None:
        """Record that `symbol` was checked (and filled) up to `newest_time`, under data type
        'gaps' — never the trades resume point, which only forward ingestion moves."""
        details: dict[str, Any] = {"checked_at": utcnow().isoformat()}
        if report is not None:
            details.update(found=report.found, filled=report.filled, verified_empty=report.verified_empty,
                           failed=len(report.failed))
        with connect(self.db_url) as conn, translate_errors(), conn.transaction():
            store.write_sync_status(conn, self.registry.normalize(symbol), SYNC_TYPE,
                                    last_time=check_aware(newest_time, "newest_time"), details=details)

    def refresh_continuous_aggregates(
        self, symbol: str | None = None, start: datetime | None = None, end: datetime | None = None
    ) -> Any:
        """Bring the 5m…1w relations in step with the repaired 1-minute candles."""
        from kraken_hist.storage.refresh import refresh_aggregates

        try:
            return refresh_aggregates(self.db_url, symbol, start, end)
        except KrakenHistError:
            raise
        except psycopg.Error as exc:
            raise TransientError(f"aggregate refresh of {symbol or 'all symbols'} failed: {exc}") from exc
