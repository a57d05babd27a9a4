"""The provider's reads in windows of time (``query.windows``) against the plain answer, with the
I/O replaced by a list of bucket times: whatever the holes, the first or last `limit` buckets
come out, and the first minute is asked only when a window comes back short."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from kraken_hist.core.intervals import Interval
from kraken_hist.core.types import HistoricalCandle
from kraken_hist.query.provider import windows
from kraken_hist.query.provider.candle_rows import fill_quiet

T0 = datetime(2025, 3, 3, tzinfo=timezone.utc)


class Store:
    """Buckets of one interval at the given offsets (in buckets from T0); counts the I/O."""

    def __init__(self, iv: Interval, offsets: set[int]) -> None:
        self.iv = iv
        self.times = sorted(T0 + o * iv.delta for o in offsets)
        self.reads = 0
        self.firsts = 0

    def candle(self, when: datetime) -> HistoricalCandle:
        one = 1
        return HistoricalCandle(symbol="BTC/USD", interval=self.iv.minutes, time=when, open=one, high=one, low=one,
                                close=one, volume=one, vwap=None, trades=1)

    def read(self, lo, hi, desc, limit):
        self.reads += 1
        found = [t for t in self.times if (lo is None or t >= lo) and (hi is None or t < hi)]
        found = found[::-1] if desc else found
        return [self.candle(t) for t in found[:limit]]

    def first(self):
        self.firsts += 1
        return self.times[0] if self.times else None


offsets = st.sets(st.integers(min_value=0, max_value=3000), max_size=120)
minutes = st.sampled_from([1, 5, 60, 3, 45])


@settings(max_examples=150, deadline=None)
@given(offsets, minutes, st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=3200),
       st.booleans())
def test_stored_windows_give_the_first_or_last_limit_buckets(offsets, minutes, limit, end, desc):
    store = Store(Interval(minutes), offsets)
    hi = T0 + end * store.iv.delta
    expected = store.read(None, hi, desc, limit)
    got = windows.read_stored_in_windows(store.read, store.first, store.iv, None, hi, desc, limit)
    assert [c.time for c in got] == [c.time for c in expected]
    lo = T0 + (end // 3) * store.iv.delta
    expected = store.read(lo, hi, desc, limit)
    assert [c.time for c in windows.read_stored_in_windows(store.read, store.first, store.iv, lo, hi, desc, limit)] \
        == [c.time for c in expected]


@settings(max_examples=150, deadline=None)
@given(offsets, minutes, st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=3200))
def test_latest_and_first_in_windows_equal_one_read(offsets, minutes, count, end):
    store = Store(Interval(minutes), offsets)
    hi = T0 + end * store.iv.delta
    latest = windows.read_latest_in_windows(store.read, store.first, store.iv, hi, count)
    assert [c.time for c in latest] == [c.time for c in store.read(None, hi, True, count)][::-1]
    first = windows.read_first_in_windows(store.read, store.iv, T0, hi, count)
    assert [c.time for c in first] == [c.time for c in store.read(T0, hi, False, count)]


def test_dense_data_takes_one_read_and_never_asks_for_the_first_minute():
    store = Store(Interval(5), set(range(2000)))
    hi = T0 + 2000 * store.iv.delta
    assert len(windows.read_latest_in_windows(store.read, store.first, store.iv, hi, 200)) == 200
    assert len(windows.read_stored_in_windows(store.read, store.first, store.iv, None, hi, True, 200)) == 200
    assert (store.reads, store.firsts) == (2, 0)


def test_quiet_fill_carries_the_previous_close_and_skips_what_precedes_any_price():
    store = Store(Interval(1), {2, 3, 7})
    got = fill_quiet(store.read(T0, T0 + timedelta(minutes=10), False, None), store.iv, T0,
                     T0 + timedelta(minutes=10), None, "BTC/USD")
    assert [(c.time.minute, c.trades) for c in got] == [(2, 1), (3, 1), (4, 0), (5, 0), (6, 0), (7, 1), (8, 0), (9, 0)]
