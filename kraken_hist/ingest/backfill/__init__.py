"""Trades backfill through Kraken's REST Trades endpoint: paginate, check, store, resume.

Each page is stored in **one transaction** with everything that depends on it: the trades
(deduplicated on (symbol, trade_id)), the 1-minute candles of the minutes it touches (rebuilt
from all stored trades of those minutes), the coverage it proves and the resume point. A
process killed at any instant therefore resumes from a state that is exactly "pages 1..k
stored", never half a page.

Pagination follows KRAKEN.md: ``since = last`` exactly as received (nanoseconds, a string);
each page must continue at the previous page's last trade id + 1. Whether ``since`` is
inclusive for trades sharing one timestamp is undocumented, so overlap is dropped by id and a
break in the ids is repaired by stepping the cursor back and fetching again. The run is
caught up when a page is empty or ``last`` stops advancing.

The rooms: ``pages`` (the pure page decisions and the coverage each page proves),
``fetch`` (the loop that fetches pages around them), ``store`` (one page in
one transaction), ``progress`` (events, log lines, the result); this module plans a
run (forward from the resume point, older windows the coverage lacks) and ties them together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from kraken_hist.core.errors import ExchangePermanentError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import check_aware, floor_minute, utcnow
from kraken_hist.core.types import Refused, TradeSource
from kraken_hist.ingest.backfill.fetch import page_through
from kraken_hist.ingest.backfill.pages import BackfillPage, TradesPaging
from kraken_hist.ingest.backfill.progress import BackfillProgress, BackfillResult, ProgressLog, Tally
from kraken_hist.ingest.backfill.store import (
    COVERAGE_SOURCE,
    SYNC_TYPE,
    Trade,
    TradeStaging,
    check_batch,
    write_page,
)
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.rules import ranges
from kraken_hist.storage import ownership, store
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.storage.pair_store import database_registry

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings
    from kraken_hist.kraken.ratelimit import Limiter
    from kraken_hist.kraken.rest_client import KrakenRestClient

__all__ = [  # BackfillPage, BackfillProgress, BackfillResult are importable from here as before the split
    "BackfillPage", "BackfillProgress", "BackfillResult", "KrakenTradesBackfill", "ResumePoint",
]

logger = logging.getLogger(__name__)

TRADE_SOURCES = (*ownership.ID_SOURCES, ownership.ARCHIVE_SOURCE)  # coverage that proves trades are stored
PAGE_SIZE = 1000
MAX_SAME_TIMESTAMP = 17  # the most real trades seen sharing one timestamp (KRAKEN.md)



@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePoint:
    """Where a forward backfill of a symbol continues: sync_status(symbol, 'trades')."""

    symbol: str
    cursor: str | None
    last_time: datetime | None
    last_trade_id: int | None


class KrakenTradesBackfill:
    """Backfill trades of symbols into the database, resumable at any page.

    `client` is handed in (a :class:`KrakenRestClient`); when omitted, one is built from
    `settings` (pacing its calls with `limiter`, default the one the settings choose:
    ``ratelimit.limiter_for``) and closed by :meth:`close`. The database connection is opened
    on first use.
    """

    def __init__(
        self,
        db_url: str | None = None,
        client: "KrakenRestClient | None" = None,
        *,
        settings: "Settings | None" = None,
        page_size: int = PAGE_SIZE,
        progress: Callable[[BackfillProgress], None] | None = None,
        refresh: bool = True,
        registry: PairRegistry | None = None,
        limiter: "Limiter | None" = None,
    ) -> None:
        from kraken_hist.core.config import settings_or_env

        self.settings = settings_or_env(settings)
        if db_url is None:
            from kraken_hist.storage.migrate import prepare_database

            db_url = prepare_database(settings=self.settings)
        self.db_url = db_url
        self.registry = registry if registry is not None else database_registry(db_url)
        self._owns_client = client is None
        if client is None:
            from kraken_hist.kraken.rest_client import KrakenRestClient

            options: dict[str, Any] = {} if limiter is None else {"limiter": limiter}
            client = KrakenRestClient.from_settings(self.settings, registry=self.registry, **options)
        self.client = client
        if not MAX_SAME_TIMESTAMP < page_size <= PAGE_SIZE:
            # a page must be able to hold a whole burst of trades sharing one timestamp, or
            # stepping back over a cut burst could never get past it
            raise ValueError(f"page_size must be in ({MAX_SAME_TIMESTAMP}, {PAGE_SIZE}], got {page_size}")
        self.page_size = page_size
        self.progress = progress
        self.refresh = refresh  # bring the 5m…1w relations up to date at the end of a run
        self._conn: psycopg.Connection | None = None
        self._staging = TradeStaging()

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "KrakenTradesBackfill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.db_url, autocommit=True)
            self._staging = TradeStaging()
        return self._conn

    # --- network --------------------------------------------------------------------------

    def fetch_trades_page(self, symbol: str, since: str | int | datetime | None) -> TradesPage:
        """One Trades call: up to ``page_size`` trades after `since` (a ``last`` cursor)."""
        return self.client.get_trades(self.registry.get(symbol), since=since, count=self.page_size)

    def fetch_all_trades(
        self,
        symbol: str,
        since: str | int | datetime | None = None,
        until: datetime | None = None,
        *,
        after_id: int | None = None,
        covered_from: datetime | None = None,
    ) -> Iterator[BackfillPage]:
        """Checked pages from `since` (a cursor as received, or a datetime: trades at or after
        it) until caught up or until a trade at or after `until` is seen.

        `after_id` is the id of the trade just before `since` when known: pages then must
        continue at ``after_id + 1``. `covered_from` is where the first page's proven coverage
        starts (default: `since` when a datetime, else the first trade's time). The decisions
        are :class:`TradesPaging`'s; this loop fetches, logs and records.
        """
        canonical = self.registry.normalize(symbol)
        if until is not None:
            until = check_aware(until, "until")
        if isinstance(since, datetime):
            since = check_aware(since, "since")
        paging = TradesPaging.since(canonical, since, after_id=after_id, covered_from=covered_from, until=until,
                                    page_size=self.page_size)
        yield from page_through(paging, lambda cursor: self.fetch_trades_page(canonical, cursor),
                                record_refused=lambda refused: self._record_refused(canonical, refused))

    def _record_refused(self, symbol: str, refused: Sequence[Refused]) -> None:
        """Record the refused trades of a page that has nothing else to store."""
        conn = self._connection()
        with translate_errors(), conn.transaction():
            store.write_refused_trades(conn, symbol, refused, COVERAGE_SOURCE)

    # --- storage --------------------------------------------------------------------------

    def store_trades(
        self,
        symbol: str,
        trades: Sequence[Trade],
        *,
        source: TradeSource = TradeSource.REST,
        cursor: str | None = None,
        covered: tuple[datetime, datetime] | None = None,
        resume_time: datetime | None = None,
        refused: Sequence[Refused] = (),
    ) -> int:
        """Store `trades` idempotently and, in the same transaction, rebuild the candles of the
        minutes they touch, add `covered` (default: first to last trade time) to the
        source's coverage, record the `refused` trades of the page (their ids are accounted
        for) and, when `cursor` is given, advance the resume point (never backwards). Returns
        the number of trades that were new."""
        canonical = self.registry.normalize(symbol)
        batch = list(trades)
        check_batch(canonical, batch)
        if covered is None and len(batch) > 1:
            covered = (batch[0].time, batch[-1].time)
        conn = self._connection()
        with translate_errors(), conn.transaction():
            return write_page(conn, self._staging, canonical, batch, source=TradeSource(source),
                              decimals=self._decimals(canonical), covered=covered, refused=refused, cursor=cursor,
                              resume_time=resume_time)

    def build_candles_from_trades(self, symbol: str, start: datetime, end: datetime) -> int:
        """Rebuild the 1-minute candles of ``[start, end)`` from stored trades; returns candles written."""
        canonical = self.registry.normalize(symbol)
        conn = self._connection()
        with translate_errors(), conn.transaction():
            ownership.lock_symbol(conn, canonical)
            return store.rebuild_candles(conn, canonical, check_aware(start, "start"), check_aware(end, "end"),
                                         decimals=self._decimals(canonical))

    def _decimals(self, symbol: str) -> int:
        return self.registry.get(symbol).price_decimals

    # --- reading state --------------------------------------------------------------------

    def get_resume_point(self, symbol: str) -> ResumePoint | None:
        """The stored forward resume point of `symbol`, or None before its first backfill."""
        canonical = self.registry.normalize(symbol)
        with translate_errors():
            row = store.read_sync_status(self._connection(), canonical, SYNC_TYPE)
        if row is None:
            return None
        return ResumePoint(
            symbol=canonical, cursor=row["cursor"], last_time=row["last_time"], last_trade_id=row["last_trade_id"]
        )

    def _read_trade_coverage(self, symbol: str) -> list[tuple[datetime, datetime]]:
        conn = self._connection()
        covered: list[tuple[datetime, datetime]] = []
        with translate_errors():
            for source in TRADE_SOURCES:
                covered.extend(store.read_coverage(conn, symbol, source))
        return ranges.normalize(covered)

    def _last_id_before(self, symbol: str, when: datetime) -> int | None:
        with translate_errors():
            row = self._connection().execute(
                "SELECT trade_id FROM trades WHERE symbol = %s AND time < %s AND trade_id > 0 "
                "ORDER BY time DESC, trade_id DESC LIMIT 1",
                (symbol, when),
            ).fetchone()
        return int(row[0]) if row else None

    def _exchange_now(self) -> datetime:
        """The forward target for progress and ETA: our clock. (Asking Kraken's Time first cost a
        full retry cycle before the real call when Kraken was unreachable; seconds of clock
        difference do not matter to a progress bar.)"""
        return utcnow()

    # --- orchestration --------------------------------------------------------------------

    def backfill_symbol(
        self, symbol: str, since: datetime | None = None, until: datetime | None = None
    ) -> BackfillResult:
        """Bring `symbol` up to date (or up to `until`), resuming where the last run stopped.

        With no stored resume point the run starts at `since` (default: the pair's first
        trade). With one, it continues from the stored cursor; a `since` older than the
        stored data first fetches the uncovered older range (without touching the forward
        resume point). Raises ExchangePermanentError at once for a pair Kraken refuses.
        """
        canonical = self.registry.normalize(symbol)
        # from the start of its minute, so the first 1-minute candle is whole
        since = floor_minute(check_aware(since, "since")) if since is not None else None
        until = check_aware(until, "until") if until is not None else None
        if since is not None and until is not None and until <= since:
            raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
        started = time.monotonic()
        tally = Tally()
        state = self.get_resume_point(canonical)
        resume_time = state.last_time if state is not None else None
        windows = 0
        try:
            if since is not None and resume_time is not None and since < resume_time:
                end = min(resume_time, until) if until is not None else resume_time
                for lo, hi in ranges.complement(self._read_trade_coverage(canonical), since, end):
                    windows += 1
                    logger.info("%s: fetching older trades %s → %s", canonical, lo.isoformat(), hi.isoformat())
                    pages = self.fetch_all_trades(
                        canonical, lo, hi, after_id=self._last_id_before(canonical, lo), covered_from=lo
                    )
                    self._store_pages(canonical, pages, tally, phase="backward", start=lo, target=hi, resume=False)
            if until is None or resume_time is None or until > resume_time:
                if state is not None and (state.cursor is not None or state.last_time is not None):
                    cursor: str | datetime = (
                        state.cursor if state.cursor is not None else state.last_time  # type: ignore[assignment]
                    )
                    pages = self.fetch_all_trades(
                        canonical, cursor, until, after_id=state.last_trade_id, covered_from=state.last_time
                    )
                    start = state.last_time
                else:
                    pages = self.fetch_all_trades(canonical, since, until)
                    start = since
                target = until if until is not None else self._exchange_now()
                self._store_pages(canonical, pages, tally, phase="forward", start=start, target=target, resume=True)
            else:
                tally.reached_until = True  # everything before `until` was already stored
        except ExchangePermanentError as exc:
            raise ExchangePermanentError(f"backfill of {canonical} refused by Kraken: {exc}") from exc
        if self.refresh and tally.stored:
            self._refresh_aggregates(canonical)
        seconds = time.monotonic() - started
        after = self.get_resume_point(canonical)
        result = BackfillResult(
            symbol=canonical,
            pages=tally.pages,
            trades_fetched=tally.fetched,
            trades_stored=tally.stored,
            repairs=tally.repairs,
            backward_windows=windows,
            first_time=tally.first_time,
            last_time=after.last_time if after else tally.last_time,
            last_trade_id=after.last_trade_id if after else tally.last_id,
            caught_up=tally.caught_up,
            reached_until=tally.reached_until,
            seconds=seconds,
        )
        logger.info(
            "%s backfill done: %d pages, %d trades fetched, %d new, %.1f s, up to %s%s",
            canonical, result.pages, result.trades_fetched, result.trades_stored, seconds,
            result.last_time.isoformat() if result.last_time else "-",
            " (caught up)" if result.caught_up else "",
        )
        return result

    def _refresh_aggregates(self, symbol: str) -> None:
        """Refresh the interval relations from this run's changed minutes (incremental).

        A failure is not the backfill's: the trades are stored and the changes stay queued
        in ``candle_changes`` for the next refresh (Celery beat, ``kraken-hist refresh``).
        """
        from kraken_hist.core.errors import KrakenHistError
        from kraken_hist.storage.refresh import refresh_aggregates

        try:
            refresh_aggregates(self.db_url, symbol)
        except (KrakenHistError, psycopg.Error) as exc:
            logger.warning("%s: aggregate refresh after backfill failed (%s); changes stay queued", symbol, exc,
                           extra={"event": "backfill_refresh_failed"})

    def _store_pages(
        self,
        symbol: str,
        pages: Iterator[BackfillPage],
        tally: Tally,
        *,
        phase: str,
        start: datetime | None,
        target: datetime | None,
        resume: bool,
    ) -> None:
        meter = ProgressLog(symbol, phase, start, target)
        phase_pages = phase_trades = 0
        reached_until = False
        position: datetime | None = None
        for page in pages:
            stored = self.store_trades(
                symbol,
                page.trades,
                source=TradeSource.REST,
                cursor=page.last if resume else None,
                covered=page.covered,
                resume_time=page.covered[1] if page.covered else None,
                refused=page.refused,
            )
            phase_pages += 1
            phase_trades += len(page.trades)
            tally.pages += 1
            tally.fetched += len(page.trades)
            tally.stored += stored
            tally.repairs += page.repaired
            if page.trades:
                if tally.first_time is None or page.trades[0].time < tally.first_time:
                    tally.first_time = page.trades[0].time
                tally.last_time = page.trades[-1].time
                tally.last_id = page.trades[-1].trade_id
                position = page.trades[-1].time
            reached_until = reached_until or page.reached_until
            meter.page(phase_pages, phase_trades, position)
            if self.progress is not None:
                self.progress(
                    BackfillProgress(
                        symbol=symbol, pages=phase_pages, trades=phase_trades, position=position,
                        start=start, target=target, phase=phase,
                    )
                )
        meter.done(phase_pages, phase_trades, position)
        if phase == "forward":
            tally.reached_until = reached_until
            tally.caught_up = not reached_until
