"""What an aggregate refresh works on and reports: windows of changed 1-minute candles (from
``candle_changes`` or given), widened level by level in the order the hierarchy needs.

Windows are half-open ``(start, end)`` datetimes kept as range lists (``rules.ranges``:
sorted, disjoint, touching windows joined).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from kraken_hist.core.intervals import REFRESH_PARENT, Interval
from kraken_hist.rules import ranges
from kraken_hist.rules.sql import skip_scan_symbols

_MICRO = timedelta(microseconds=1)

Window = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshResult:
    """What one refresh did. ``written``/``deleted`` count buckets per interval (minutes);
    they stay empty on TimescaleDB, which does not report them."""

    timescaledb: bool
    symbols: tuple[str, ...]
    changes_consumed: int
    windows: dict[str, list[Window]] = field(default_factory=dict)
    written: dict[int, int] = field(default_factory=dict)
    deleted: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: Symbols whose refresh failed (plain PostgreSQL), with the one-line reason: their changes
    #: stay queued and the other symbols were refreshed all the same.
    failed: dict[str, str] = field(default_factory=dict)
    chunks_compressed: int = 0  # TimescaleDB: chunks past the configured age compressed by this run

    def to_dict(self) -> dict[str, Any]:
        return {
            "timescaledb": self.timescaledb,
            "symbols": list(self.symbols),
            "changes_consumed": self.changes_consumed,
            "windows": {
                s: [[lo.isoformat(), hi.isoformat()] for lo, hi in ws] for s, ws in self.windows.items()
            },
            "written": {str(k): v for k, v in self.written.items()},
            "deleted": {str(k): v for k, v in self.deleted.items()},
            "chunks_compressed": self.chunks_compressed,
            "failed": dict(self.failed),
            "seconds": round(self.seconds, 6),
        }


def widen_windows(windows: Iterable[Window], interval: Interval) -> list[Window]:
    """Each window widened to whole buckets of `interval`, then joined (``ranges.normalize``)."""
    return ranges.normalize((interval.bucket_start(lo), interval.bucket_end(hi - _MICRO)) for lo, hi in windows)


def refresh_order() -> list[int]:
    """Intervals in the order the hierarchical refresh must visit them (parents first)."""
    order: list[int] = []
    pending = dict(REFRESH_PARENT)
    done = {1}
    while pending:
        ready = sorted(m for m, parent in pending.items() if parent in done)
        if not ready:
            raise RuntimeError(f"REFRESH_PARENT has a cycle or an unknown parent: {pending}")
        for minutes in ready:
            order.append(minutes)
            done.add(minutes)
            del pending[minutes]
    return order


def windows_by_symbol(changes: Iterable[tuple[str, datetime, datetime]]) -> dict[str, list[Window]]:
    """Change rows (symbol, start, end) as each symbol's windows, symbols in order."""
    grouped: dict[str, list[Window]] = {}
    for name, lo, hi in changes:
        grouped.setdefault(name, []).append((lo, hi))
    return {name: ranges.normalize(windows) for name, windows in sorted(grouped.items())}


def read_symbols_to_refresh(conn: psycopg.Connection, explicit: bool) -> list[str]:
    """The symbols with change rows, or (`explicit`) every symbol with 1-minute candles."""
    if not explicit:
        return [r[0] for r in conn.execute("SELECT DISTINCT symbol FROM candle_changes ORDER BY 1")]
    rows = conn.execute(
        f"WITH RECURSIVE {skip_scan_symbols('candles')} SELECT symbol FROM s WHERE symbol IS NOT NULL"
    ).fetchall()
    return [r[0] for r in rows]


def read_explicit_window(
    conn: psycopg.Connection, symbol: str, start: datetime | None, end: datetime | None
) -> list[Window]:
    """``[start, end)`` for `symbol`, an open end taken from its stored 1-minute candles."""
    if start is None or end is None:
        first, last = conn.execute(
            "SELECT min(time), max(time) FROM candles WHERE symbol = %s", (symbol,)
        ).fetchone() or (None, None)
        if first is None:
            return []
        start = start if start is not None else first
        end = end if end is not None else last + timedelta(minutes=1)
        if end <= start:
            return []
    return [(start, end)]
