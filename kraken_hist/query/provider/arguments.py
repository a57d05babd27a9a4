"""The arguments every read of the query layer takes: times and intervals as given by a caller."""

from __future__ import annotations

from datetime import datetime

from kraken_hist.core.intervals import Interval
from kraken_hist.core.timeutils import check_aware, parse_time

TimeArg = datetime | str | None
IntervalArg = Interval | int | str


def time_arg(value: TimeArg, field: str) -> datetime | None:
    """A time argument as an aware datetime: ISO text parsed, naive datetimes refused."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value)
    return check_aware(value, field)
