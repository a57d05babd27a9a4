"""Continuity of REST Trades pages: which trades of a page to take, where the next page starts,
what time range the page proves complete. A pure state machine (no I/O, no clock, no logging):
the backfill's loop fetches pages and hands them to :meth:`TradesPaging.accept`.

The rules (KRAKEN.md): ``since = last`` exactly as received; each page must continue at the
previous page's last trade id + 1 (``expected``). Overlap is dropped by id. A page that starts
past ``expected`` is a break: the cursor steps back (:data:`REPAIR_STEPS`) until a page holds
``expected`` again — or holds the id before it and not ``expected``: Kraken's own sequence has
a hole there (:attr:`StepBack.hole`). A page whose ids jump inside is cut before the jump and
the next page starts just before its last kept trade, so the break goes through the same
repair. A refused trade (an impossible value, ``bounds``) counts as seen: its id is no hole.

Coverage only claims what is known complete: a page proves ``[start, time of its last trade)``
(trades sharing that last timestamp may continue on the next page), or up to ``until`` when a
trade at or after ``until`` was seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from kraken_hist.core.bounds import unix_seconds_problem
from kraken_hist.core.errors import ExchangeTransientError
from kraken_hist.core.timeutils import floor_minute, since_cursor, to_unix_ns
from kraken_hist.core.types import HistoricalTrade, Refused
from kraken_hist.kraken.rest_parsing import TradesPage

#: How far the cursor steps back (ns) to repair a break in the trade ids, tried in order.
REPAIR_STEPS = (1, 1_000, 1_000_000, 1_000_000_000, 60_000_000_000)
#: Pages in a row that bring no new trade id before paging is given up as not advancing (a
#: cursor that moves a nanosecond a page over the same trades would otherwise loop forever).
MAX_IDLE_PAGES = 3
#: The cursor of a pair's first trade.
FIRST_CURSOR = "0"
_MAX_TRADE_ID = 2**63 - 1


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
class StepBack:
    """What a page fetched after stepping the cursor back says about a break.

    ``enough``: the page reaches back to ``expected`` (or to the id before it), so it replaces
    the page with the break; otherwise step further back. ``hole``: ids ``lo..hi`` Kraken itself
    does not have (it served the id before them and not them)."""

    enough: bool
    hole: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PageStep:
    """What to do with one page: yield ``page`` (when not None), record ``refused_only`` (a page
    of refused trades only: nothing else to store), then raise ``error`` or stop when
    ``finished``. ``jump`` (last id before, first id after) and ``bad_cursor`` (why Kraken's
    ``last`` was not used) are for the log; ``caught_up`` names why paging ended."""

    page: BackfillPage | None = None
    refused_only: tuple[Refused, ...] = ()
    finished: bool = False
    caught_up: str | None = None
    error: ExchangeTransientError | None = None
    jump: tuple[int, int] | None = None
    bad_cursor: str | None = None


class TradesPaging:
    """The paging state of one run: the cursor to fetch next, the id the next page must start
    at (``expected``; None: not known), where the next page's proven coverage starts, and how
    many pages in a row brought no new id.

    `cursor` is Kraken's ``last`` as received (``"0"``: from the pair's first trade);
    `cover_start` where the first page's coverage starts (None: its first trade's time, or the
    start of that trade's minute from ``"0"``); `until`: trades at or after it are not taken.
    """

    __slots__ = ("symbol", "cursor", "expected", "cover_start", "until", "page_size", "idle")

    def __init__(self, symbol: str, cursor: str, *, expected: int | None = None,
                 cover_start: datetime | None = None, until: datetime | None = None,
                 page_size: int = 1000) -> None:
        self.symbol = symbol
        self.cursor = cursor
        self.expected = expected
        self.cover_start = cover_start
        self.until = until
        self.page_size = page_size
        self.idle = 0

    @classmethod
    def since(cls, symbol: str, since: str | int | datetime | None, *, after_id: int | None = None,
              covered_from: datetime | None = None, until: datetime | None = None,
              page_size: int = 1000) -> "TradesPaging":
        """Paging from `since`: a cursor as received, a datetime (trades at or after it; coverage
        then starts there unless `covered_from` says otherwise) or None (the first trade).
        `after_id` is the id of the trade just before `since` when known."""
        if isinstance(since, datetime):
            covered_from = covered_from if covered_from is not None else since
            cursor = since_cursor(since)
        elif since is None:
            cursor = FIRST_CURSOR
        else:
            cursor = str(since)
        return cls(symbol, cursor, expected=after_id + 1 if after_id is not None else None,
                   cover_start=covered_from, until=until, page_size=page_size)

    # --- a break at the start of a page ----------------------------------------------------

    def break_at(self, page: TradesPage) -> int | None:
        """The first id `page` holds past ``expected`` when it does not start at ``expected``
        (a break to repair by stepping back); None when it continues (or cannot be checked)."""
        if self.expected is None:
            return None
        first = page.first_seen_id(self.expected)
        return None if first is None or first == self.expected else first

    def step_back_cursors(self) -> list[str]:
        """The cursors to refetch from, in order, to repair a break after the current cursor."""
        cursor = int(self.cursor)
        return [str(max(0, cursor - step)) for step in REPAIR_STEPS]

    def judge_step_back(self, page: TradesPage) -> StepBack:
        """Whether `page` (fetched from a stepped-back cursor) reaches back to ``expected``."""
        expected = self.expected
        assert expected is not None
        earliest = page.first_seen_id()
        if earliest is None or earliest > expected:
            return StepBack(enough=False)  # not far enough back yet
        following = page.first_seen_id(expected)
        if following is not None and following != expected:
            return StepBack(enough=True, hole=(expected, following - 1))
        return StepBack(enough=True)

    def unrepaired(self, first: int) -> ExchangeTransientError:
        """The error when no step back recovered the ids before `first`."""
        assert self.expected is not None
        return ExchangeTransientError(
            f"{self.symbol}: trade ids jump from {self.expected - 1} to {first} after cursor {self.cursor} "
            "and stepping back did not recover the missing trades")

    # --- one page --------------------------------------------------------------------------

    def accept(self, page: TradesPage, *, now: datetime, repaired: int = 0) -> PageStep:
        """Take `page` (fetched from :attr:`cursor`, or from a stepped-back cursor that repaired
        a break) and move to the next cursor; `now` bounds a possible ``last`` cursor."""
        expected, cursor = self.expected, self.cursor
        trades = list(page.trades) if expected is None else [t for t in page.trades if t.trade_id >= expected]
        trades, refused, jump = contiguous_part(trades, page.refused, expected)
        if not trades:
            return self._nothing_new(page, refused, jump, now)
        self.idle = 0
        until = self.until
        reached_until = False
        bad_cursor = None
        if until is not None and trades[-1].time >= until:
            trades = [t for t in trades if t.time < until]
            reached_until = True
        if reached_until:
            next_cursor = since_cursor(until)  # type: ignore[arg-type]
            cover_end = until
            refused = tuple(r for r in refused if r.time is None or r.time < until)
        elif jump is not None:
            # Ids jump inside the page: it is cut there, as if the page ended with the last trade
            # before the jump, and the next page continues from just before that trade's time:
            # the break between pages then goes through the same repair (step back and refetch;
            # a hole Kraken itself has stays a gap)
            next_cursor = str(max(int(cursor) + 1, to_unix_ns(trades[-1].time) - 1))
            cover_end = trades[-1].time
        else:
            next_cursor, bad_cursor = possible_cursor(page.last, trades[-1].time, now)
            cover_end = trades[-1].time
        cover_start = self.cover_start
        if cover_start is None and trades:
            # from the pair's first trade ("0"): nothing traded earlier in its minute either
            cover_start = floor_minute(trades[0].time) if cursor == FIRST_CURSOR else trades[0].time
        covered = (cover_start, cover_end) if cover_start is not None and cover_end > cover_start else None
        checked = BackfillPage(symbol=self.symbol, trades=trades, last=next_cursor, covered=covered,
                               reached_until=reached_until, repaired=repaired, refused=refused)
        jump = None if reached_until else jump  # (only a jump the page was cut at is news)
        if reached_until:
            return PageStep(page=checked, finished=True, jump=jump, bad_cursor=bad_cursor)
        if int(next_cursor) <= int(cursor):
            return PageStep(page=checked, jump=jump, bad_cursor=bad_cursor, error=ExchangeTransientError(
                f"{self.symbol}: Trades cursor did not advance past {cursor} (last={page.last}) "
                f"although the page held trades up to id {trades[-1].trade_id}"))
        self.expected = max([trades[-1].trade_id] + [r.trade_id for r in refused]) + 1  # type: ignore[operator]
        self.cover_start = cover_end
        self.cursor = next_cursor
        return PageStep(page=checked, jump=jump, bad_cursor=bad_cursor)

    def _nothing_new(self, page: TradesPage, refused: tuple[Refused, ...], jump: tuple[int, int] | None,
                     now: datetime) -> PageStep:
        """A page without a new trade: caught up, refused trades only, or overlap only."""
        cursor = self.cursor
        if not (page.trades or page.refused) or int(page.last) <= int(cursor):
            return PageStep(finished=True, caught_up=f"at cursor {cursor}")
        record: tuple[Refused, ...] = ()
        if refused:  # a page of refused trades only: seen all the same
            until = self.until
            if until is None or refused[0].time is None or refused[0].time < until:
                record = refused
            self.expected = max(r.trade_id for r in refused) + 1  # type: ignore[type-var]
            self.idle = 0
        elif len(page.trades) < self.page_size:
            return PageStep(finished=True, caught_up=f"at cursor {cursor} (overlap only)")
        else:
            self.idle += 1  # a full page of overlap only: move on, but not for ever
            if self.idle >= MAX_IDLE_PAGES:
                return PageStep(error=ExchangeTransientError(
                    f"{self.symbol}: Trades paging does not advance: {self.idle} pages in a row after cursor "
                    f"{cursor} brought no new trade (last={page.last})"))
        if jump is None:  # (after a jump: the same cursor again, and the break is repaired)
            next_cursor, problem = possible_cursor(page.last, None, now)
            if next_cursor is None:
                return PageStep(refused_only=record, error=ExchangeTransientError(
                    f"{self.symbol}: Trades page refused: {problem}"))
            self.cursor = next_cursor
        return PageStep(refused_only=record)


def contiguous_part(
    trades: list[HistoricalTrade], refused: Sequence[Refused], expected: int | None
) -> tuple[list[HistoricalTrade], tuple[Refused, ...], tuple[int, int] | None]:
    """The part of a page whose ids run on without a gap (refused trades count as seen), from
    its first id at least `expected`; and the jump (last id before it, first id after it) where
    the page stops being contiguous, or None."""
    valid = [r for r in refused if r.trade_id is not None and (expected is None or r.trade_id >= expected)
             and 0 < r.trade_id <= _MAX_TRADE_ID]
    ids = sorted([t.trade_id for t in trades] + [r.trade_id for r in valid])  # type: ignore[misc]
    jump = next(((a, b) for a, b in zip(ids, ids[1:]) if b > a + 1), None)
    if jump is None:
        return trades, tuple(valid), None
    return ([t for t in trades if t.trade_id <= jump[0]],
            tuple(r for r in valid if r.trade_id <= jump[0]), jump)  # type: ignore[operator]


def possible_cursor(last: str, fallback: datetime | None, now: datetime) -> tuple[str | None, str | None]:
    """(cursor, problem): Kraken's ``last`` when it is a possible time at `now` (``bounds``);
    else a cursor just before `fallback` (the newest trade accepted from the page: trades
    sharing its time are fetched again and dropped by id), or None when there is none — with
    the problem that ruled ``last`` out."""
    problem = unix_seconds_problem(Decimal(int(last)).scaleb(-9), now, "last cursor")
    if problem is None:
        return last, None
    if fallback is None:
        return None, problem
    return str(to_unix_ns(fallback) - 1), problem
