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

Coverage only claims what is known complete: a page proves ``[start, time of its last
trade)`` (trades sharing that last timestamp may continue on the next page), or up to
``until`` when a trade at or after ``until`` was seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from kraken_hist.storage import ownership

from kraken_hist.storage import store
from kraken_hist.storage.db import connect, translate_errors
from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError
from kraken_hist.storage.pair_store import database_registry
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.bounds import unix_seconds_problem
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.core.timeutils import check_aware, floor_minute, since_cursor, to_unix_ns, utcnow
from kraken_hist.core.types import HistoricalTrade, Refused, TradeRecord, TradeSource

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings
    from kraken_hist.kraken.rest_client import KrakenRestClient

logger = logging.getLogger(__name__)

SYNC_TYPE = "trades"
COVERAGE_SOURCE = "rest"
TRADE_SOURCES = (*ownership.ID_SOURCES, ownership.ARCHIVE_SOURCE)  # coverage that proves trades are stored
PAGE_SIZE = 1000
MAX_SAME_TIMESTAMP = 17  # the most real trades seen sharing one timestamp (KRAKEN.md)
#: How far the cursor steps back (ns) to repair a break in the trade ids, tried in order.
REPAIR_STEPS = (1, 1_000, 1_000_000, 1_000_000_000, 60_000_000_000)
#: Pages in a row that bring no new trade id before paging is given up as not advancing (a
#: cursor that moves a nanosecond a page over the same trades would otherwise loop forever).
MAX_IDLE_PAGES = 3
LOG_EVERY_SECONDS = 10.0

Trade = HistoricalTrade | TradeRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePoint:
    """Where a forward backfill of a symbol continues: sync_status(symbol, 'trades')."""

    symbol: str
    cursor: str | None
    last_time: datetime | None
    last_trade_id: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillPage:
    """One checked page from :meth:`KrakenTradesBackfill.fetch_all_trades`.

    ``trades`` continue the previous page exactly (overlap dropped, breaks repaired, nothing
    at or after ``until``); ``last`` is the cursor to continue from after storing them;
    ``covered`` is the time range this page proves complete.
    """

    symbol: str
    trades: list[HistoricalTrade]
    last: str
    covered: tuple[datetime, datetime] | None
    reached_until: bool = False
    repaired: int = 0
    #: Trades of this page refused for an impossible value (``bounds``): their ids are
    #: accounted for, recorded in ``refused_trades`` with the page.
    refused: tuple[Refused, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillProgress:
    """Handed to the progress callback after each stored page."""

    symbol: str
    pages: int
    trades: int
    position: datetime | None  # time of the newest trade stored so far in this phase
    start: datetime | None
    target: datetime | None  # until, or the time the run started ("now")
    phase: str  # "forward" or "backward"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillResult:
    symbol: str
    pages: int
    trades_fetched: int
    trades_stored: int
    repairs: int
    backward_windows: int
    first_time: datetime | None
    last_time: datetime | None
    last_trade_id: int | None
    caught_up: bool
    reached_until: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("first_time", "last_time"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


class _Tally:
    """Counters of one backfill_symbol run, across phases."""

    def __init__(self) -> None:
        self.pages = self.fetched = self.stored = self.repairs = 0
        self.first_time: datetime | None = None
        self.last_time: datetime | None = None
        self.last_id: int | None = None
        self.caught_up = False
        self.reached_until = False


_MERGE_STAGED = store.merge_staged_trades("trades_staging")


class KrakenTradesBackfill:
    """Backfill trades of symbols into the database, resumable at any page.

    `client` is handed in (a :class:`KrakenRestClient`); when omitted, one is built from
    `settings` and closed by :meth:`close`. The database connection is opened on first use.
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

            client = KrakenRestClient.from_settings(self.settings, registry=self.registry)
        self.client = client
        if not MAX_SAME_TIMESTAMP < page_size <= PAGE_SIZE:
            # a page must be able to hold a whole burst of trades sharing one timestamp, or
            # stepping back over a cut burst could never get past it
            raise ValueError(f"page_size must be in ({MAX_SAME_TIMESTAMP}, {PAGE_SIZE}], got {page_size}")
        self.page_size = page_size
        self.progress = progress
        self.refresh = refresh  # bring the 5m…1w relations up to date at the end of a run
        self._conn: psycopg.Connection | None = None
        self._staging_ready = False

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
            self._staging_ready = False
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
        starts (default: `since` when a datetime, else the first trade's time).
        """
        canonical = self.registry.normalize(symbol)
        if until is not None:
            until = check_aware(until, "until")
        if isinstance(since, datetime):
            since = check_aware(since, "since")
            covered_from = covered_from if covered_from is not None else since
            cursor = since_cursor(since)  # trades at or after since
        elif since is None:
            cursor = "0"  # the pair's first trade
        else:
            cursor = str(since)
        expected = after_id + 1 if after_id is not None else None
        cover_start = covered_from
        idle = 0  # pages in a row without a new trade id
        while True:
            page = self.fetch_trades_page(canonical, cursor)
            trades, repaired, page = self._continue_from(canonical, cursor, page, expected)
            trades, refused, jump = _contiguous_part(trades, page.refused, expected)
            if not trades:
                if not (page.trades or page.refused) or int(page.last) <= int(cursor):
                    logger.debug("%s caught up at cursor %s", canonical, cursor)
                    return
                if refused:  # a page of refused trades only: seen all the same
                    if until is None or refused[0].time is None or refused[0].time < until:
                        self._record_refused(canonical, refused)
                    expected = max(r.trade_id for r in refused) + 1  # type: ignore[type-var]
                    idle = 0
                elif len(page.trades) < self.page_size:
                    logger.debug("%s caught up at cursor %s (overlap only)", canonical, cursor)
                    return  # overlap only, and nothing after it
                else:
                    idle += 1  # a full page of overlap only: move on, but not for ever
                    if idle >= MAX_IDLE_PAGES:
                        raise ExchangeTransientError(
                            f"{canonical}: Trades paging does not advance: {idle} pages in a row after cursor "
                            f"{cursor} brought no new trade (last={page.last})")
                if jump is None:  # (after a jump: the same cursor again, and the break is repaired)
                    cursor = _possible_cursor(canonical, page.last, None)
                continue
            idle = 0
            reached_until = False
            if until is not None and trades[-1].time >= until:
                trades = [t for t in trades if t.time < until]
                reached_until = True
            if reached_until:
                next_cursor = since_cursor(until)  # type: ignore[arg-type]
                cover_end = until
                refused = tuple(r for r in refused if r.time is None or r.time < until)
            elif jump is not None:
                # Ids jump inside the page: it is cut there, as if the page ended with the last
                # trade before the jump, and the next page continues from just before that
                # trade's time: the break between pages then goes through the same repair (step
                # back and refetch; a hole Kraken itself has is logged and stays a gap)
                logger.warning("%s: trade ids jump from %d to %d inside the page after cursor %s; "
                               "refetching from trade %d", canonical, jump[0], jump[1], cursor, jump[0],
                               extra={"event": "backfill_id_jump"})
                next_cursor = str(max(int(cursor) + 1, to_unix_ns(trades[-1].time) - 1))
                cover_end = trades[-1].time
            else:
                next_cursor = _possible_cursor(canonical, page.last, trades[-1].time)
                cover_end = trades[-1].time
            if cover_start is None and trades:
                # from the pair's first trade ("0"): nothing traded earlier in its minute either
                cover_start = floor_minute(trades[0].time) if cursor == "0" else trades[0].time
            covered = (cover_start, cover_end) if cover_start is not None and cover_end > cover_start else None
            if trades or reached_until:
                yield BackfillPage(
                    symbol=canonical,
                    trades=trades,
                    last=next_cursor,
                    covered=covered,
                    reached_until=reached_until,
                    repaired=repaired,
                    refused=refused,
                )
            if reached_until:
                return
            if int(next_cursor) <= int(cursor):
                raise ExchangeTransientError(
                    f"{canonical}: Trades cursor did not advance past {cursor} (last={page.last}) "
                    f"although the page held trades up to id {trades[-1].trade_id}")
            expected = max([trades[-1].trade_id] + [r.trade_id for r in refused]) + 1  # type: ignore[operator]
            cover_start = cover_end
            cursor = next_cursor

    def _continue_from(
        self, symbol: str, cursor: str, page: TradesPage, expected: int | None
    ) -> tuple[list[HistoricalTrade], int, TradesPage]:
        """Trades of `page` that continue at id `expected`, repairing a break by refetching
        from a cursor stepped back; returns (trades, refetches, the page used)."""
        if expected is None:
            return list(page.trades), 0, page
        # A refused trade (an impossible value, see TradesPage.refused) counts as seen: its id
        # is no hole, and fetching it again would only refuse it again.
        trades = [t for t in page.trades if t.trade_id >= expected]
        first = page.first_seen_id(expected)
        if first is None or first == expected:
            return trades, 0, page
        logger.info(
            "%s: page after cursor %s starts at trade id %d, expected %d; stepping back to refetch",
            symbol, cursor, first, expected,
        )
        for attempt, step in enumerate(REPAIR_STEPS, start=1):
            retry = self.fetch_trades_page(symbol, str(max(0, int(cursor) - step)))
            earliest = retry.first_seen_id()
            if earliest is None or earliest > expected:
                continue  # not far enough back yet
            fixed = [t for t in retry.trades if t.trade_id >= expected]
            following = retry.first_seen_id(expected)
            if following is not None and following != expected:
                # the trade before `expected` was served and `expected` was not: Kraken's own
                # sequence has a hole; nothing to refetch, the gap detector will report it
                logger.warning("%s: Kraken skipped trade ids %d..%d", symbol, expected, following - 1)
            return fixed, attempt, retry
        raise ExchangeTransientError(
            f"{symbol}: trade ids jump from {expected - 1} to {first} after cursor {cursor} "
            "and stepping back did not recover the missing trades"
        )

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
        _check_batch(canonical, batch)
        if covered is None and len(batch) > 1:
            covered = (batch[0].time, batch[-1].time)
        conn = self._connection()
        with translate_errors(), conn.transaction():
            ownership.lock_symbol(conn, canonical)
            inserted = self._insert_trades(conn, canonical, batch, TradeSource(source))
            if batch:
                times = [t.time for t in batch]
                store.rebuild_candles(conn, canonical, min(times), max(times) + timedelta(microseconds=1),
                                      decimals=self._decimals(canonical))
            if covered is not None:
                store.add_coverage(conn, canonical, TradeSource(source).value, covered[0], covered[1])
            if refused:
                store.write_refused_trades(conn, canonical, refused, TradeSource(source).value)
            if cursor is not None:
                last_time = resume_time or (covered[1] if covered else batch[-1].time if batch else None)
                last_id = max((t.trade_id for t in batch), default=None)
                self._advance_resume_point(conn, canonical, cursor, last_time, last_id)
        return inserted

    def _insert_trades(self, conn: psycopg.Connection, symbol: str, batch: list[Trade], source: TradeSource) -> int:
        if not batch:
            return 0
        if not self._staging_ready:
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS trades_staging "
                "(LIKE trades INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self._staging_ready = True
        with conn.cursor() as cur:
            with cur.copy(
                "COPY trades_staging (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN"
            ) as copy:
                src = source.value
                for t in batch:
                    copy.write_row((symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, src))
            # (symbol, trade_id) is a trade's identity; on TimescaleDB the key also holds time,
            # so duplicates are recognised here and not by ON CONFLICT alone. Seconds the
            # archive owns are left to it (ownership.py).
            cur.execute(_MERGE_STAGED, store.identity_window(min(t.time for t in batch), max(t.time for t in batch)))
            inserted = cur.rowcount
            cur.execute("TRUNCATE trades_staging")
        return inserted

    def _advance_resume_point(
        self, conn: psycopg.Connection, symbol: str, cursor: str, last_time: datetime | None, last_id: int | None
    ) -> None:
        current = store.read_sync_status(conn, symbol, SYNC_TYPE)
        if current is not None and current["cursor"] is not None and int(current["cursor"]) > int(cursor):
            # another run (or an import) is already further: never move the resume point back
            logger.debug("%s: resume point %s is ahead of %s; left as is", symbol, current["cursor"], cursor)
            return
        if last_id is None and current is not None:
            last_id = current["last_trade_id"]
        store.write_sync_status(
            conn, symbol, SYNC_TYPE, last_time=last_time, cursor=cursor, last_trade_id=last_id,
            details={"source": COVERAGE_SOURCE},
        )

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
        ranges: list[tuple[datetime, datetime]] = []
        with translate_errors():
            for source in TRADE_SOURCES:
                ranges.extend(store.read_coverage(conn, symbol, source))
        return merge_ranges(ranges)

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
        tally = _Tally()
        state = self.get_resume_point(canonical)
        resume_time = state.last_time if state is not None else None
        windows = 0
        try:
            if since is not None and resume_time is not None and since < resume_time:
                end = min(resume_time, until) if until is not None else resume_time
                for lo, hi in missing_ranges(since, end, self._read_trade_coverage(canonical)):
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
        tally: _Tally,
        *,
        phase: str,
        start: datetime | None,
        target: datetime | None,
        resume: bool,
    ) -> None:
        meter = _ProgressLog(symbol, phase, start, target)
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


class _ProgressLog:
    """Progress as log lines every LOG_EVERY_SECONDS: pages, trades, trades/s, position, ETA."""

    def __init__(self, symbol: str, phase: str, start: datetime | None, target: datetime | None) -> None:
        self.symbol, self.phase = symbol, phase
        self.start, self.target = start, target
        self.began = time.monotonic()
        self.logged = self.began
        self.first_position: datetime | None = None

    def page(self, pages: int, trades: int, position: datetime | None) -> None:
        if position is not None and self.first_position is None:
            self.first_position = self.start if self.start is not None and self.start <= position else position
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY_SECONDS:
            self.logged = now
            self._log(pages, trades, position, now)

    def done(self, pages: int, trades: int, position: datetime | None) -> None:
        if pages:
            self._log(pages, trades, position, time.monotonic())

    def _log(self, pages: int, trades: int, position: datetime | None, now: float) -> None:
        elapsed = max(now - self.began, 1e-9)
        eta = "-"
        if position is not None and self.first_position is not None and self.target is not None:
            done = (position - self.first_position).total_seconds()
            left = (self.target - position).total_seconds()
            if done > 0 and left > 0:
                eta = str(timedelta(seconds=round(left / (done / elapsed))))
            elif left <= 0:
                eta = "0:00:00"
        logger.info(
            "%s %s backfill: %d pages, %d trades, %.0f trades/s, at %s, ETA %s",
            self.symbol, self.phase, pages, trades, trades / elapsed,
            position.isoformat() if position else "-", eta,
        )


def _check_batch(symbol: str, batch: list[Trade]) -> None:
    """Refuse a batch that cannot be right before it reaches the database (cheap checks:
    the records' own constructors validated the rest)."""
    for t in batch:
        if t.symbol != symbol:
            raise ValueError(f"trade {t.trade_id} is for {t.symbol}, not {symbol}")
        if t.price <= 0 or t.volume < 0:
            raise ValueError(f"trade {t.trade_id} of {symbol} has price {t.price} and volume {t.volume}")


def _contiguous_part(
    trades: list[HistoricalTrade], refused: Sequence[Refused], expected: int | None
) -> tuple[list[HistoricalTrade], tuple[Refused, ...], tuple[int, int] | None]:
    """The part of a page whose ids run on without a gap (refused trades count as seen), from
    its first id at least `expected`; and the jump (last id before it, first id after it) where
    the page stops being contiguous, or None."""
    valid = [r for r in refused if r.trade_id is not None and (expected is None or r.trade_id >= expected)
             and 0 < r.trade_id <= 2**63 - 1]
    ids = sorted([t.trade_id for t in trades] + [r.trade_id for r in valid])  # type: ignore[misc]
    jump = next(((a, b) for a, b in zip(ids, ids[1:]) if b > a + 1), None)
    if jump is None:
        return trades, tuple(valid), None
    return ([t for t in trades if t.trade_id <= jump[0]],
            tuple(r for r in valid if r.trade_id <= jump[0]), jump)  # type: ignore[operator]


def _possible_cursor(symbol: str, last: str, fallback: datetime | None) -> str:
    """Kraken's ``last`` cursor when it is a possible time (``bounds``); else a cursor just
    before `fallback` (the newest trade accepted from the page: trades sharing its time are
    fetched again and dropped by id), or an error when there is none."""
    problem = unix_seconds_problem(Decimal(int(last)).scaleb(-9), utcnow(), "last cursor")
    if problem is None:
        return last
    if fallback is None:
        raise ExchangeTransientError(f"{symbol}: Trades page refused: {problem}")
    logger.warning("%s: %s; continuing from the newest accepted trade (%s)", symbol, problem, fallback.isoformat(),
                   extra={"event": "backfill_bad_cursor"})
    return str(to_unix_ns(fallback) - 1)


def merge_ranges(ranges: Sequence[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted, disjoint union of half-open ranges (touching ranges merge)."""
    out: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def missing_ranges(
    start: datetime, end: datetime, covered: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """The parts of ``[start, end)`` outside `covered`: sorted, disjoint, empty when complete."""
    out: list[tuple[datetime, datetime]] = []
    position = start
    for lo, hi in merge_ranges(covered):
        if hi <= position:
            continue
        if lo >= end:
            break
        if lo > position:
            out.append((position, lo))
        position = max(position, hi)
        if position >= end:
            break
    if position < end:
        out.append((position, end))
    return out

