"""UTC-aware time helpers: parsing user input and Kraken's time encodings without float rounding."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MINUTE = timedelta(minutes=1)


def check_aware(value: datetime, field: str = "time") -> datetime:
    """Return `value` converted to UTC; refuse naive datetimes, which are ambiguous."""
    if not isinstance(value, datetime):
        raise ValueError(f"{field} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"{field} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def parse_time(text: str | datetime | int | float) -> datetime:
    """Parse user input: ISO-8601 (date or datetime; naive means UTC) or unix seconds."""
    if isinstance(text, datetime):
        return text.astimezone(UTC) if text.tzinfo else text.replace(tzinfo=UTC)
    if isinstance(text, (int, float)):
        return datetime.fromtimestamp(text, UTC)
    raw = text.strip()
    try:
        if raw.isascii() and raw.lstrip("-").replace(".", "", 1).isdigit():
            return from_unix_decimal(Decimal(raw))
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError, ArithmeticError):  # not a time, or not one a datetime holds
        raise ValueError(
            f"cannot read time {text!r}: use ISO-8601 such as 2024-01-01 or 2024-01-01T12:00:00Z, "
            "or unix seconds"
        ) from None


def from_unix_decimal(seconds: Decimal | str) -> datetime:
    """Seconds since the epoch as an exact decimal → UTC datetime, truncated to the microsecond.

    Kraken's REST trade time is a JSON float with up to 7 decimals
    (``1762795433.9717445``); read as a binary float it would drift, so callers parse it
    as Decimal and we truncate (the same microsecond the nanosecond cursor truncates to).
    """
    value = Decimal(seconds)
    micros = int(value.scaleb(6).to_integral_value(rounding="ROUND_FLOOR"))
    return EPOCH + timedelta(microseconds=micros)


def from_unix_ns(ns: int | str) -> datetime:
    """Nanoseconds since the epoch (Kraken's ``last`` cursor) → UTC datetime, truncated to µs."""
    return EPOCH + timedelta(microseconds=int(ns) // 1000)


def to_unix_ns(value: datetime) -> int:
    """UTC datetime → integer nanoseconds since the epoch (for a Trades ``since``)."""
    delta = check_aware(value) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def to_unix_seconds(value: datetime) -> int:
    """UTC datetime → whole seconds since the epoch (floor)."""
    delta = check_aware(value) - EPOCH
    return delta.days * 86_400 + delta.seconds


def parse_rfc3339(text: str) -> datetime:
    """WebSocket v2 timestamps (``2026-09-10T17:44:43.105760475Z``) → UTC datetime, truncated to µs."""
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    head, sep, rest = raw.partition(".")
    if sep:
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        digits, tz = rest[:i], rest[i:]
        raw = f"{head}.{(digits + '000000')[:6]}{tz}"
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return value.astimezone(UTC)


def floor_minute(value: datetime) -> datetime:
    """Start of the minute containing `value`."""
    return check_aware(value).replace(second=0, microsecond=0)


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def since_cursor(when: datetime) -> str:
    """The REST Trades ``since`` cursor whose first page starts at the first trade at or after
    `when` (``since`` is exclusive, so one nanosecond before it)."""
    return str(max(0, to_unix_ns(when) - 1))
