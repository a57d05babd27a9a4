"""The live stream's id frontier and holes (IdSequence, pure): Hypothesis properties against a
plain model — the set of ids handed over — and the range rules it must agree with."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from kraken_hist.core.timeutils import floor_minute, to_unix_ns
from kraken_hist.ingest.live.ids import EARLY, NEW, OLD, OPENED, REST_MARGIN_NS, IdSequence
from kraken_hist.rules import ranges

UTC = timezone.utc
T0 = datetime(2025, 6, 7, 8, 9, 10, tzinfo=UTC)


@st.composite
def timed_ids(draw: st.DrawFn, first: int = 1) -> dict[int, datetime]:
    """Ids first..first+n-1 with times ascending (trades may share a timestamp)."""
    n = draw(st.integers(min_value=1, max_value=60))
    steps = draw(st.lists(st.integers(min_value=0, max_value=3), min_size=n, max_size=n))
    times, when = {}, T0
    for offset, step in enumerate(steps):
        when += timedelta(seconds=step)
        times[first + offset] = when
    return times


@st.composite
def deliveries(draw: st.DrawFn, ids: list[int]) -> list[int]:
    """Every id at least once, in any order, some more than once (replays, REST/WS overlap)."""
    repeats = draw(st.lists(st.sampled_from(ids), max_size=len(ids))) if ids else []
    return draw(st.permutations(ids + repeats))


def check_invariants(seq: IdSequence, base: int, handed: set[int]) -> None:
    """Holes are exactly the ids missing between the resume point and the newest id; the
    frontier is the last id before the first of them; the job REST gets is the lowest hole."""
    seen = sorted(handed | {base})
    assert seq.max_seen == seen[-1]
    assert seq.open_holes() == ranges.missing_id_runs(seen)
    assert seq.missing_ids() == sum(hi - lo + 1 for lo, hi in ranges.missing_id_runs(seen))
    assert seq.frontier == (seq.holes[0].lo - 1 if seq.holes else seen[-1])
    job = seq.copy().next_fetch()
    if seq.holes:
        assert job is not None and (job.lo, job.hi) == (seq.holes[0].lo, seq.holes[0].hi)


@settings(max_examples=300, deadline=None)
@given(times=timed_ids(first=101), data=st.data())
def test_a_resumed_record_hands_over_every_id_once_whatever_the_order(times: dict[int, datetime],
                                                                       data: st.DataObject) -> None:
    base, base_time = 100, T0 - timedelta(seconds=1)
    seq = IdSequence.resume(base, base_time)
    order = data.draw(deliveries(list(times)), label="delivery order")
    old = data.draw(st.lists(st.integers(min_value=1, max_value=base), max_size=5), label="ids stored before")
    handed: set[int] = set()
    for trade_id in old + order:
        top = max(handed | {base})
        verdict = seq.accept(trade_id, times.get(trade_id, base_time))
        if trade_id <= base or trade_id in handed:
            assert verdict == OLD
        else:
            assert verdict == (OPENED if trade_id > top + 1 else NEW)
            handed.add(trade_id)
        check_invariants(seq, base, handed)
    assert handed == set(times) and seq.holes == [] and seq.frontier == max(times)
    assert seq.frontier_time == times[max(times)] and seq.covered_from == base_time


@settings(max_examples=300, deadline=None)
@given(times=timed_ids(), data=st.data())
def test_a_hole_is_fetched_from_just_before_it_and_a_copy_is_independent(times: dict[int, datetime],
                                                                          data: st.DataObject) -> None:
    seq = IdSequence.resume(0, T0 - timedelta(seconds=1))
    order = data.draw(deliveries(list(times)), label="delivery order")
    cut = data.draw(st.integers(min_value=0, max_value=len(order)), label="delivered so far")
    for trade_id in order[:cut]:
        seq.accept(trade_id, times[trade_id])
    twin, twin_holes, twin_top = seq.copy(), seq.open_holes(), seq.max_seen
    for hole in seq.holes:  # REST starts before the trade just below the hole, margin included
        below = times.get(hole.lo - 1, T0 - timedelta(seconds=1))  # type: ignore[operator]
        assert hole.after == below and seq.since(hole) == to_unix_ns(below) - REST_MARGIN_NS
    for trade_id in order[cut:]:
        seq.accept(trade_id, times[trade_id])
    assert seq.holes == [] and seq.frontier == max(times)
    assert twin.open_holes() == twin_holes and twin.max_seen == twin_top  # the copy did not move with it


@settings(max_examples=300, deadline=None)
@given(times=timed_ids(), data=st.data())
def test_after_an_anchor_the_record_is_every_id_at_or_after_it_once(times: dict[int, datetime],
                                                                     data: st.DataObject) -> None:
    """An archive ends at the anchor: trades before it are never handed over; live trades after it
    are, in any order; REST pages from the anchor fix where the record starts."""
    ids = list(times)
    anchor = times[data.draw(st.sampled_from(ids), label="anchor at the time of")]
    ours = [i for i in ids if times[i] >= anchor]
    seq = IdSequence.after(anchor)
    assert seq.frontier is None and seq.tail_check and seq.covered_from == anchor
    live = data.draw(deliveries(ids), label="live frames (snapshot trades before the anchor too)")
    live = live[:data.draw(st.integers(min_value=0, max_value=len(live)), label="frames before REST answers")]
    handed: list[int] = []
    for trade_id in live:
        verdict = seq.accept(trade_id, times[trade_id])
        if verdict >= NEW:
            handed.append(trade_id)
        assert (verdict == EARLY) == (times[trade_id] < anchor and seq.pending)
        assert seq.frontier is None  # nothing written down until REST says where the record starts
    job = seq.next_fetch()
    assert job is not None and job.lo is None and job.since == to_unix_ns(anchor) - 1  # nothing older asked
    for trade_id in ours:  # REST from the anchor: trades at/after it, in id order
        if seq.accept(trade_id, times[trade_id], fixes_start=True) >= NEW:
            handed.append(trade_id)
    assert sorted(handed) == ours and len(handed) == len(set(handed))  # each id of the record once
    assert not seq.pending and seq.holes == [] and seq.frontier == ids[-1]


@settings(max_examples=200, deadline=None)
@given(times=timed_ids(first=500), data=st.data())
def test_a_fresh_record_starts_at_the_first_trade_of_its_first_minute(times: dict[int, datetime],
                                                                      data: st.DataObject) -> None:
    ids = list(times)
    first_live = data.draw(st.sampled_from(ids), label="first live trade")
    minute = floor_minute(times[first_live])
    seq = IdSequence()
    assert seq.accept(first_live, times[first_live]) == OPENED
    assert seq.covered_from == minute and seq.open_holes() == [(None, first_live - 1)]
    job = seq.next_fetch()
    assert job is not None and job.lo is None and job.since == seq.origin == to_unix_ns(minute) - 1
    handed = [first_live]
    for trade_id in [i for i in ids if times[i] >= minute]:  # REST from the minute's start
        if seq.accept(trade_id, times[trade_id], fixes_start=True) >= NEW:
            handed.append(trade_id)
    assert sorted(handed) == [i for i in ids if times[i] >= minute]  # the minute whole, each id once
    assert not seq.pending and seq.holes == [] and seq.frontier == ids[-1]
    without_rest = IdSequence(exact=False)  # nothing could fetch the minute: the record starts here
    assert without_rest.accept(first_live, times[first_live]) == NEW and without_rest.frontier == first_live
