"""What importing a file did: the running counts while it is stored, the result handed back,
and the record kept in ``sync_status``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from kraken_hist.core.errors import PermanentError
from kraken_hist.ingest.archive.layout import OHLCVT, Layout
from kraken_hist.ingest.archive.rows import BadRow, BadRowReport, OhlcChunk, TradeChunk
from kraken_hist.storage import store

#: Called after each chunk with (bytes read, lines read) since the previous call.
ProgressCallback = Callable[[int, int], None]


class ImportRefusedError(PermanentError):
    """A file that cannot be imported as it is (unknown pair, unknown layout); nothing was stored."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    """What importing one file (or one zip member) did."""

    file: str  # path, or "archive.zip:member"
    status: str  # "imported", "refused" (nothing stored) or "failed" (strict mode: nothing stored)
    symbol: str | None = None
    kind: str | None = None  # "trades" or "ohlcvt"
    interval: int | None = None  # minutes, OHLCVT only
    layout: str | None = None
    reason: str | None = None  # why refused or failed
    lines: int = 0
    bytes: int = 0
    imported: int = 0  # rows stored by this import
    duplicates: int = 0  # rows already stored (a re-import)
    covered: int = 0  # rows left out: their time is covered by id-bearing trades
    bad: int = 0  # lines skipped as bad (see bad_examples)
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    bad_examples: tuple[BadRow, ...] = ()
    first_time: datetime | None = None  # time range of the file's good rows
    last_time: datetime | None = None
    candles: int = 0  # 1-minute candles written (built from trades, or OHLCVT 1m rows)
    refreshed: bool = False  # higher intervals refreshed afterwards
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "imported"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "status": self.status, "symbol": self.symbol, "kind": self.kind,
            "interval": self.interval, "layout": self.layout, "reason": self.reason,
            "lines": self.lines, "bytes": self.bytes, "imported": self.imported,
            "duplicates": self.duplicates, "covered": self.covered, "bad": self.bad,
            "bad_by_reason": dict(self.bad_by_reason),
            "bad_examples": [b.to_dict() for b in self.bad_examples],
            "first_time": self.first_time.isoformat() if self.first_time else None,
            "last_time": self.last_time.isoformat() if self.last_time else None,
            "candles": self.candles, "refreshed": self.refreshed, "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class Tally:
    """A file's running counts, chunk by chunk, in file order."""

    progress: ProgressCallback | None = None
    lines: int = 0
    bytes: int = 0
    imported: int = 0
    duplicates: int = 0
    covered: int = 0
    candles: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None
    max_id: int | None = None
    refreshed_to: datetime | None = None  # aggregates already refreshed from first_time to here

    def advance(self, chunk: TradeChunk | OhlcChunk) -> None:
        """Count a chunk's lines and times (its rows are counted by the caller) and report progress."""
        self.lines += chunk.lines
        self.bytes += chunk.bytes
        if chunk.first_time is not None and self.first_time is None:
            self.first_time = chunk.first_time
        if chunk.last_time is not None:
            self.last_time = chunk.last_time
        if self.progress is not None:
            self.progress(chunk.bytes, chunk.lines)

    def count_trades(self, chunk: TradeChunk, counts: tuple[int, int, int, int], has_ids: bool) -> None:
        """Count a stored Time and Sales chunk: (inserted, already stored, candles, left to the id family)."""
        inserted, duplicates, candles, owned = counts
        self.imported += inserted
        self.duplicates += duplicates
        self.covered += chunk.covered + owned
        self.candles += candles
        if has_ids and chunk.rows:
            self.max_id = max(self.max_id or chunk.max_id, chunk.max_id)
        self.advance(chunk)


def result_of(label: str, symbol: str, layout: Layout, tally: Tally, report: BadRowReport, *, refreshed: bool,
              seconds: float) -> ImportResult:
    """The result of a file stored whole."""
    return ImportResult(
        file=label, status="imported", symbol=symbol, kind=layout.kind, interval=layout.interval,
        layout=layout.describe(), lines=tally.lines, bytes=tally.bytes, imported=tally.imported,
        duplicates=tally.duplicates, covered=tally.covered, bad=report.total,
        bad_by_reason=dict(report.counts), bad_examples=tuple(report.examples),
        first_time=tally.first_time, last_time=tally.last_time, candles=tally.candles,
        refreshed=refreshed, seconds=seconds,
    )


def record_import(conn: psycopg.Connection, label: str, symbol: str, layout: Layout, tally: Tally,
                  report: BadRowReport, end: datetime | None) -> None:
    """Keep a record of the import in sync_status (data_type 'csv_import'), one key per file."""
    data_type = "csv_import" if layout.kind != OHLCVT else f"csv_ohlcvt_{layout.interval}"
    previous = store.read_sync_status(conn, symbol, data_type)
    last = end
    if previous is not None and previous["last_time"] is not None:
        last = max(previous["last_time"], end) if end is not None else previous["last_time"]
    store.write_sync_status(
        conn, symbol, data_type, last_time=last,
        details={label: {
            "imported": tally.imported, "duplicates": tally.duplicates, "covered": tally.covered,
            "bad": report.total, "lines": tally.lines,
            "first_time": tally.first_time.isoformat() if tally.first_time else None,
            "last_time": tally.last_time.isoformat() if tally.last_time else None,
        }},
    )
