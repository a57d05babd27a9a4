"""The backfill's page continuity (TradesPaging, pure) and the loop around it, against a pure
model of Kraken's Trades paging: every id once, coverage equal to the span, holes reported."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import HealthCheck, given, settings, strategies as st

from kraken_hist.core.errors import ExchangeTransientError
from kraken_hist.core.timeutils import floor_minute, since_cursor, to_unix_ns
from kraken_hist.core.types import HistoricalTrade, Refused
from kraken_hist.ingest.backfill.fetch import page_through
from kraken_hist.ingest.backfill.pages import (
    MAX_IDLE_PAGES,
    REPAIR_STEPS,
    StepBack,
    TradesPaging,
    contiguous_part,
    possible_cursor,
)
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.rules import ranges

UTC = timezone.utc
SYMBOL = "BTC/USD"
T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def trade(trade_id: int, when: datetime) -> HistoricalTrade:
    return HistoricalTrade(symbol=SYMBOL, trade_id=trade_id, time=when, price=Decimal("100"), volume=Decimal("1"))


def page(trades: list[HistoricalTrade], last: str | None = None, refused: tuple[Refused, ...] = ()) -> TradesPage:
    return TradesPage(symbol=SYMBOL, trades=trades, last=last if last is not None else str(
        to_unix_ns(trades[-1].time) if trades else "0"), refused=refused)


# --- a pure model of Kraken -----------------------------------------------------------------

@st.composite
def histories(draw: st.DrawFn) -> list[HistoricalTrade]:
    """Ids 1..n, times ascending in steps of 0..100 ms, at most 5 trades sharing a timestamp; the
    newest trade alone at its time (trades sharing the newest page's last timestamp with nothing
    after them are not claimed by coverage, and the next run fetches them)."""
    n = draw(st.integers(min_value=2, max_value=120))
    steps = draw(st.lists(st.integers(min_value=0, max_value=100_000), min_size=n - 1, max_size=n - 1))
    out = [trade(1, T0)]
    same = 1
    for i, step in enumerate(steps, start=2):
        same = same + 1 if step == 0 else 1
        if same > 5 or i == n:
            step, same = max(step, 1), 1
        out.append(trade(i, out[-1].time + timedelta(microseconds=step)))
    return out


class Kraken:
    """Trades pages as Kraken serves them, hostile within what the backfill must survive: pages of
    `page_size` rows cut wherever that falls (inside bursts sharing a timestamp too), `since`
    sometimes inclusive with a few earlier trades repeated, ids Kraken never had (`absent`), and
    on the first answer some rows left out (`omit_once`, never its first row) while ``last``
    still names the page's end."""

    def __init__(self, history: list[HistoricalTrade], data: st.DataObject, page_size: int,
                 absent: set[int], omit_once: set[int], max_repeat: int = 3) -> None:
        self.present = [t for t in history if t.trade_id not in absent]
        self.max_repeat = max_repeat
        self.data, self.page_size, self.omit_once = data, page_size, omit_once
        self.calls = 0

    def __call__(self, since: str) -> TradesPage:
        self.calls += 1
        assert self.calls < 5_000, "paging does not end"
        cut = int(since)
        before = [t for t in self.present if to_unix_ns(t.time) <= cut]
        after = [t for t in self.present if to_unix_ns(t.time) > cut]
        repeat = self.data.draw(st.integers(min_value=0, max_value=self.max_repeat),
                                label="repeated earlier trades")
        rows = (before[-repeat:] if repeat else []) + after
        rows = rows[:self.page_size]  # a short page means "nothing more": pages are cut only when full
        last = str(to_unix_ns(rows[-1].time)) if rows else since
        if self.calls == 1 and rows:
            rows = rows[:1] + [t for t in rows[1:] if t.trade_id not in self.omit_once]
        return TradesPage(symbol=SYMBOL, trades=rows, last=last)


class Holes(logging.Handler):
    """The holes the loop logs ("Kraken skipped trade ids lo..hi")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.runs: list[tuple[int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(f"{SYMBOL}: Kraken skipped trade ids"):
            lo, hi = record.args[1:3]  # type: ignore[index]
            self.runs.append((lo, hi))


def run(paging: TradesPaging, kraken: Kraken) -> tuple[list[int], list[tuple[datetime, datetime]], list[tuple[int, int]]]:
    """(ids accepted in order, coverage claimed, holes reported) of a whole paging run."""
    holes = Holes()
    logger = logging.getLogger("kraken_hist.ingest.backfill")
    logger.addHandler(holes)
    try:
        pages = list(page_through(paging, kraken, record_refused=lambda refused: None, clock=lambda: NOW))
    finally:
        logger.removeHandler(holes)
    ids = [t.trade_id for p in pages for t in p.trades]
    return ids, [p.covered for p in pages if p.covered is not None], holes.runs


def interior_runs(history: list[HistoricalTrade]) -> st.SearchStrategy[set[int]]:
    """Ids strictly inside the history (the first and last trade are always there)."""
    if len(history) < 3:
        return st.just(set())
    return st.sets(st.integers(min_value=2, max_value=len(history) - 1), max_size=len(history) // 3)


#: Page sizes with room for progress: a page may repeat up to 3 earlier trades and a repaired
#: break steps back across a burst of up to 5 trades sharing a timestamp, so a page of fewer than
#: 3 + 2 * 5 + 1 rows can hold nothing past its cursor's timestamp (the backfill then stops with
#: a transient error, as it always has; Kraken's pages hold 1,000 trades).
PAGE_SIZES = st.integers(min_value=14, max_value=40)
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(history=histories(), page_size=PAGE_SIZES, data=st.data())
def test_from_the_first_trade_every_id_once_and_coverage_the_whole_span(
        history: list[HistoricalTrade], page_size: int, data: st.DataObject) -> None:
    absent = data.draw(interior_runs(history), label="ids Kraken never had")
    # Known limit, not modelled: a row left out right next to an id Kraken never had, under a
    # ``last`` naming the page's end, stops the run with a transient error (it resumes later).
    omit = {i for i in data.draw(interior_runs(history), label="ids left out of the first answer")
            if not {i - 1, i, i + 1} & absent}
    kraken = Kraken(history, data, page_size, absent, omit)
    ids, covered, holes = run(TradesPaging.since(SYMBOL, None, page_size=page_size), kraken)
    assert ids == [t.trade_id for t in history if t.trade_id not in absent]  # every id once, in order
    assert holes == [(lo, hi - 1) for lo, hi in ranges.number_runs(absent)]  # each hole reported once
    span = (floor_minute(history[0].time), history[-1].time)
    assert ranges.normalize(covered) == [span]
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # each page continues the last


@SLOW
@given(history=histories(), page_size=PAGE_SIZES, data=st.data())
def test_a_window_takes_exactly_its_trades_and_covers_exactly_itself(
        history: list[HistoricalTrade], page_size: int, data: st.DataObject) -> None:
    first = history[0].time - timedelta(milliseconds=1)
    span_us = int((history[-1].time - first).total_seconds() * 1e6) + 2_000
    lo_us = data.draw(st.integers(min_value=0, max_value=span_us - 1), label="since")
    hi_us = data.draw(st.integers(min_value=lo_us + 1, max_value=span_us), label="until")
    since, until = first + timedelta(microseconds=lo_us), first + timedelta(microseconds=hi_us)
    # (no earlier trades repeated: with no id known before `since`, nothing tells them apart)
    kraken = Kraken(history, data, page_size, set(), set(), max_repeat=0)
    ids, covered, holes = run(TradesPaging.since(SYMBOL, since, until=until, page_size=page_size), kraken)
    inside = [t for t in history if since <= t.time < until]
    assert ids == [t.trade_id for t in inside] and holes == []
    end = until if history[-1].time >= until else history[-1].time
    assert ranges.normalize(covered) == ([(since, end)] if end > since else [])


@SLOW
@given(history=histories(), page_size=PAGE_SIZES, data=st.data())
def test_resuming_after_a_known_id_continues_exactly_there(
        history: list[HistoricalTrade], page_size: int, data: st.DataObject) -> None:
    stop = data.draw(st.integers(min_value=1, max_value=len(history) - 1), label="ids already stored")
    done = history[stop - 1]
    kraken = Kraken(history, data, page_size, set(), set())
    paging = TradesPaging.since(SYMBOL, str(to_unix_ns(done.time)), after_id=done.trade_id, covered_from=done.time,
                                page_size=page_size)
    ids, covered, _ = run(paging, kraken)
    assert ids == list(range(stop + 1, len(history) + 1))
    assert ranges.normalize(covered) == ([(done.time, history[-1].time)] if history[-1].time > done.time else [])


# --- single decisions -----------------------------------------------------------------------

def test_a_page_that_starts_past_the_expected_id_is_a_break_and_steps_back_in_order() -> None:
    history = [trade(i, T0 + timedelta(seconds=i)) for i in range(1, 8)]
    paging = TradesPaging(SYMBOL, "5000", expected=4)
    assert paging.break_at(page(history[3:])) is None  # starts at 4
    assert paging.break_at(page(history[1:])) is None  # overlap: 4 is there
    assert paging.break_at(page(history[5:])) == 6
    assert paging.break_at(page([])) is None  # nothing to check: caught up
    assert paging.step_back_cursors() == [str(max(0, 5000 - step)) for step in REPAIR_STEPS]
    assert paging.judge_step_back(page(history[4:])) == StepBack(enough=False)
    assert paging.judge_step_back(page(history[2:])) == StepBack(enough=True)
    assert paging.judge_step_back(page(history[2:3] + history[5:])) == StepBack(enough=True, hole=(4, 5))
    assert "jump from 3 to 6" in str(paging.unrepaired(6))


def test_a_page_jumping_inside_is_cut_and_continues_just_before_its_last_kept_trade() -> None:
    history = [trade(i, T0 + timedelta(seconds=i)) for i in (1, 2, 3, 7, 8)]
    paging = TradesPaging(SYMBOL, "0")
    step = paging.accept(page(history), now=NOW)
    assert step.page is not None and [t.trade_id for t in step.page.trades] == [1, 2, 3]
    assert step.jump == (3, 7) and paging.expected == 4
    assert paging.cursor == step.page.last == str(to_unix_ns(history[2].time) - 1)
    assert step.page.covered == (floor_minute(history[0].time), history[2].time)


def test_overlap_only_pages_end_paging_or_fail_after_max_idle_pages() -> None:
    history = [trade(i, T0 + timedelta(seconds=i)) for i in range(1, 11)]
    short = TradesPaging(SYMBOL, "5", expected=11, page_size=20)
    assert short.accept(page(history, last="6"), now=NOW).caught_up == "at cursor 5 (overlap only)"
    start = to_unix_ns(history[-1].time)
    full = TradesPaging(SYMBOL, str(start), expected=11, page_size=10)
    steps = [full.accept(page(history, last=str(start + 1 + n)), now=NOW) for n in range(MAX_IDLE_PAGES)]
    assert [s.error is None for s in steps] == [True] * (MAX_IDLE_PAGES - 1) + [False]
    assert "paging does not advance" in str(steps[-1].error)
    done = TradesPaging(SYMBOL, "5", expected=11).accept(page([], last="5"), now=NOW)
    assert done.finished and done.caught_up == "at cursor 5"


def test_refused_trades_count_as_seen_and_a_page_of_them_only_is_recorded() -> None:
    history = [trade(i, T0 + timedelta(seconds=i)) for i in range(1, 6)]
    refused = (Refused(3, "price Infinity", history[2].time),)
    kept, seen, jump = contiguous_part([t for t in history if t.trade_id != 3], refused, 1)
    assert [t.trade_id for t in kept] == [1, 2, 4, 5] and seen == refused and jump is None
    paging = TradesPaging(SYMBOL, "5", expected=3)
    step = paging.accept(page([], last=str(to_unix_ns(history[2].time)), refused=refused), now=NOW)
    assert step.refused_only == refused and step.page is None and not step.finished
    assert paging.expected == 4 and paging.cursor == str(to_unix_ns(history[2].time))


def test_an_impossible_last_cursor_is_replaced_or_refused() -> None:
    far = str(4_102_444_800 * 10**9)  # 2100-01-01
    cursor, problem = possible_cursor(far, None, NOW)
    assert possible_cursor(far, T0, NOW) == (str(to_unix_ns(T0) - 1), problem)
    assert cursor is None and problem is not None and "is after now" in problem
    assert possible_cursor(str(to_unix_ns(T0)), None, NOW) == (str(to_unix_ns(T0)), None)
    paging = TradesPaging(SYMBOL, "0")
    step = paging.accept(page([], last=far, refused=(Refused(1, "volume -1", T0),)), now=NOW)
    assert step.refused_only and isinstance(step.error, ExchangeTransientError)


def test_a_trade_at_or_after_until_ends_paging_with_coverage_up_to_until() -> None:
    history = [trade(i, T0 + timedelta(seconds=i)) for i in range(1, 6)]
    until = history[3].time
    paging = TradesPaging.since(SYMBOL, T0, until=until)
    assert paging.cursor == since_cursor(T0)
    step = paging.accept(page(history), now=NOW)
    assert step.finished and step.page is not None and step.page.reached_until
    assert [t.trade_id for t in step.page.trades] == [1, 2, 3] and step.page.covered == (T0, until)
    assert step.page.last == since_cursor(until)
