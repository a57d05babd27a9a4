"""The fields of one CSV line: numbers, times and the reasons a line is bad.

Shared by the line parsers (``trade_lines``, ``ohlcvt_lines``); every value is judged by
``core.bounds``, the one rule of what Kraken can send.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from kraken_hist.core.bounds import (
    MAX_PLACES, MAX_WHOLE_DIGITS, price_problem, unix_seconds_bounds, unix_seconds_problem, volume_problem,
)
from kraken_hist.core.timeutils import EPOCH, check_aware, utcnow
from kraken_hist.ingest.archive.layout import is_last, split_line
from kraken_hist.ingest.archive.rows import MAX_SECOND, TIME_OUT_OF_RANGE, BadRowReport

def line_cells(line: bytes, line_no: int, ncols: int, report: "BadRowReport") -> list[bytes] | None:
    """The line's fields, or None for a blank line or a wrong field count (reported, with a
    cut-short last line told apart from a malformed one)."""
    if not line.strip():
        return None
    cells = split_line(line)
    if len(cells) == ncols:
        return cells
    if is_last(line):
        report.add(line_no, "truncated", "last line is cut short (no line end and too few fields)", line)
    else:
        report.add(line_no, "fields", f"expected {ncols} fields, got {len(cells)}", line)
    return None


class TimeText:
    """Unix seconds → ``YYYY-MM-DD HH:MM:SS+00`` bytes for COPY, with the date cached per day."""

    def __init__(self) -> None:
        self._day = -1
        self._date = b""

    def __call__(self, second: int) -> bytes:
        day, rest = divmod(second, 86_400)
        if day != self._day:
            self._day = day
            self._date = (EPOCH + timedelta(days=day)).strftime("%Y-%m-%d ").encode()
        return self._date + b"%02d:%02d:%02d+00" % (rest // 3600, rest // 60 % 60, rest % 60)


_NUM = rb"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,2})?"
# A positive number without exponent, at most MAX_WHOLE_DIGITS digits before the point and
# MAX_PLACES after it: within ``bounds.price_problem``/``volume_problem`` by its very text.
_SHORT_POSITIVE = rb"(?=[0.]*[1-9])(?:\d{1,%d}(?:\.\d{0,%d})?|\.\d{1,%d})" % (
    MAX_WHOLE_DIGITS, MAX_PLACES, MAX_PLACES)
#: A good plain Time and Sales line (its time still to be judged); anything else goes through
#: the slow path, where the numbers are checked by the bounds rules and bad lines classified.
PLAIN_LINE = re.compile(rb"(\d{1,10}),(" + _SHORT_POSITIVE + rb"),(" + _SHORT_POSITIVE + rb")\r?\n")
_PLAIN_BODY = re.compile(rb"(\d{1,10}),(" + _NUM + rb"),(" + _NUM + rb")")
_DECIMAL_TEXT = re.compile(rb"-?" + _NUM)
TIME_TEXT = re.compile(rb"(\d{1,10})(?:\.(\d{1,9}))?")


def plain_line_second(line: bytes) -> int | None:
    """The second of a plain Time and Sales line that ``parse_plain_trades`` would read as
    good (it may still refuse its time as backwards or out of range), else None."""
    match = PLAIN_LINE.match(line)
    if match is not None:
        return int(match.group(1))
    fields = slow_plain_fields(line)
    return int(fields[0]) if fields is not None and len(fields) == 3 else None


def slow_plain_fields(line: bytes) -> tuple[bytes, bytes, bytes] | tuple[str, str] | None:
    """A plain line the fast pattern did not take: its (time, price, volume) when good (the
    time still to be judged), (reason code, message) when bad, None when blank."""
    if not line.strip():
        return None  # blank lines (a trailing empty line) carry nothing
    body = _PLAIN_BODY.fullmatch(line.rstrip(b"\r\n"))
    if body is None:
        if is_last(line):
            return "truncated", "last line is cut short (no line end and it does not parse)"
        return _diagnose_trade(split_line(line), 3)
    ts_b, price_b, volume_b = body.groups()
    checked = price_and_volume(price_b, volume_b)
    if isinstance(checked[0], str):
        if is_last(line):
            return "truncated", f"last line is cut short ({checked[1]})"
        return checked  # type: ignore[return-value]
    return ts_b, price_b, volume_b


def parse_decimal(text: bytes) -> Decimal | None:
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    try:
        value = Decimal(text.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        return None
    return value if value.is_finite() else None


def price_and_volume(price: bytes, volume: bytes) -> tuple[Decimal, Decimal] | tuple[str, str]:
    """Parsed (price, volume), or (reason code, message) naming the first bad one."""
    value = parse_decimal(price)
    if value is None:
        return "price", f"price {price.decode('utf-8', 'replace')!r} is not a number"
    problem = price_problem(value)
    if problem is not None:
        return "price", problem
    amount = parse_decimal(volume)
    if amount is None:
        return "volume", f"volume {volume.decode('utf-8', 'replace')!r} is not a number"
    problem = volume_problem(amount)
    if problem is not None:
        return "volume", problem
    return value, amount


def time_bounds(now: datetime | None) -> tuple[datetime, int, int]:
    """`now` (the wall clock when None) and the first and last unix second a line may have."""
    now = utcnow() if now is None else check_aware(now, "now")
    first, last = unix_seconds_bounds(now)
    return now, first, min(last, MAX_SECOND)


def time_out_of_range(second: int, now: datetime) -> tuple[str, str]:
    return TIME_OUT_OF_RANGE, unix_seconds_problem(second, now) or f"time {second} is beyond the synthetic id range"


def _diagnose_trade(cells: list[bytes], expected: int) -> tuple[str, str]:
    """Why a plain Time and Sales line failed the fast pattern (reason code, message)."""
    if len(cells) != expected:
        return "fields", f"expected {expected} fields, got {len(cells)}"
    ts, price, volume = cells
    if not re.fullmatch(rb"\d{1,10}", ts):
        return "time", f"timestamp {ts.decode('utf-8', 'replace')!r} is not whole unix seconds"
    checked = price_and_volume(price, volume)
    if isinstance(checked[0], str):
        return checked  # type: ignore[return-value]
    return "fields", "line does not match timestamp,price,volume"


