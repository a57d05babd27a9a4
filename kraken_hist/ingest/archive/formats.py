"""Kraken's downloadable CSV files: sniff the layout, parse lines in chunks into COPY text.

Pure logic (no database): the importer hands in a stream of byte lines and gets chunks of
rows already formatted for ``COPY ... FROM STDIN`` (text format), plus a report of every bad
line with its number. Building Python objects per row would cap the import far below what
PostgreSQL can store, so the hot path validates each line with one regular expression and
formats the COPY row directly from the matched bytes.

Layouts (KRAKEN.md, "Downloadable history"):

* Time and Sales, ``XBTUSD.csv``: ``timestamp,price,volume``, whole seconds, no header, no id
  (``1381095255,122.0,0.1``).
* The reported quarterly variant with a header and 7 columns (price, volume, time, buy/sell,
  market/limit, misc, trade_id; unconfirmed): columns are mapped by their header names and an
  unknown name refuses the file.
* OHLCVT, ``XBTUSD_60.csv``: ``timestamp,open,high,low,close,volume,trades``, no header,
  interval start in seconds, the interval (minutes) from the file name.

Synthetic identity of id-less trades: ``trade_id = -(10**15) + second * 100_000 + ordinal``,
ordinal = position of the trade within its second in file order. The ids are negative
(never clash with Kraken's positive ids), grow with time, keep file order under
``ORDER BY time, trade_id``, and are the same on every import of the same file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any

import numpy as np

from kraken_hist.core.bounds import (
    count_problem, price_problem, trade_id_problem, unix_seconds_bounds, unix_seconds_problem, volume_problem,
)
from kraken_hist.core.errors import PermanentError
from kraken_hist.core.timeutils import EPOCH, check_aware, utcnow

#: Offset of synthetic trade ids: far below any Kraken id, and negative until the year 2286.
SYNTHETIC_ID_BASE = -(10**15)
#: Trades one second can hold before synthetic ids of neighbouring seconds would collide.
MAX_TRADES_PER_SECOND = 100_000
#: Largest unix second a synthetic id can encode while staying negative.
MAX_SECOND = 10**10 - 1

TRADES = "trades"
OHLCVT = "ohlcvt"

#: Reason code of a line whose time is outside Kraken's life (``bounds``): before its first
#: trade or after now plus the clock skew. Such a line is never stored and never counts toward
#: a chunk's first/last time (so neither coverage nor a resume point can move to it).
TIME_OUT_OF_RANGE = "time_out_of_range"

#: ``trades`` columns of the COPY rows of plain Time and Sales chunks (side and order type NULL).
PLAIN_COLUMNS = ("trade_id", "time", "price", "volume", "symbol", "source")
#: ``trades`` columns of the COPY rows of headered Time and Sales chunks.
FULL_COLUMNS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")

#: OHLCVT intervals Kraken publishes (minutes); others are refused as a likely misread name.
OHLCVT_INTERVALS = frozenset({1, 5, 15, 30, 60, 240, 720, 1440, 10080, 21600})


class LayoutError(PermanentError):
    """The file's layout is not one we know how to read: it is refused, nothing imported."""


class StrictModeError(PermanentError):
    """A bad line in strict mode: the file's import is abandoned before anything is committed."""

    def __init__(self, bad: "BadRow") -> None:
        self.bad = bad
        super().__init__(f"strict mode: {bad}")


def synthetic_trade_id(second: int, ordinal: int) -> int:
    """Stable negative id of the `ordinal`-th trade (from 0, file order) of unix `second`."""
    if not 0 <= second <= MAX_SECOND:
        raise ValueError(f"second {second} is outside what a synthetic id can encode")
    if not 0 <= ordinal < MAX_TRADES_PER_SECOND:
        raise ValueError(f"ordinal {ordinal} exceeds {MAX_TRADES_PER_SECOND - 1} trades in one second")
    return SYNTHETIC_ID_BASE + second * MAX_TRADES_PER_SECOND + ordinal


# --------------------------------------------------------------------------- layouts

_INTERVAL_NAME = re.compile(r"_(\d+)\.csv$", re.IGNORECASE)

# Header names (normalised: lower case, spaces and dashes as underscores) → canonical column.
_TRADE_HEADER = {
    "price": "price",
    "volume": "volume", "vol": "volume", "qty": "volume", "quantity": "volume",
    "time": "time", "timestamp": "time",
    "buy/sell": "side", "buy_sell": "side", "side": "side",
    "market/limit": "ord_type", "market_limit": "ord_type", "ord_type": "ord_type", "order_type": "ord_type",
    "misc": "misc",
    "trade_id": "trade_id", "tradeid": "trade_id", "id": "trade_id",
}
_OHLC_HEADER = {
    "time": "time", "timestamp": "time",
    "open": "open", "high": "high", "low": "low", "close": "close",
    "vwap": "vwap",
    "volume": "volume", "vol": "volume",
    "trades": "trades", "count": "trades",
}
_TRADE_REQUIRED = ("time", "price", "volume")
_OHLC_REQUIRED = ("time", "open", "high", "low", "close", "volume", "trades")
_NUMBER_TEXT = re.compile(rb"^\s*-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How one file is laid out: what it holds, whether a header line comes first, the columns."""

    kind: str  # TRADES or OHLCVT
    header: bool
    columns: tuple[str, ...]  # canonical names in file order ("misc" columns are ignored)
    interval: int | None = None  # minutes, OHLCVT only

    @property
    def has_ids(self) -> bool:
        return "trade_id" in self.columns

    @property
    def is_plain_time_and_sales(self) -> bool:
        """The common Kraken file: 3 columns, no header (the fast path)."""
        return self.kind == TRADES and not self.header and self.columns == ("time", "price", "volume")

    def describe(self) -> str:
        what = "Time and Sales" if self.kind == TRADES else f"OHLCVT {self.interval}m"
        return f"{what}, {len(self.columns)} columns, {'header' if self.header else 'no header'}"


def interval_from_filename(name: str) -> int | None:
    """Minutes of an OHLCVT file name (``XBTUSD_60.csv`` → 60), None for Time and Sales names."""
    match = _INTERVAL_NAME.search(name.replace("\\", "/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def _cells(line: bytes, line_no: int, ncols: int, report: "BadRowReport") -> list[bytes] | None:
    """The line's fields, or None for a blank line or a wrong field count (reported, with a
    cut-short last line told apart from a malformed one)."""
    if not line.strip():
        return None
    cells = _split_line(line)
    if len(cells) == ncols:
        return cells
    if _is_last(line):
        report.add(line_no, "truncated", "last line is cut short (no line end and too few fields)", line)
    else:
        report.add(line_no, "fields", f"expected {ncols} fields, got {len(cells)}", line)
    return None


def _split_line(line: bytes) -> list[bytes]:
    return [cell.strip().strip(b'"') for cell in line.rstrip(b"\r\n").split(b",")]


def sniff_layout(first_line: bytes, filename: str) -> Layout:
    """Decide the layout from the first line and the file name; LayoutError when unsure.

    A first line whose cells are not all numbers is a header and names the columns; without
    a header, 3 columns are Time and Sales and 7 columns are OHLCVT when the file name
    carries an interval (``XBTUSD_60.csv``).
    """
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    interval = interval_from_filename(name)
    cells = _split_line(first_line.lstrip(b"\xef\xbb\xbf"))
    if not first_line.strip():
        raise LayoutError(f"{name}: the file is empty or starts with an empty line")
    if all(_NUMBER_TEXT.match(cell) for cell in cells):
        return _layout_without_header(name, len(cells), interval)
    return _layout_from_header(name, cells, interval)


def _layout_without_header(name: str, count: int, interval: int | None) -> Layout:
    if count == 3:
        if interval is not None:
            raise LayoutError(
                f"{name}: 3 columns (Time and Sales) but the name carries an interval (_{interval}); "
                "rename the file or check what it holds"
            )
        return Layout(kind=TRADES, header=False, columns=("time", "price", "volume"))
    if count == 7:
        if interval is None:
            raise LayoutError(
                f"{name}: 7 columns without a header: an OHLCVT file must be named <PAIR>_<minutes>.csv, "
                "and a Time and Sales file with trade ids must have a header naming its columns"
            )
        return Layout(kind=OHLCVT, header=False, columns=_OHLC_REQUIRED, interval=_check_interval(name, interval))
    raise LayoutError(
        f"{name}: {count} columns without a header; known layouts are Time and Sales "
        "(timestamp,price,volume) and OHLCVT (timestamp,open,high,low,close,volume,trades)"
    )


def _check_interval(name: str, interval: int) -> int:
    if interval not in OHLCVT_INTERVALS:
        raise LayoutError(f"{name}: interval {interval} minutes is not one Kraken publishes ({sorted(OHLCVT_INTERVALS)})")
    return interval


def _layout_from_header(name: str, cells: Sequence[bytes], interval: int | None) -> Layout:
    names = [cell.decode("utf-8", "replace").strip().lower().replace(" ", "_").replace("-", "_") for cell in cells]
    kind = OHLCVT if "open" in names else TRADES
    table, required = (_OHLC_HEADER, _OHLC_REQUIRED) if kind == OHLCVT else (_TRADE_HEADER, _TRADE_REQUIRED)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise LayoutError(
            f"{name}: unknown column name(s) {', '.join(map(repr, unknown))} in the header "
            f"{','.join(names)}; known names: {', '.join(sorted(table))}"
        )
    columns = tuple(table[n] for n in names)
    duplicated = sorted({c for c in columns if c != "misc" and columns.count(c) > 1})
    missing = [c for c in required if c not in columns]
    if duplicated or missing:
        problem = f"missing {', '.join(missing)}" if missing else f"repeated {', '.join(duplicated)}"
        raise LayoutError(f"{name}: header {','.join(names)} is {problem}")
    if kind == OHLCVT:
        if interval is None:
            raise LayoutError(f"{name}: OHLCVT columns but no interval in the file name (<PAIR>_<minutes>.csv)")
        return Layout(kind=OHLCVT, header=True, columns=columns, interval=_check_interval(name, interval))
    if interval is not None:
        raise LayoutError(f"{name}: trade columns but the name carries an interval (_{interval})")
    return Layout(kind=TRADES, header=True, columns=columns)


# --------------------------------------------------------------------------- bad rows

@dataclass(frozen=True, slots=True)
class BadRow:
    """One line that was not imported, with where it is and why."""

    file: str
    line: int
    reason: str  # a short code: fields, time, price, volume, truncated, backwards, ...
    message: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} ({self.text!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "message": self.message, "text": self.text}


@dataclass(slots=True)
class BadRowReport:
    """Counts bad lines by reason and keeps the first few; raises at once in strict mode."""

    file: str
    strict: bool = False
    max_examples: int = 20
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[BadRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, line_no: int, reason: str, message: str, line: bytes) -> None:
        bad = BadRow(self.file, line_no, reason, message, line.rstrip(b"\r\n")[:200].decode("utf-8", "replace"))
        if self.strict:
            raise StrictModeError(bad)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(bad)

    def add_row_problem(self, line_no: int, reason: str, message: str, line: bytes) -> None:
        """A row whose fields do not check; on a last line with no line end, a cut-short line."""
        if _is_last(line):
            reason, message = "truncated", f"last line is cut short ({message})"
        self.add(line_no, reason, message, line)


# --------------------------------------------------------------------------- chunks

@dataclass(slots=True, kw_only=True)
class TradeChunk:
    """Up to chunk_size parsed trades as COPY text for ``trades (<columns>)``, and what the
    importer needs to store them."""

    payload: list[bytes]
    columns: tuple[str, ...] = FULL_COLUMNS
    binary: bool = False  # payload and candles hold binary COPY tuples (no header or trailer), not text
    rows: int = 0
    first_time: datetime | None = None  # first and last good row's time (stored or covered;
    last_time: datetime | None = None  # whole seconds for id-less files)
    min_id: int = 0  # smallest and largest id among the rows to store
    max_id: int = 0
    lines: int = 0  # lines consumed (good, bad, covered)
    bytes: int = 0
    covered: int = 0  # good rows skipped because REST/WebSocket data covers their second
    last_line: int = 0
    # 1-minute candles of the rows to store, for COPY into (time, open, high, low, close,
    # notional, volume, trades): whole minutes only (plain layout), else None.
    candles: list[bytes] | None = None


@dataclass(slots=True, kw_only=True)
class OhlcChunk:
    """Parsed OHLCVT rows as COPY text for the staging table (time, open, high, low, close,
    vwap, volume, trades, line)."""

    payload: list[bytes]
    rows: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None  # start of the last interval in the chunk
    lines: int = 0
    bytes: int = 0


class SecondBlocker:
    """Answers "does REST/WebSocket coverage touch unix second S?" for non-decreasing S.

    A whole-second CSV trade happened somewhere in ``[S, S+1)``; if any of that second is
    covered by an id-bearing source, the CSV's trades of that second may duplicate them, so
    the whole second is left to the id-bearing source.
    """

    def __init__(self, ranges: Iterable[tuple[datetime, datetime]]) -> None:
        self._ranges = sorted((_to_micros(lo), _to_micros(hi)) for lo, hi in ranges if hi > lo)
        self._index = 0

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def blocked_seconds(self, seconds: np.ndarray) -> np.ndarray:
        """``blocked`` for a whole sorted int64 array of seconds at once (the fast path's)."""
        ranges = np.asarray(self._ranges, dtype=np.int64).reshape(-1, 2)
        lo_us, hi_us = ranges[:, 0], ranges[:, 1]
        start_us = seconds * 1_000_000
        index = np.searchsorted(hi_us, start_us, side="right")  # the first range ending after S starts
        hit = index < len(hi_us)
        hit[hit] = lo_us[index[hit]] < start_us[hit] + 1_000_000
        return hit

    def blocked(self, second: int) -> bool:
        lo_us, hi_us = second * 1_000_000, (second + 1) * 1_000_000
        ranges = self._ranges
        i = self._index
        while i < len(ranges) and ranges[i][1] <= lo_us:
            i += 1
        self._index = i
        return i < len(ranges) and ranges[i][0] < hi_us


def _to_micros(value: datetime) -> int:
    delta = check_aware(value) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class _TimeText:
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
# A positive number without exponent, at most 20 digits either side of the point: within
# ``bounds.price_problem``/``volume_problem`` by its very text (MAX_WHOLE_DIGITS, MAX_PLACES).
_SHORT_POSITIVE = rb"(?=[0.]*[1-9])(?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})"
#: A good plain Time and Sales line (its time still to be judged); anything else goes through
#: the slow path, where the numbers are checked by the bounds rules and bad lines classified.
_PLAIN_LINE = re.compile(rb"(\d{1,10}),(" + _SHORT_POSITIVE + rb"),(" + _SHORT_POSITIVE + rb")\r?\n")
_PLAIN_BODY = re.compile(rb"(\d{1,10}),(" + _NUM + rb"),(" + _NUM + rb")")
_DECIMAL_TEXT = re.compile(rb"-?" + _NUM)
_TIME_TEXT = re.compile(rb"(\d{1,10})(?:\.(\d{1,9}))?")


def plain_line_second(line: bytes) -> int | None:
    """The second of a plain Time and Sales line that ``parse_plain_trades`` would read as
    good (it may still refuse its time as backwards or out of range), else None."""
    match = _PLAIN_LINE.match(line)
    if match is not None:
        return int(match.group(1))
    fields = _slow_plain_fields(line)
    return int(fields[0]) if fields is not None and len(fields) == 3 else None


def _slow_plain_fields(line: bytes) -> tuple[bytes, bytes, bytes] | tuple[str, str] | None:
    """A plain line the fast pattern did not take: its (time, price, volume) when good (the
    time still to be judged), (reason code, message) when bad, None when blank."""
    if not line.strip():
        return None  # blank lines (a trailing empty line) carry nothing
    body = _PLAIN_BODY.fullmatch(line.rstrip(b"\r\n"))
    if body is None:
        if _is_last(line):
            return "truncated", "last line is cut short (no line end and it does not parse)"
        return _diagnose_trade(_split_line(line), 3)
    ts_b, price_b, volume_b = body.groups()
    checked = _price_volume(price_b, volume_b)
    if isinstance(checked[0], str):
        if _is_last(line):
            return "truncated", f"last line is cut short ({checked[1]})"
        return checked  # type: ignore[return-value]
    return ts_b, price_b, volume_b


def _number(text: bytes) -> Decimal | None:
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    try:
        value = Decimal(text.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        return None
    return value if value.is_finite() else None


def _price_volume(price: bytes, volume: bytes) -> tuple[Decimal, Decimal] | tuple[str, str]:
    """Parsed (price, volume), or (reason code, message) naming the first bad one."""
    value = _number(price)
    if value is None:
        return "price", f"price {price.decode('utf-8', 'replace')!r} is not a number"
    problem = price_problem(value)
    if problem is not None:
        return "price", problem
    amount = _number(volume)
    if amount is None:
        return "volume", f"volume {volume.decode('utf-8', 'replace')!r} is not a number"
    problem = volume_problem(amount)
    if problem is not None:
        return "volume", problem
    return value, amount


def _time_bounds(now: datetime | None) -> tuple[datetime, int, int]:
    """`now` (the wall clock when None) and the first and last unix second a line may have."""
    now = utcnow() if now is None else check_aware(now, "now")
    first, last = unix_seconds_bounds(now)
    return now, first, min(last, MAX_SECOND)


def _time_out_of_range(second: int, now: datetime) -> tuple[str, str]:
    return TIME_OUT_OF_RANGE, unix_seconds_problem(second, now) or f"time {second} is beyond the synthetic id range"


def _diagnose_trade(cells: list[bytes], expected: int) -> tuple[str, str]:
    """Why a plain Time and Sales line failed the fast pattern (reason code, message)."""
    if len(cells) != expected:
        return "fields", f"expected {expected} fields, got {len(cells)}"
    ts, price, volume = cells
    if not re.fullmatch(rb"\d{1,10}", ts):
        return "time", f"timestamp {ts.decode('utf-8', 'replace')!r} is not whole unix seconds"
    checked = _price_volume(price, volume)
    if isinstance(checked[0], str):
        return checked  # type: ignore[return-value]
    return "fields", "line does not match timestamp,price,volume"


def _is_last(line: bytes) -> bool:
    return not line.endswith(b"\n")


def parse_plain_trades(
    lines: Iterable[bytes],
    *,
    symbol: str,
    report: BadRowReport,
    chunk_size: int,
    blocker: SecondBlocker | None = None,
    first_line_no: int = 1,
    after_second: int = -1,
    now: datetime | None = None,
) -> Iterator[TradeChunk]:
    """Plain Time and Sales lines → chunks of COPY rows (``PLAIN_COLUMNS``) with synthetic ids.

    Per line: one regex match, the id from the second and the ordinal in that second, one
    bytes format, and the running 1-minute candle (exact Decimal sums). Chunks end on a
    minute boundary, so each chunk carries the whole candles of its minutes (``candles``):
    the importer stores them as they are when no other trade shares those minutes.

    Bad lines are reported (strict: raised) and take no ordinal; a line whose time is
    outside ``bounds`` (before Kraken's first trade, after `now` (default: the wall clock)
    plus the skew) is "time_out_of_range"; a line whose second is earlier than the one
    before it (or than `after_second`, where an earlier block of the same file ended) is
    "backwards". Both are skipped.
    """
    now, first_ok, last_ok = _time_bounds(now)
    sym = symbol.encode()
    to_text = _TimeText()
    match = _PLAIN_LINE.match
    exact = Context(prec=100, traps=[Inexact, Overflow, InvalidOperation])
    mul, add, number = exact.multiply, exact.add, Decimal
    blocker = blocker if blocker else None
    line_no = first_line_no - 1
    prev_second = after_second
    prev_ts = b""
    minute = -1
    ordinal = 0
    base = 0
    time_b = b""
    blocked = False
    chunk = TradeChunk(payload=[], columns=PLAIN_COLUMNS, candles=[])
    out = chunk.payload
    append = out.append
    first_id = last_id = None
    first_sec = last_sec = -1
    covered = nbytes = consumed = 0
    # The running candle of `minute`: n trades so far (0: none stored in it).
    n = 0
    o_b = h_b = l_b = c_b = b""
    hi = lo = notional = volume = Decimal(0)
    for line in lines:
        line_no += 1
        consumed += 1
        nbytes += len(line)
        m = match(line)
        if m is not None:
            ts_b, price_b, volume_b = m.groups()
        else:
            fields = _slow_plain_fields(line)
            if fields is None:
                continue
            if len(fields) == 2:
                report.add(line_no, fields[0], fields[1], line)  # type: ignore[misc]
                continue
            ts_b, price_b, volume_b = fields  # type: ignore[misc]
        if ts_b == prev_ts:
            second = prev_second
        else:
            second = int(ts_b)
        if second != prev_second:
            if not first_ok <= second <= last_ok:
                report.add(line_no, *_time_out_of_range(second, now), line)
                continue
            if second < prev_second:
                report.add(line_no, "backwards", f"time {second} is before the previous line's {prev_second}", line)
                continue
            if second // 60 != minute:
                if n:
                    chunk.candles.append(  # type: ignore[union-attr]
                        b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
                        % (to_text(minute * 60), o_b, h_b, l_b, c_b, str(notional).encode(), str(volume).encode(), n)
                    )
                    n = 0
                if len(out) >= chunk_size or covered >= chunk_size:
                    _close_plain(chunk, first_id, last_id, first_sec, last_sec, covered, nbytes - len(line),
                                 consumed - 1, line_no - 1)
                    yield chunk
                    chunk = TradeChunk(payload=[], columns=PLAIN_COLUMNS, candles=[])
                    out = chunk.payload
                    append = out.append
                    first_id = last_id = None
                    first_sec = last_sec = -1
                    covered, nbytes, consumed = 0, len(line), 1
                minute = second // 60
            prev_second, prev_ts = second, ts_b
            ordinal = 0
            base = SYNTHETIC_ID_BASE + second * MAX_TRADES_PER_SECOND
            time_b = to_text(second)
            blocked = blocker.blocked(second) if blocker is not None else False
        else:
            ordinal += 1
            if ordinal >= MAX_TRADES_PER_SECOND:
                ordinal -= 1
                report.add(
                    line_no, "second_overflow",
                    f"more than {MAX_TRADES_PER_SECOND} trades in second {second}: synthetic ids would collide",
                    line,
                )
                continue
        if first_sec < 0:
            first_sec = second
        last_sec = second
        if blocked:
            covered += 1
            continue
        trade_id = base + ordinal
        append(b"%d\t%s\t%s\t%s\t%s\tcsv\n" % (trade_id, time_b, price_b, volume_b, sym))
        if first_id is None:
            first_id = trade_id
        last_id = trade_id
        price = number(price_b.decode())
        amount = number(volume_b.decode())
        if n:
            if price > hi:
                hi, h_b = price, price_b
            elif price < lo:
                lo, l_b = price, price_b
            c_b = price_b
            notional = add(notional, mul(price, amount))
            volume = add(volume, amount)
            n += 1
        else:
            o_b = h_b = l_b = c_b = price_b
            hi = lo = price
            notional, volume, n = mul(price, amount), amount, 1
    if n:
        chunk.candles.append(  # type: ignore[union-attr]
            b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
            % (to_text(minute * 60), o_b, h_b, l_b, c_b, str(notional).encode(), str(volume).encode(), n)
        )
    if consumed or out:
        _close_plain(chunk, first_id, last_id, first_sec, last_sec, covered, nbytes, consumed, line_no)
        yield chunk


def _close_plain(chunk: TradeChunk, first_id: int | None, last_id: int | None, first_sec: int, last_sec: int,
                 covered: int, nbytes: int, consumed: int, line_no: int) -> None:
    chunk.rows = len(chunk.payload)
    if first_id is not None and last_id is not None:
        chunk.min_id, chunk.max_id = first_id, last_id
    if first_sec >= 0:
        chunk.first_time = EPOCH + timedelta(seconds=first_sec)
        chunk.last_time = EPOCH + timedelta(seconds=last_sec)
    chunk.covered, chunk.bytes, chunk.lines, chunk.last_line = covered, nbytes, consumed, line_no


_SIDES = {b"b": "b", b"buy": "b", b"s": "s", b"sell": "s", b"": None}
_ORD_TYPES = {b"m": "m", b"market": "m", b"l": "l", b"limit": "l", b"": None}


def parse_header_trades(
    lines: Iterable[bytes],
    *,
    layout: Layout,
    symbol: str,
    report: BadRowReport,
    chunk_size: int,
    blocker: SecondBlocker | None = None,
    first_line_no: int = 2,
    now: datetime | None = None,
) -> Iterator[TradeChunk]:
    """Time and Sales lines of a headered file (columns by name) → chunks of COPY rows.

    With a trade_id column the ids are Kraken's own (they deduplicate against REST and
    WebSocket trades by identity, so coverage is not consulted); without one, synthetic ids
    are assigned as in the plain layout, from the trade's whole second. Times outside
    ``bounds`` (given `now`, default the wall clock) are bad lines like any other.
    """
    bounds = _time_bounds(now)
    index = {name: i for i, name in enumerate(layout.columns) if name != "misc"}
    ncols = len(layout.columns)
    has_ids = layout.has_ids
    sym = symbol.encode()
    to_text = _TimeText()
    line_no = first_line_no - 1
    prev_us = -1
    prev_second = -1
    ordinal = 0
    blocked = False
    chunk = TradeChunk(payload=[])
    for line in lines:
        line_no += 1
        chunk.lines += 1
        chunk.bytes += len(line)
        cells = _cells(line, line_no, ncols, report)
        if cells is None:
            continue
        row = _parse_trade_cells(cells, index, has_ids, bounds)
        if isinstance(row, tuple) and isinstance(row[0], str):
            report.add_row_problem(line_no, *row, line)  # type: ignore[misc]
            continue
        second, micros, price_b, volume_b, side, ord_type, trade_id = row  # type: ignore[misc]
        total_us = second * 1_000_000 + micros
        if total_us < prev_us:
            report.add(line_no, "backwards", "time is before the previous line's", line)
            continue
        prev_us = total_us
        when = EPOCH + timedelta(seconds=second, microseconds=micros)
        if chunk.first_time is None:
            chunk.first_time = when
        chunk.last_time = when
        if trade_id is None:
            if second != prev_second:
                prev_second, ordinal = second, 0
                blocked = blocker.blocked(second) if blocker else False
            else:
                ordinal += 1
                if ordinal >= MAX_TRADES_PER_SECOND:
                    ordinal -= 1
                    report.add(line_no, "second_overflow",
                               f"more than {MAX_TRADES_PER_SECOND} trades in second {second}", line)
                    continue
            if blocked:
                chunk.covered += 1
                continue
            trade_id = synthetic_trade_id(second, ordinal)
        time_b = to_text(second)
        if micros:
            time_b = time_b[:-3] + b".%06d+00" % micros
        chunk.payload.append(
            b"%s\t%d\t%s\t%s\t%s\t%s\t%s\tcsv\n"
            % (sym, trade_id, time_b, price_b, volume_b, (side or "\\N").encode(), (ord_type or "\\N").encode())
        )
        if len(chunk.payload) == 1:
            chunk.min_id = chunk.max_id = trade_id
        chunk.min_id, chunk.max_id = min(chunk.min_id, trade_id), max(chunk.max_id, trade_id)
        if len(chunk.payload) >= chunk_size:
            chunk.rows, chunk.last_line = len(chunk.payload), line_no
            yield chunk
            chunk = TradeChunk(payload=[])
    if chunk.lines or chunk.payload:
        chunk.rows, chunk.last_line = len(chunk.payload), line_no
        yield chunk


def _parse_trade_cells(cells: list[bytes], index: dict[str, int], has_ids: bool,
                       bounds: tuple[datetime, int, int]) -> tuple[Any, ...]:
    """One headered trade row → (second, micros, price, volume, side, ord_type, id) or (reason, message)."""
    ts = cells[index["time"]]
    tm = _TIME_TEXT.fullmatch(ts)
    if tm is None:
        return "time", f"time {ts.decode('utf-8', 'replace')!r} is not unix seconds"
    second = int(tm.group(1))
    micros = int((tm.group(2) or b"0").ljust(6, b"0")[:6])  # truncated to the microsecond
    now, first_ok, last_ok = bounds
    if not first_ok <= second <= last_ok:
        return _time_out_of_range(second, now)
    price_b, volume_b = cells[index["price"]], cells[index["volume"]]
    checked = _price_volume(price_b, volume_b)
    if isinstance(checked[0], str):
        return checked  # type: ignore[return-value]
    side = ord_type = None
    if "side" in index:
        raw = cells[index["side"]].lower()
        if raw not in _SIDES:
            return "side", f"buy/sell {raw.decode('utf-8', 'replace')!r} is not b, s, buy or sell"
        side = _SIDES[raw]
    if "ord_type" in index:
        raw = cells[index["ord_type"]].lower()
        if raw not in _ORD_TYPES:
            return "ord_type", f"market/limit {raw.decode('utf-8', 'replace')!r} is not m, l, market or limit"
        ord_type = _ORD_TYPES[raw]
    trade_id = None
    if has_ids:
        raw = cells[index["trade_id"]]
        if not raw.isdigit():
            return "trade_id", f"trade id {raw.decode('utf-8', 'replace')!r} is not a positive integer"
        trade_id = int(raw)
        problem = trade_id_problem(trade_id)
        if problem is not None:
            return "trade_id", problem
    return second, micros, price_b, volume_b, side, ord_type, trade_id


def parse_ohlcvt(
    lines: Iterable[bytes],
    *,
    layout: Layout,
    report: BadRowReport,
    chunk_size: int,
    first_line_no: int = 1,
    now: datetime | None = None,
) -> Iterator[OhlcChunk]:
    """OHLCVT lines → chunks of staging COPY rows, each validated as a candle.

    Refused lines: wrong field count, non-numbers, non-positive prices, low above high or
    open/close outside [low, high], negative volume, a trade count below 1 (Kraken leaves
    quiet intervals out, so a zero-trade row is not trading), a time not on the interval
    grid, a time outside ``bounds`` (given `now`, default the wall clock), and a time not
    after the previous line's.
    """
    assert layout.interval is not None
    bounds = _time_bounds(now)
    step = layout.interval * 60
    index = {name: i for i, name in enumerate(layout.columns)}
    ncols = len(layout.columns)
    to_text = _TimeText()
    line_no = first_line_no - 1
    prev = -1
    chunk = OhlcChunk(payload=[])
    for line in lines:
        line_no += 1
        chunk.lines += 1
        chunk.bytes += len(line)
        cells = _cells(line, line_no, ncols, report)
        if cells is None:
            continue
        problem = _check_ohlc_cells(cells, index, step, bounds)
        if isinstance(problem, tuple):
            report.add_row_problem(line_no, *problem, line)
            continue
        second = problem
        if second <= prev:
            report.add(line_no, "backwards", f"time {second} is not after the previous line's {prev}", line)
            continue
        prev = second
        vwap = cells[index["vwap"]] if "vwap" in index else b"\\N"
        chunk.payload.append(
            b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
            % (to_text(second), cells[index["open"]], cells[index["high"]], cells[index["low"]],
               cells[index["close"]], vwap, cells[index["volume"]], cells[index["trades"]], line_no)
        )
        when = EPOCH + timedelta(seconds=second)
        if chunk.first_time is None:
            chunk.first_time = when
        chunk.last_time = when
        if len(chunk.payload) >= chunk_size:
            chunk.rows = len(chunk.payload)
            yield chunk
            chunk = OhlcChunk(payload=[])
    if chunk.lines or chunk.payload:
        chunk.rows = len(chunk.payload)
        yield chunk


def _check_ohlc_cells(cells: list[bytes], index: dict[str, int], step: int,
                      bounds: tuple[datetime, int, int]) -> int | tuple[str, str]:
    ts = cells[index["time"]]
    if not re.fullmatch(rb"\d{1,10}", ts):
        return "time", f"timestamp {ts.decode('utf-8', 'replace')!r} is not whole unix seconds"
    second = int(ts)
    now, first_ok, last_ok = bounds
    if not first_ok <= second <= last_ok:
        return _time_out_of_range(second, now)
    if second % step:
        return "time", f"time {second} is not the start of a {step // 60}-minute interval"
    values: dict[str, Decimal] = {}
    for name in ("open", "high", "low", "close", "volume"):
        value = _number(cells[index[name]])
        if value is None:
            return name, f"{name} {cells[index[name]].decode('utf-8', 'replace')!r} is not a number"
        values[name] = value
    for name in ("open", "high", "low", "close"):
        problem = price_problem(values[name], name)
        if problem is not None:
            return "price", problem
    problem = volume_problem(values["volume"], zero_ok=True)
    if problem is not None:
        return "volume", problem
    low, high = values["low"], values["high"]
    if low > high or not (low <= values["open"] <= high and low <= values["close"] <= high):
        return "ohlc", f"prices are inconsistent (open {values['open']}, high {high}, low {low}, close {values['close']})"
    if "vwap" in index:
        vwap = _number(cells[index["vwap"]])
        problem = "vwap is not a number" if vwap is None else volume_problem(vwap, "vwap", zero_ok=True)
        if problem is not None:
            return "vwap", problem
    count = cells[index["trades"]]
    if not count.isdigit():
        return "trades", f"trade count {count.decode('utf-8', 'replace')!r} is not a whole number"
    problem = count_problem(int(count))
    if problem is not None:
        return "trades", problem
    if int(count) < 1:
        return "trades", "trade count is 0: not a trading interval"
    return second
