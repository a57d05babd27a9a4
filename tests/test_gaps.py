"""Pure interval arithmetic of gap management: table cases and invariants against a brute-force twin."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from kraken_hist.rules import ranges as gaps
from kraken_hist.gaps import plan
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.core.types import DataGap, GapKind

UTC = timezone.utc
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def at(minutes):
    return T0 + timedelta(minutes=minutes)


def check_invariants(ranges):
    for start, end in ranges:
        assert start < end
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end < start  # disjoint and not touching


def points(ranges):
    """Brute-force model: the set of integer points a range list holds."""
    return {x for start, end in ranges for x in range(start, end)}


ranges_st = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=8)


@pytest.mark.parametrize(
    "given_, expected",
    [
        ([], []),
        ([(5, 5)], []),
        ([(3, 4), (1, 2)], [(1, 2), (3, 4)]),
        ([(1, 3), (3, 5)], [(1, 5)]),  # touching ranges merge
        ([(1, 10), (2, 3)], [(1, 10)]),
        ([(4, 2)], []),  # inverted = empty
    ],
)
def test_normalize(given_, expected):
    assert gaps.normalize(given_) == expected


@pytest.mark.parametrize(
    "base, holes, expected",
    [
        ([(0, 10)], [], [(0, 10)]),
        ([(0, 10)], [(0, 10)], []),
        ([(0, 10)], [(2, 3), (5, 7)], [(0, 2), (3, 5), (7, 10)]),
        ([(0, 10)], [(-5, 2), (8, 20)], [(2, 8)]),
        ([(0, 3), (5, 9)], [(2, 6)], [(0, 2), (6, 9)]),
        ([(0, 3)], [(3, 5)], [(0, 3)]),
    ],
)
def test_subtract(base, holes, expected):
    assert gaps.subtract(base, holes) == expected


def test_datetime_ranges_work_too():
    covered = [(at(0), at(10)), (at(20), at(30))]
    assert gaps.complement(covered, at(0), at(40)) == [(at(10), at(20)), (at(30), at(40))]
    assert gaps.total(gaps.complement(covered, at(0), at(40)), timedelta(0)) == timedelta(minutes=20)
    assert gaps.clip(covered, at(5), at(25)) == [(at(5), at(10)), (at(20), at(25))]


@settings(max_examples=300, deadline=None)
@given(ranges_st, ranges_st)
def test_set_operations_match_the_brute_force_model(a, b):
    for result, expected in (
        (gaps.normalize(a), points(a)),
        (gaps.union(a, b), points(a) | points(b)),
        (gaps.subtract(a, b), points(a) - points(b)),
        (gaps.intersect(a, b), points(a) & points(b)),
        (gaps.complement(a, 10, 50), set(range(10, 50)) - points(a)),
        (gaps.clip(a, 10, 50), points(a) & set(range(10, 50))),
    ):
        check_invariants(result)
        assert points(result) == expected


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(1, 200)))
def test_missing_id_runs_are_exactly_the_missing_ids(ids):
    ordered = sorted(ids)
    runs = gaps.missing_id_runs(ordered)
    missing = set(range(ordered[0], ordered[-1] + 1)) - ids if ordered else set()
    assert {i for first, last in runs for i in range(first, last + 1)} == missing
    assert runs == sorted(runs)


def test_missing_id_runs_refuses_unordered_ids():
    with pytest.raises(ValueError, match="ascending"):
        gaps.missing_id_runs([1, 3, 3])


def test_minute_runs_merge_consecutive_minutes():
    minutes = [at(5), at(1), at(2), at(2) + timedelta(seconds=30)]
    assert gaps.minute_runs(minutes) == [(at(1), at(3)), (at(5), at(6))]


def gap(kind, start, end):
    return DataGap(symbol="BTC/USD", kind=kind, start=start, end=end)


def test_ohlc_reach_is_the_720_newest_candles_including_the_unfinished_one():
    now = at(1000) + timedelta(seconds=12)
    assert plan.ohlc_reach_start(now) == at(1000 - 719)
    assert plan.within_ohlc_reach(gap(GapKind.TRADE_IDS, at(281), at(300)), now)
    assert not plan.within_ohlc_reach(gap(GapKind.TRADE_IDS, at(280) + timedelta(seconds=59), at(300)), now)


@pytest.mark.parametrize(
    "kind, start, unavailable, expected",
    [
        (GapKind.CANDLES, 0, False, FillMethod.REBUILD),
        (GapKind.CANDLES, 900, True, FillMethod.REBUILD),
        (GapKind.TRADE_IDS, 900, False, FillMethod.TRADES),  # trades restore ids, OHLC cannot
        (GapKind.UNCOVERED, 900, False, FillMethod.TRADES),
        (GapKind.TRADE_IDS, 900, True, FillMethod.OHLC),  # fresh, trades cannot be had
        (GapKind.UNCOVERED, 900, True, FillMethod.OHLC),
        (GapKind.TRADE_IDS, 0, True, FillMethod.TRADES),  # too old for OHLC: nothing else can
    ],
)
def test_choose_fill_method(kind, start, unavailable, expected):
    now = at(1000)
    assert plan.choose_fill_method(gap(kind, at(start), at(start + 30)), now, trades_unavailable=unavailable) is expected
