"""What the line parsers yield: chunks of COPY rows, synthetic ids, the bad-line report, and
the seconds left to the id-bearing sources.

Synthetic identity of id-less trades: ``trade_id = -(10**15) + second * 100_000 + ordinal``,
ordinal = position of the trade within its second in file order. The ids are negative
(never clash with Kraken's positive ids), grow with time, keep file order under
``ORDER BY time, trade_id``, and are the same on every import of the same file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from kraken_hist.core.errors import PermanentError
from kraken_hist.core.timeutils import EPOCH, check_aware
from kraken_hist.ingest.archive.layout import is_last

#: Offset of synthetic trade ids: far below any Kraken id, and negative until the year 2286.
SYNTHETIC_ID_BASE = -(10**15)
#: Trades one second can hold before synthetic ids of neighbouring seconds would collide.
MAX_TRADES_PER_SECOND = 100_000
#: Largest unix second a synthetic id can encode while staying negative.
MAX_SECOND = 10**10 - 1

#: Reason code of a line whose time is outside Kraken's life (``bounds``): before its first
#: trade or after now plus the clock skew. Such a line is never stored and never counts toward
#: a chunk's first/last time (so neither coverage nor a resume point can move to it).
TIME_OUT_OF_RANGE = "time_out_of_range"

#: ``trades`` columns of the COPY rows of plain Time and Sales chunks (side and order type NULL).
PLAIN_COLUMNS = ("trade_id", "time", "price", "volume", "symbol", "source")
#: ``trades`` columns of the COPY rows of headered Time and Sales chunks.
FULL_COLUMNS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")


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
        if is_last(line):
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

