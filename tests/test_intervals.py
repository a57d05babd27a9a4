from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kraken_hist.core.intervals import INTERVAL_RELATIONS, STANDARD_INTERVALS, Interval

UTC = timezone.utc


@pytest.mark.parametrize(("text", "minutes"), [("1", 1), (5, 5), ("15m", 15), ("1h", 60), ("4h", 240), ("1d", 1440), ("1w", 10080), ("45", 45)])
def test_parse(text, minutes):
    assert Interval.parse(text).minutes == minutes


@pytest.mark.parametrize("bad", ["0", "-5", "1y", "abc", 0])
def test_parse_refuses_nonsense(bad):
    with pytest.raises(ValueError, match="interval"):
        Interval.parse(bad)


def test_standard_set_and_relations():
    assert [i.minutes for i in STANDARD_INTERVALS] == [1, 5, 15, 30, 60, 240, 1440, 10080]
    assert Interval(60).relation == "candles_1h" and Interval(1).relation == "candles"
    assert not Interval(45).is_stored
    assert set(INTERVAL_RELATIONS.values()) == {"candles", "candles_5m", "candles_15m", "candles_30m", "candles_1h", "candles_4h", "candles_1d", "candles_1w"}


def test_weeks_start_monday_utc():
    thursday = datetime(2024, 1, 4, 15, 30, tzinfo=UTC)
    assert Interval(10080).bucket_start(thursday) == datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
    assert Interval(10080).bucket_start(datetime(2024, 1, 1, tzinfo=UTC)) == datetime(2024, 1, 1, tzinfo=UTC)


def test_days_and_hours_align_to_utc():
    when = datetime(2024, 3, 5, 13, 47, 12, tzinfo=UTC)
    assert Interval(1440).bucket_start(when) == datetime(2024, 3, 5, tzinfo=UTC)
    assert Interval(240).bucket_start(when) == datetime(2024, 3, 5, 12, tzinfo=UTC)
    assert Interval(45).bucket_start(when) == datetime(2024, 3, 5, 13, 30, tzinfo=UTC)
    assert Interval(45).bucket_end(when) == datetime(2024, 3, 5, 14, 15, tzinfo=UTC)


@pytest.mark.parametrize(("minutes", "source"), [(3, 1), (10, 5), (45, 15), (120, 60), (720, 240), (2880, 1440), (20160, 10080), (7, 1)])
def test_arbitrary_intervals_come_from_the_largest_stored_divisor(minutes, source):
    assert Interval(minutes).source_interval().minutes == source


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        Interval(5).bucket_start(datetime(2024, 1, 1))


@given(minutes=st.sampled_from([1, 3, 5, 45, 60, 1440, 4320, 10080, 20160]),
       when=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)))
def test_the_first_bucket_at_or_after_a_time_is_the_nearest_bucket_start_not_before_it(minutes, when):
    interval = Interval(minutes)
    first = interval.first_bucket_at_or_after(when)
    assert first >= when > first - interval.delta
    assert interval.bucket_start(first) == first
