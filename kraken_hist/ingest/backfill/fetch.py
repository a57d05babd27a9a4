"""The loop around the backfill's page decisions: fetch a page, repair a break by refetching
from a stepped-back cursor, hand the page to the pure :class:`TradesPaging`, log what it
noticed and yield the checked pages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime

from kraken_hist.core.timeutils import utcnow
from kraken_hist.core.types import Refused
from kraken_hist.ingest.backfill.pages import BackfillPage, TradesPaging
from kraken_hist.kraken.rest_parsing import TradesPage

logger = logging.getLogger("kraken_hist.ingest.backfill")


def page_through(
    paging: TradesPaging,
    fetch: Callable[[str], TradesPage],
    *,
    record_refused: Callable[[tuple[Refused, ...]], None],
    clock: Callable[[], datetime] = utcnow,
) -> Iterator[BackfillPage]:
    """Fetch pages from `paging`'s cursor, repair breaks, and yield the checked pages until
    `paging` says paging is over: the loop around the pure decisions (it fetches, logs and
    records a page of refused trades only through `record_refused`)."""
    symbol = paging.symbol
    while True:
        cursor = paging.cursor
        page, repaired = repair_break(paging, fetch(cursor), fetch)
        step = paging.accept(page, now=clock(), repaired=repaired)
        if step.caught_up is not None:
            logger.debug("%s caught up %s", symbol, step.caught_up)
        if step.jump is not None:
            logger.warning("%s: trade ids jump from %d to %d inside the page after cursor %s; "
                           "refetching from trade %d", symbol, step.jump[0], step.jump[1], cursor, step.jump[0],
                           extra={"event": "backfill_id_jump"})
        if step.bad_cursor is not None and step.page is not None:
            logger.warning("%s: %s; continuing from the newest accepted trade (%s)", symbol, step.bad_cursor,
                           step.page.trades[-1].time.isoformat(), extra={"event": "backfill_bad_cursor"})
        if step.refused_only:
            record_refused(step.refused_only)
        if step.page is not None:
            yield step.page
        if step.error is not None:
            raise step.error
        if step.finished:
            return


def repair_break(paging: TradesPaging, page: TradesPage, fetch: Callable[[str], TradesPage]) -> tuple[TradesPage, int]:
    """`page`, or when it does not continue at the expected id, the page fetched from a cursor
    stepped back far enough to hold it; returns (the page to take, refetches)."""
    first = paging.break_at(page)
    if first is None:
        return page, 0
    symbol = paging.symbol
    logger.info("%s: page after cursor %s starts at trade id %d, expected %d; stepping back to refetch",
                symbol, paging.cursor, first, paging.expected)
    for attempt, cursor in enumerate(paging.step_back_cursors(), start=1):
        retry = fetch(cursor)
        verdict = paging.judge_step_back(retry)
        if not verdict.enough:
            continue
        if verdict.hole is not None:
            # the trade before the expected one was served and it was not: Kraken's own
            # sequence has a hole; nothing to refetch, the gap detector will report it
            logger.warning("%s: Kraken skipped trade ids %d..%d", symbol, *verdict.hole)
        return retry, attempt
    raise paging.unrepaired(first)
