"""What is stored for each pair, as lanes of time spans: coverage by source, days with candles, gaps.

Read from the database (``read_coverage_map``) and drawn by ``charts.draw_coverage``. The
spans are sorted and disjoint within a lane; ``candles`` are whole UTC days holding at least one
1-minute candle (adjacent days merged), gaps come from ``gap_detection`` (no exchange call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from kraken_hist.gaps import detection as gap_detection

from kraken_hist.core.types import GapKind
from kraken_hist.rules import ranges
from kraken_hist.storage import store

Span = tuple[datetime, datetime]

ONE_DAY = timedelta(days=1)

#: Lane order of a pair's band (sources first, then what is stored, then what is missing).
SOURCE_LANES = ("csv", "rest", "ws", "ohlc")


@dataclass(slots=True)
class PairCoverage:
    """One pair's lanes: ``coverage`` per source, ``candles`` days, ``gaps`` per kind."""

    symbol: str
    coverage: dict[str, list[Span]] = field(default_factory=dict)
    candles: list[Span] = field(default_factory=list)
    gaps: dict[str, list[Span]] = field(default_factory=dict)

    def lanes(self) -> list[tuple[str, list[Span]]]:
        """(label, spans) from top to bottom; empty lanes left out."""
        out = [(f"coverage {s}", self.coverage[s]) for s in sorted(self.coverage, key=_lane_order) if self.coverage[s]]
        if self.candles:
            out.append(("candles", self.candles))
        out.extend((f"gap {k}", spans) for k, spans in sorted(self.gaps.items()) if spans)
        return out

    def extent(self) -> Span | None:
        spans = [s for _label, lane in self.lanes() for s in lane]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)


def _lane_order(source: str) -> tuple[int, str]:
    return (SOURCE_LANES.index(source) if source in SOURCE_LANES else len(SOURCE_LANES), source)


def merge_days(days: Sequence[datetime]) -> list[Span]:
    """Day starts (any order) → spans of consecutive days ``[first, last + 1 day)``."""
    return ranges.normalize((day, day + ONE_DAY) for day in days)


_CANDLE_DAYS = """
SELECT DISTINCT date_trunc('day', time) FROM candles WHERE symbol = %s ORDER BY 1
"""


def read_pair_coverage(conn: psycopg.Connection[Any], symbol: str, *, min_gap_minutes: float = 2) -> PairCoverage:
    """`symbol`'s lanes, in one REPEATABLE READ snapshot (the caller's transaction)."""
    sources = [row[0] for row in conn.execute("SELECT source FROM coverage WHERE symbol = %s ORDER BY source",
                                              (symbol,))]
    result = PairCoverage(symbol=symbol)
    for source in sources:
        result.coverage[source] = store.read_coverage(conn, symbol, source)
    result.candles = merge_days([row[0] for row in conn.execute(_CANDLE_DAYS, (symbol,))])
    scan = gap_detection.read_symbol_gaps(conn, symbol, min_gap_minutes=min_gap_minutes)
    for kind in GapKind:
        spans = [(g.start, g.end) for g in scan.gaps if g.kind is kind]
        if spans:
            result.gaps[kind.value] = spans
    return result


def read_coverage_map(url: str, symbols: Sequence[str], *, min_gap_minutes: float = 2) -> list[PairCoverage]:
    """Lanes of each symbol (each read in its own snapshot)."""
    from kraken_hist.storage.db import connect, translate_errors

    out = []
    with connect(url, options="-c TimeZone=UTC") as conn, translate_errors():
        for symbol in symbols:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                out.append(read_pair_coverage(conn, symbol, min_gap_minutes=min_gap_minutes))
            finally:
                conn.rollback()
    return out


__all__ = ["PairCoverage", "merge_days", "read_coverage_map", "read_pair_coverage"]
