"""Find every hole in the stored history and fill it, without ever chasing a quiet market.

Detection is :mod:`gap_detection` (SQL, no network). Filling picks a method per gap with the
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
many fills run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from kraken_hist.rules import ranges as ranges
from kraken_hist.storage import ownership
from kraken_hist.storage import store
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.core.errors import KrakenHistError, PermanentError, TransientError
from kraken_hist.gaps.detection import SymbolScan, read_symbol_gaps
from kraken_hist.gaps import plan
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.storage.pair_store import GivenOrDatabaseRegistry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import check_aware, floor_minute, to_unix_seconds, utcnow
from kraken_hist.core.types import CandleSource, DataGap, GapKind, TradeSource
from kraken_hist.rules.backoff import Backoff

if TYPE_CHECKING:
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.core.config import Settings
    from kraken_hist.kraken.rest_client import KrakenRestClient

logger = logging.getLogger(__name__)

SYNC_TYPE = "gaps"
MICROSECOND = timedelta(microseconds=1)
ONE_MINUTE = timedelta(minutes=1)
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GapFill:
    """The outcome of filling one gap."""

    gap: DataGap
    status: str  # "filled" | "empty" (verified, now covered) | "partial" | "failed"
    method: FillMethod | None
    trades_stored: int = 0
    candles_written: int = 0
    attempts: int = 1
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.gap.symbol,
            "kind": self.gap.kind.value,
            "start": self.gap.start.isoformat(),
            "end": self.gap.end.isoformat(),
            "first_missing_id": self.gap.first_missing_id,
            "last_missing_id": self.gap.last_missing_id,
            "status": self.status,
            "method": self.method.value if self.method else None,
            "trades_stored": self.trades_stored,
            "candles_written": self.candles_written,
            "attempts": self.attempts,
            "reason": self.reason,
        }


@dataclass(slots=True, kw_only=True)
class SymbolFillReport:
    symbol: str
    found: int = 0
    filled: int = 0
    verified_empty: int = 0
    partial: int = 0
    failed: list[tuple[DataGap, str]] = field(default_factory=list)
    trades_stored: int = 0
    candles_written: int = 0
    methods: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "filled": self.filled,
            "verified_empty": self.verified_empty,
            "partial": self.partial,
            "failed": [
                {"kind": g.kind.value, "start": g.start.isoformat(), "end": g.end.isoformat(), "reason": reason}
                for g, reason in self.failed
            ],
            "trades_stored": self.trades_stored,
            "candles_written": self.candles_written,
            "methods": dict(self.methods),
        }


@dataclass(slots=True, kw_only=True)
class GapFillReport:
    """Gaps found, filled, verified empty and failed (with the reason), per symbol."""

    symbols: dict[str, SymbolFillReport] = field(default_factory=dict)
    fills: list[GapFill] = field(default_factory=list)
    seconds: float = 0.0
    refreshed: bool = False

    def add(self, fill: GapFill) -> None:
        report = self.symbol(fill.gap.symbol)
        self.fills.append(fill)
        if fill.status == "filled":
            report.filled += 1
        elif fill.status == "empty":
            report.verified_empty += 1
        elif fill.status == "partial":
            report.partial += 1
        if fill.status in ("failed", "partial"):
            report.failed.append((fill.gap, fill.reason or "unknown"))
        if fill.method is not None:
            report.methods[fill.method.value] = report.methods.get(fill.method.value, 0) + 1
        report.trades_stored += fill.trades_stored
        report.candles_written += fill.candles_written

    def symbol(self, name: str) -> SymbolFillReport:
        return self.symbols.setdefault(name, SymbolFillReport(symbol=name))

    @property
    def found(self) -> int:
        return sum(r.found for r in self.symbols.values())

    @property
    def filled(self) -> int:
        return sum(r.filled for r in self.symbols.values())

    @property
    def verified_empty(self) -> int:
        return sum(r.verified_empty for r in self.symbols.values())

    @property
    def failed(self) -> int:
        return sum(len(r.failed) for r in self.symbols.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "filled": self.filled,
            "verified_empty": self.verified_empty,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "refreshed": self.refreshed,
            "symbols": {name: r.to_dict() for name, r in sorted(self.symbols.items())},
        }


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
        query = """
            WITH RECURSIVE t(symbol) AS (
                SELECT min(symbol) FROM trades
                UNION ALL
                SELECT (SELECT min(x.symbol) FROM trades x WHERE x.symbol > t.symbol) FROM t WHERE t.symbol IS NOT NULL
            ), c(symbol) AS (
                SELECT min(symbol) FROM candles
                UNION ALL
                SELECT (SELECT min(x.symbol) FROM candles x WHERE x.symbol > c.symbol) FROM c WHERE c.symbol IS NOT NULL
            )
            SELECT symbol FROM t WHERE symbol IS NOT NULL
            UNION SELECT symbol FROM c WHERE symbol IS NOT NULL
            UNION SELECT symbol FROM coverage
            ORDER BY 1
        """
        with connect(self.db_url) as conn, translate_errors():
            return [row[0] for row in conn.execute(query)]

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
        attempt = 0
        while True:
            attempt += 1
            try:
                result = fill(gap)
            except PermanentError as exc:
                logger.warning("gap %s: %s fill failed for good: %s", gap.symbol, method.value, exc)
                return GapFill(gap=gap, status="failed", method=method, attempts=attempt, reason=str(exc))
            except (TransientError, psycopg.OperationalError) as exc:
                if attempt > self.max_retries:
                    return GapFill(gap=gap, status="failed", method=method, attempts=attempt,
                                   reason=f"{exc} (after {attempt} attempts)")
                pause = Backoff(RETRY_BASE_SECONDS, RETRY_CAP_SECONDS).delay(attempt)
                logger.info("gap %s: %s fill attempt %d failed (%s); retrying in %.1f s",
                            gap.symbol, method.value, attempt, exc, pause)
                self._sleep(pause)
                continue
            return GapFill(gap=result.gap, status=result.status, method=result.method,
                           trades_stored=result.trades_stored, candles_written=result.candles_written,
                           attempts=attempt, reason=result.reason)

    def fill_gap_trades(self, gap: DataGap) -> GapFill:
        """Fetch the gap's trades (since = ns just before its start, up to its end) and store
        them page by page with the backfill's idempotent store; then rebuild the window's
        candles. Raises the exchange's errors (the caller retries)."""
        if gap.kind is GapKind.CANDLES:
            return self.fill_gap_candles(gap)
        backfill = self._backfill()
        until = gap.end + MICROSECOND if gap.kind is GapKind.TRADE_IDS else gap.end
        after_id = gap.first_missing_id - 1 if gap.first_missing_id is not None else None
        stored = 0
        reached_end = False
        for page in backfill.fetch_all_trades(gap.symbol, gap.start, until, after_id=after_id, covered_from=gap.start):
            trades = page.trades
            if gap.kind is GapKind.TRADE_IDS:
                # keep the stored neighbours' coverage as it is; only the missing ids matter
                trades = [t for t in trades if gap.first_missing_id <= t.trade_id <= gap.last_missing_id]  # type: ignore[operator]
            stored += backfill.store_trades(gap.symbol, trades, source=TradeSource.REST, covered=page.covered,
                                            refused=page.refused)
            reached_end = reached_end or page.reached_until
        candles = backfill.build_candles_from_trades(gap.symbol, gap.start, until)
        if gap.kind is GapKind.TRADE_IDS:
            still = self._count_missing_ids(gap)
            if still:
                return GapFill(gap=gap, status="failed", method=FillMethod.TRADES, trades_stored=stored,
                               candles_written=candles,
                               reason=f"the exchange did not return {still} of {gap.missing_ids} missing trade ids")
            return GapFill(gap=gap, status="filled", method=FillMethod.TRADES, trades_stored=stored,
                           candles_written=candles)
        if not reached_end:
            return GapFill(gap=gap, status="partial", method=FillMethod.TRADES, trades_stored=stored,
                           candles_written=candles,
                           reason="the exchange has no trades up to the gap's end yet")
        status = "filled" if stored else "empty"
        return GapFill(gap=gap, status=status, method=FillMethod.TRADES, trades_stored=stored,
                       candles_written=candles)

    def fill_gap_candles(self, gap: DataGap) -> GapFill:
        """Rebuild the gap's 1-minute candles from the stored trades (no network)."""
        candles = self._backfill().build_candles_from_trades(gap.symbol, gap.start, gap.end)
        return GapFill(gap=gap, status="filled", method=FillMethod.REBUILD, candles_written=candles)

    def fill_gap_ohlc(self, gap: DataGap) -> GapFill:
        """Fill the gap's minutes from the OHLC endpoint (1m): finished, non-filler rows are
        stored with source ``rest_ohlc`` where no candle built from trades exists, and kept
        in ``exchange_candles``; the fetched minutes are recorded as ``ohlc`` coverage."""
        now = self._clock()
        first_minute = floor_minute(gap.start)
        if first_minute < plan.ohlc_reach_start(now):
            raise PermanentError(
                f"{gap.symbol}: {first_minute.isoformat()} is older than the OHLC endpoint's 720 newest candles"
            )
        last_minute = floor_minute(gap.end - MICROSECOND) if gap.end > gap.start else first_minute
        page = self.client.get_ohlc(self.registry.get(gap.symbol), 1, since=to_unix_seconds(first_minute) - 60)
        rows = [
            r for r in page.finished_rows()
            if first_minute <= r.time <= last_minute
        ]
        trading = [r.to_candle_record(CandleSource.REST_OHLC) for r in rows if not r.is_filler]
        written = self._write_ohlc_candles(gap.symbol, trading)
        if rows:
            with connect(self.db_url) as conn, translate_errors(), conn.transaction():
                store.add_coverage(conn, gap.symbol, "ohlc", rows[0].time, rows[-1].time + ONE_MINUTE)
        covered_to = rows[-1].time + ONE_MINUTE if rows else first_minute
        status = "filled" if covered_to > last_minute else "partial"
        return GapFill(gap=gap, status=status, method=FillMethod.OHLC, candles_written=written,
                       reason=None if status == "filled" else "OHLC has no finished candles up to the gap's end")

    def _write_ohlc_candles(self, symbol: str, candles: list) -> int:
        if not candles:
            return 0
        with connect(self.db_url) as conn, translate_errors(), conn.transaction():
            ownership.lock_symbol(conn, symbol)
            with conn.cursor() as cur:
                cur.executemany(
                    """
                    INSERT INTO exchange_candles AS e
                        (symbol, interval, time, open, high, low, close, vwap, volume, trades, source)
                    VALUES (%s, 1, %s, %s, %s, %s, %s, %s, %s, %s, 'rest_ohlc')
                    ON CONFLICT (symbol, interval, time) DO UPDATE
                    SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
                        vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
                        source = EXCLUDED.source
                    """,
                    [(c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades) for c in candles],
                )
                written = 0
                for c in candles:
                    cur.execute(
                        """
                        INSERT INTO candles AS k
                            (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
                        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
                        ON CONFLICT (symbol, time) DO UPDATE
                        SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
                            close = EXCLUDED.close, vwap = EXCLUDED.vwap, volume = EXCLUDED.volume,
                            trades = EXCLUDED.trades, source = EXCLUDED.source, updated_at = now()
                        WHERE k.source <> 'trades'
                        """,
                        (c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades,
                         c.source.value),
                    )
                    written += cur.rowcount
            store.record_candle_change(conn, symbol, candles[0].time, candles[-1].time + ONE_MINUTE)
        return written

    def _count_missing_ids(self, gap: DataGap) -> int:
        """Ids of `gap` still missing; none when the rest are the archive's (ownership.py)."""
        with connect(self.db_url) as conn, translate_errors():
            row = conn.execute(  # the missing ids lie in the gap's time (bounded: TimescaleDB prunes chunks)
                "SELECT count(*) FROM trades WHERE symbol = %(symbol)s AND trade_id BETWEEN %(first)s AND %(last)s "
                "AND time >= %(lo)s AND time <= %(hi)s",
                {"symbol": gap.symbol, "first": gap.first_missing_id, "last": gap.last_missing_id,
                 **store.identity_window(gap.start, gap.end)},
            ).fetchone()
            missing = (gap.missing_ids or 0) - int(row[0])  # type: ignore[index]
            if missing:  # a refused id is accounted for: fetching it again gives the same refusal
                missing -= len(store.read_refused_ids(conn, gap.symbol, gap.first_missing_id,  # type: ignore[arg-type]
                                                      gap.last_missing_id))  # type: ignore[arg-type]
            if missing:
                archive = store.read_coverage(conn, gap.symbol, ownership.ARCHIVE_SOURCE)
                by_id = ranges.union(*(store.read_coverage(conn, gap.symbol, s) for s in ownership.ID_SOURCES))
                if ownership.hole_explained((gap.start, gap.end), archive, by_id):
                    return 0
        return missing

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
