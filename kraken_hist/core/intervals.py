"""Candle intervals in whole minutes, and bucket arithmetic that matches the stored relations.

Buckets are aligned to the epoch for minutes and hours, to 00:00 UTC for days, and weeks
start Monday 00:00 UTC (the TradingView convention; the epoch itself was a Thursday).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from kraken_hist.core.timeutils import EPOCH, check_aware

#: Monday 1970-01-05 00:00 UTC: the origin of weekly buckets.
WEEK_ORIGIN = EPOCH + timedelta(days=4)

#: The widest interval a candle may have: 100 years of minutes (wider ones are no chart and
#: their bucket arithmetic leaves the range a datetime holds).
MAX_INTERVAL_MINUTES = 100 * 366 * 1440

#: Stored relation for each standard interval (minutes → table or continuous aggregate).
INTERVAL_RELATIONS: dict[int, str] = {
    1: "candles",
    5: "candles_5m",
    15: "candles_15m",
    30: "candles_30m",
    60: "candles_1h",
    240: "candles_4h",
    1440: "candles_1d",
    10080: "candles_1w",
}

#: The source each higher relation is refreshed from (hierarchical refresh on plain PostgreSQL).
REFRESH_PARENT: dict[int, int] = {5: 1, 15: 5, 30: 15, 60: 30, 240: 60, 1440: 240, 10080: 1440}

_UNITS = {"m": 1, "min": 1, "h": 60, "d": 1440, "w": 10080}
_TEXT = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    """A candle width in whole minutes (the standard set or any positive multiple of a minute)."""

    minutes: int

    def __post_init__(self) -> None:
        if not isinstance(self.minutes, int) or isinstance(self.minutes, bool) or self.minutes < 1:
            raise ValueError(f"interval must be a positive whole number of minutes, got {self.minutes!r}")
        if self.minutes > MAX_INTERVAL_MINUTES:
            raise ValueError(f"interval of {self.minutes} minutes is wider than {MAX_INTERVAL_MINUTES} (100 years)")

    @classmethod
    def parse(cls, value: "Interval | int | str") -> "Interval":
        """Accept 60, "60", "1h", "15m", "1d", "1w"."""
        if isinstance(value, Interval):
            return value
        if isinstance(value, int):
            return cls(value)
        match = _TEXT.match(str(value))
        if match is not None and (match.group(2) == "M" or match.group(2).lower() in ("mo", "mon", "month", "months")):
            # "1M" is a month to ccxt and pandas, a minute to a lower-case reading: refused, never guessed
            raise ValueError(f"interval {value!r} is ambiguous or a month: months are not a candle interval here; "
                             f"use {match.group(1)}m for minutes, or 1d, 1w, 4w")
        unit = match.group(2).lower() if match else None
        if match is None or (unit and unit not in _UNITS):
            raise ValueError(f"cannot read interval {value!r}: use minutes (60) or 15m, 1h, 4h, 1d, 1w")
        return cls(int(match.group(1)) * _UNITS.get(unit or "m", 1))

    @property
    def delta(self) -> timedelta:
        return timedelta(minutes=self.minutes)

    @property
    def is_stored(self) -> bool:
        return self.minutes in INTERVAL_RELATIONS

    @property
    def relation(self) -> str:
        """Name of the stored relation; KeyError for intervals computed on the fly."""
        return INTERVAL_RELATIONS[self.minutes]

    @property
    def origin(self) -> datetime:
        """Alignment origin: Monday for whole weeks, the epoch otherwise."""
        return WEEK_ORIGIN if self.minutes % 10080 == 0 else EPOCH

    def bucket_start(self, when: datetime) -> datetime:
        """Start of the bucket containing `when`."""
        offset = check_aware(when) - self.origin
        steps = offset // self.delta
        return self.origin + steps * self.delta

    def bucket_end(self, when: datetime) -> datetime:
        """End (exclusive) of the bucket containing `when`."""
        return self.bucket_start(when) + self.delta

    def first_bucket_at_or_after(self, when: datetime) -> datetime:
        """Start of the first bucket that begins at or after `when` (a range's first whole bucket)."""
        start = self.bucket_start(when)
        return start if start == when else start + self.delta

    def source_interval(self) -> "Interval":
        """Largest stored interval that divides this one (its buckets nest exactly inside ours)."""
        for minutes in sorted(INTERVAL_RELATIONS, reverse=True):
            if self.minutes % minutes == 0:
                return Interval(minutes)
        return Interval(1)

    def label(self) -> str:
        for unit, size in (("w", 10080), ("d", 1440), ("h", 60)):
            if self.minutes % size == 0:
                return f"{self.minutes // size}{unit}"
        return f"{self.minutes}m"

    def __str__(self) -> str:
        return self.label()


STANDARD_INTERVALS: tuple[Interval, ...] = tuple(Interval(m) for m in INTERVAL_RELATIONS)
