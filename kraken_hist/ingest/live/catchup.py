"""The live stream's REST catch-up: fetch exactly the ids its records miss.

A background thread asks each symbol's id sequence for its first job (its lowest hole, or a
tail check after a reconnect), pages REST Trades for it (paced by the REST client's limiter)
and hands the pages to the same :class:`~kraken_hist.ingest.live.handover.TradeHandover` as the
WebSocket. A symbol whose fetch fails waits out a back-off; others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kraken_hist.core.errors import ExchangePermanentError, TransientError
from kraken_hist.core.types import TradeSource
from kraken_hist.ingest.live.handover import TradeHandover
from kraken_hist.ingest.live.ids import Fetch
from kraken_hist.ingest.live.records import LiveState, TradesFetcher
from kraken_hist.rules.backoff import Backoff

logger = logging.getLogger("kraken_hist.ingest.live")

#: REST pages in a row that bring no new trade id before a catch-up gives up for this turn.
MAX_IDLE_PAGES = 3


class NotYetError(TransientError):
    """REST has not (yet) got the ids we are missing; retried with back-off."""


class RestCatchUp:
    """Fills the symbols' holes through `rest`, at most `pages_per_turn` pages a symbol before
    the next symbol's turn; a failed symbol retries after a back-off capped at `retry_cap`."""

    def __init__(self, state: LiveState, handover: TradeHandover, rest: TradesFetcher, stop: threading.Event, *,
                 pages_per_turn: int, retry_cap: float, name: str) -> None:
        self._state = state
        self._handover = handover
        self.rest = rest
        self._stop = stop
        self.pages_per_turn = pages_per_turn
        self.retry_cap = retry_cap
        self.name = name

    def _next_job(self) -> tuple[str, Fetch] | None:
        """The earliest hole (or a tail check) of a symbol not waiting out a retry."""
        now = time.monotonic()
        for symbol, state in self._state.symbols.items():
            if state.retry_at > now:
                continue
            job = state.seq.next_fetch()
            if job is not None:
                return symbol, job
        return None

    def run(self) -> None:
        while not self._stop.is_set():
            with self._state.work:
                job = self._next_job()
                if job is None:
                    self._state.work.wait(timeout=0.5)
                    continue
            symbol, fetch = job
            try:
                self.fill(symbol, fetch)
                with self._state.lock:
                    self._state.symbols[symbol].failures = 0
            except (TransientError, ExchangePermanentError) as exc:
                with self._state.lock:
                    state = self._state.symbols[symbol]
                    state.failures += 1
                    delay = Backoff(1.0, self.retry_cap).delay(state.failures)
                    state.retry_at = time.monotonic() + delay
                    if fetch.hi is None:
                        state.seq.tail_check = True
                logger.warning("%s: REST catch-up of %s failed (%s); again in %.1fs", self.name, symbol, exc, delay)

    def fill(self, symbol: str, job: Fetch) -> None:
        """Page REST Trades from just before the job's first id (or from its anchor) until its
        ids are all in (a tail check: until REST has nothing newer). At most ``pages_per_turn``
        pages, then other symbols get their turn; the rest is picked up on the next round."""
        since = str(job.since)
        fixes_start = job.lo is None  # the pages run on from the anchor: their first trade at/after it starts the record
        page_size = int(getattr(self.rest, "page_size", 1000))
        idle = 0  # pages in a row that placed no new id
        for _ in range(self.pages_per_turn):
            if self._stop.is_set():
                return
            page = self.rest.fetch_trades_page(symbol, since)
            self._state.counts["rest_calls"] += 1
            with self._state.lock:
                before = self._progress_mark(symbol)
            self._handover.accept(self._handover.with_refused(page.trades, page.refused, symbol), TradeSource.REST,
                                 fixes_start)
            with self._state.lock:
                idle = idle + 1 if self._progress_mark(symbol) == before else 0
            rows = len(page.trades) + len(page.refused)  # a refused row is a row of the page all the same
            if job.hi is None:
                if rows < page_size or page.last == since:
                    return  # caught up with what REST knows
                if int(page.last) <= int(since) or idle >= MAX_IDLE_PAGES:
                    raise NotYetError(f"REST paging of {symbol} does not advance: {idle} full pages in a row "
                                       f"brought no new trade (since {since}, last {page.last})")
                since = page.last
                continue
            if idle >= MAX_IDLE_PAGES:
                raise NotYetError(f"REST paging of {symbol} does not advance: {idle} pages in a row brought "
                                   f"none of the missing ids (since {since}, last {page.last})")
            with self._state.lock:
                seq = self._state.symbols[symbol].seq
                still_open = seq.still_missing(job.lo, job.hi)
                # Continue from just before the first id still missing, not from `last`: a page cut
                # inside a burst sharing one timestamp would make an exclusive `since` skip the rest.
                resume = seq.since(still_open[0]) if still_open else 0
            if not still_open:
                logger.info("%s: %s trade ids %s..%d filled by REST", self.name, symbol,
                            "(first after the anchor)" if job.lo is None else job.lo, job.hi)
                return
            if not page.trades:
                raise NotYetError(f"REST has no {symbol} trades after {since} yet (need ids "
                                   f"{'the first after the anchor' if job.lo is None else job.lo}..{job.hi})")
            following = resume if resume > int(since) else int(page.last)
            if following <= int(since):
                raise NotYetError(f"REST paging of {symbol} does not advance past {since}")
            since = str(following)
        with self._state.lock:  # let the other symbols go first
            state = self._state.symbols.pop(symbol)
            self._state.symbols[symbol] = state
            if job.hi is None:
                state.seq.tail_check = True

    def _progress_mark(self, symbol: str) -> tuple[Any, ...]:
        """What a page that places a new id changes (caller holds the lock)."""
        state = self._state.symbols.get(symbol)
        if state is None:
            return ()
        return state.seq.pending, state.seq.max_seen, tuple(state.seq.open_holes())
