"""What a value from Kraken can possibly be: the one place for the rule, pure (stdlib only).

Every parser (CSV lines, REST pages, WebSocket frames) and the records on their way into
storage ask these functions, so a value is judged the same whichever way it came in. Each
check returns None for a possible value, or a one-line reason naming the field; the caller
decides what a refusal means there (a bad CSV line, a refused REST row or WebSocket item, a
ValueError from a record's constructor). Impossible input is refused at the edge: counted,
reported, never stored, never moving a resume point or coverage.

The rules:

* **Time**: not before Kraken's first public trade, not after ``now`` plus a small clock
  skew. Judged on the time's whole second (``floor``), so the integer seconds of a CSV line,
  the decimal seconds of a REST trade and a datetime all get the same answer. ``now`` is
  always passed in (callers default to the wall clock at the edge) so tests can fix it.
* **Prices** finite and positive; **volumes** finite and positive (a trade always moves
  something; candle volumes and vwaps may be 0: a filler candle has none). Every number at
  most :data:`MAX_WHOLE_DIGITS` digits before the point and :data:`MAX_PLACES` after it as
  written: far beyond any Kraken pair, and small enough that exact sums of a minute's
  trades stay within a fixed Decimal precision (a CSV volume ``1e99`` is bad input, not a
  trade).
* **Trade ids** from the exchange are positive and fit PostgreSQL's bigint (ids <= 0 are the
  range of the CSV archive's synthetic ids).
* **Trade counts** of a candle are whole numbers that fit the candle tables' ``integer``
  column (``[0, 2**31 - 1]``); the interval relations sum them as ``bigint`` (revision 0004),
  so no sum of possible counts overflows an aggregate refresh.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)

#: Before Kraken's first public trade (XBTUSD's is 2013-10-06): nothing older is real.
KRAKEN_FIRST_TRADE = datetime(2013, 9, 1, tzinfo=_UTC)
#: How far ahead of our clock a time may be (the exchange's clock and ours differ a little).
MAX_CLOCK_SKEW = timedelta(minutes=10)
#: The largest trade id PostgreSQL's bigint holds.
MAX_TRADE_ID = 2**63 - 1
#: Digits a price or volume may have before the decimal point (values below 10**20).
MAX_WHOLE_DIGITS = 20
#: Digits a price or volume may have after the decimal point, as written.
MAX_PLACES = 20
#: The largest trade count of one candle: PostgreSQL's ``integer``, the candle tables' column.
MAX_TRADE_COUNT = 2**31 - 1

_FIRST_SECOND = (KRAKEN_FIRST_TRADE - _EPOCH) // timedelta(seconds=1)


def _second(when: datetime) -> int:
    """Whole unix seconds of an aware datetime (floor)."""
    delta = when - _EPOCH
    return delta.days * 86_400 + delta.seconds


def _iso(when: datetime) -> str:
    return when.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_last_bounds: tuple[datetime, int, int] | None = None  # the latest `now` asked about and its bounds


def unix_seconds_bounds(now: datetime) -> tuple[int, int]:
    """The first and the last whole unix second a time may fall in, given `now`."""
    global _last_bounds
    last = _last_bounds
    if last is not None and last[0] is now:  # a page or frame judges all its rows against one `now`
        return last[1], last[2]
    _last_bounds = (now, _FIRST_SECOND, _second(now + MAX_CLOCK_SKEW))
    return _last_bounds[1], _last_bounds[2]


def unix_seconds_problem(value: int | Decimal, now: datetime, field: str = "time") -> str | None:
    """Unix seconds as a wire carries them (CSV integers, REST decimals): None when possible."""
    if isinstance(value, Decimal) and not value.is_finite():
        return f"{field} {value} is not a finite number"
    first, last = unix_seconds_bounds(now)
    if value < first:
        return f"{field} {value} is before Kraken's first trade ({_iso(KRAKEN_FIRST_TRADE)})"
    if value >= last + 1:
        return f"{field} {value} is after now ({_iso(now)}) plus the allowed clock skew of {_skew()}"
    return None


def unix_seconds_refused(seconds: Any, now: datetime) -> Any:
    """The array twin of :func:`unix_seconds_problem` for whole seconds: True where refused.

    Plain comparisons, so it takes a numpy integer array (giving a boolean array) as well as
    one int, without this module importing numpy."""
    first, last = unix_seconds_bounds(now)
    return (seconds < first) | (seconds > last)


def time_window(now: datetime) -> tuple[datetime, datetime]:
    """``[start, end)``: the aware datetimes :func:`time_problem` accepts given `now` (for a
    parser that checks many times against one `now`; the end is a whole second)."""
    first, last = unix_seconds_bounds(now)
    return _EPOCH + timedelta(seconds=first), _EPOCH + timedelta(seconds=last + 1)


def time_problem(when: datetime, now: datetime, field: str = "time") -> str | None:
    """An aware datetime: None when possible, judged on its whole second like the others."""
    if KRAKEN_FIRST_TRADE <= when <= now + MAX_CLOCK_SKEW:
        return None  # the common case, which the whole-second window below accepts too
    start, end = time_window(now)
    if when < start:
        return f"{field} {_iso(when)} is before Kraken's first trade ({_iso(KRAKEN_FIRST_TRADE)})"
    if when >= end:
        return f"{field} {_iso(when)} is after now ({_iso(now)}) plus the allowed clock skew of {_skew()}"
    return None


def _skew() -> str:
    minutes, seconds = divmod(int(MAX_CLOCK_SKEW.total_seconds()), 60)
    return f"{minutes} min" if not seconds else f"{MAX_CLOCK_SKEW.total_seconds():g} s"


_ZERO = Decimal(0)


def number_problem(value: Decimal | int, field: str, *, zero_ok: bool = False) -> str | None:
    """A price, volume or vwap: finite, positive (or zero where `zero_ok`), not too wide."""
    if type(value) is not Decimal:  # the parsers' case first: it is checked per trade
        if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
            return f"{field} must be a Decimal or int, got {type(value).__name__}"
        value = Decimal(value)
    if not value.is_finite():
        return f"{field} {value} is not a finite number"
    if value <= _ZERO and (value < _ZERO or not zero_ok):
        return f"{field} must {'not be negative' if zero_ok else 'be positive'}, got {value}"
    if value.adjusted() >= MAX_WHOLE_DIGITS and value:  # (a zero written 0E+30 is still zero)
        return f"{field} {value} is too large (more than {MAX_WHOLE_DIGITS} digits before the point)"
    if exponent(value) < -MAX_PLACES:
        return f"{field} {value} has more than {MAX_PLACES} digits after the point"
    return None


def plain_decimal_text(text: str) -> bool:
    """True for the text of a plain unsigned decimal (ASCII digits, at most one point, no
    exponent) short enough to be within the width rule by its length alone: a sufficient
    condition, for a parser holding the text, that a nonzero value read from it has no
    :func:`number_problem` (cheaper than judging the Decimal, and this runs per trade)."""
    return len(text) <= min(MAX_WHOLE_DIGITS, MAX_PLACES) and text.isascii() and text.replace(".", "", 1).isdigit()


def exponent(value: Decimal) -> int:
    """The exponent of a finite Decimal as written (``1.500`` → -3): ``as_tuple().exponent``,
    read from the text where that is plain (about three times cheaper, and this runs per trade)."""
    text = str(value)
    if "E" in text:
        return value.as_tuple().exponent  # type: ignore[return-value]
    point = text.find(".")
    return 0 if point < 0 else point + 1 - len(text)


def price_problem(value: Decimal | int, field: str = "price") -> str | None:
    """A trade's or a candle's price: finite, positive, not too wide."""
    return number_problem(value, field)


def volume_problem(value: Decimal | int, field: str = "volume", *, zero_ok: bool = False) -> str | None:
    """A trade's volume (positive); a candle's volume or vwap with ``zero_ok`` (a quiet bucket has none)."""
    return number_problem(value, field, zero_ok=zero_ok)


def trade_id_problem(value: Any, field: str = "trade_id") -> str | None:
    """A trade id from the exchange: an int in ``[1, 2**63 - 1]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{field} must be an integer, got {value!r}"
    if value <= 0:
        return f"{field} must be positive, got {value}"
    if value > MAX_TRADE_ID:
        return f"{field} {value} does not fit a bigint (at most {MAX_TRADE_ID})"
    return None


def count_problem(value: Any, field: str = "trades") -> str | None:
    """A candle's trade count: an int in ``[0, MAX_TRADE_COUNT]`` (callers that need a
    trading candle refuse 0 themselves)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{field} must be a whole number, got {value!r}"
    if value < 0:
        return f"{field} must be a whole number of at least 0, got {value}"
    if value > MAX_TRADE_COUNT:
        return f"{field} {value} does not fit a candle's count (at most {MAX_TRADE_COUNT})"
    return None
