from datetime import datetime, timezone
from decimal import Decimal

import pytest

from kraken_hist.core.timeutils import from_unix_decimal, from_unix_ns, parse_rfc3339, parse_time, to_unix_ns

UTC = timezone.utc


def test_rest_float_time_is_read_from_its_text_to_the_microsecond():
    # 1790359841.1382287 as a binary float is 1790359841.13822865...; the text is exact.
    assert from_unix_decimal(Decimal("1790359841.1382287")) == datetime(2026, 9, 25, 18, 10, 41, 138228, tzinfo=UTC)
    assert from_unix_decimal("1381095255") == datetime(2013, 10, 6, 21, 34, 15, tzinfo=UTC)


def test_nanosecond_cursor_agrees_with_the_float_time_of_the_same_trade():
    assert from_unix_ns("1790359841138228746") == from_unix_decimal(Decimal("1790359841.1382287"))
    assert to_unix_ns(datetime(2026, 9, 25, 18, 10, 41, 138228, tzinfo=UTC)) == 1790359841138228000


def test_rfc3339_with_nanoseconds():
    assert parse_rfc3339("2026-09-10T17:44:43.105760475Z") == datetime(2026, 9, 10, 17, 44, 43, 105760, tzinfo=UTC)
    assert parse_rfc3339("2026-09-10T17:33:00.000000Z") == datetime(2026, 9, 10, 17, 33, tzinfo=UTC)
    assert parse_rfc3339("2026-09-10T17:33:00Z") == datetime(2026, 9, 10, 17, 33, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T12:30:00Z", datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
        ("2024-01-01T13:30:00+01:00", datetime(2024, 1, 1, 12, 30, tzinfo=UTC)),
        ("1704067200", datetime(2024, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text) == expected


def test_parse_time_says_what_it_wants():
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_time("yesterday")
