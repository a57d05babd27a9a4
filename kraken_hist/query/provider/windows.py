"""Reading `limit` candles in windows of time rather than over the rest of history.

A read that wants the first or last `limit` buckets of a long range is cut into windows of
about `limit` buckets, read one after the other and widened (x4) over stretches without trades,
down to the symbol's first 1-minute candle (asked only when a window comes back short). The I/O
is passed in: ``read(lo, hi, desc, limit)`` reads one window, ``first()`` the first minute.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from kraken_hist.core.intervals import Interval
from kraken_hist.core.types import HistoricalCandle

Read = Callable[[datetime | None, datetime | None, bool, int | None], list[HistoricalCandle]]
FirstMinute = Callable[[], datetime | None]


def _room(limit: int) -> int:
    """Buckets in a first window for `limit` candles: a little room for quiet buckets, so that
    dense data takes one query."""
    return limit + limit // 4 + 1


def read_stored_in_windows(read: Read, first: FirstMinute, iv: Interval, lo: datetime | None, hi: datetime,
                           desc: bool, limit: int) -> list[HistoricalCandle]:
    """The first (last if `desc`) `limit` buckets of a stored interval in ``[lo, hi)``, by time
    (newest first if `desc`), `limit` buckets' worth of time at a time.

    Why, on TimescaleDB: a real-time continuous aggregate is a view: its materialized rows
    UNION ALL the rows aggregated on the fly past its watermark. PostgreSQL 15 does not push
    ``ORDER BY time LIMIT n`` into the union's branches (TimescaleDB does from PostgreSQL 16
    on), so one query would read and sort every bucket from `lo` to `hi` (~70 ms for two years
    of 5m buckets, against ~3 ms for a table). The ``candles`` hypertable is planned for its
    values: a window leaves all but one or two chunks out of the plan, while an open range (a
    warm-up: everything before `hi`) plans every chunk of the history (500 x 1m over 25
    monthly chunks: 5.2 ms against 3.0 ms). A window of `limit` buckets holds at most `limit`
    candles."""
    out: list[HistoricalCandle] = []
    floor = lo
    span = _room(limit)
    edge = lo if not desc else hi
    while len(out) < limit:
        if desc:
            if floor is not None and edge <= floor:
                break
            start = edge - span * iv.delta
            if floor is not None:
                start = max(start, floor)
            out.extend(read(start, edge, True, limit - len(out)))
            edge = start
        else:
            if edge is None:
                first_minute = first()
                if first_minute is None:
                    break
                edge = iv.bucket_start(first_minute)
            if edge >= hi:
                break
            end = min(hi, edge + span * iv.delta)
            out.extend(read(edge, end, False, limit - len(out)))
            edge = end
        if len(out) < limit and floor is None and desc:
            first_minute = first()  # how far back is there anything at all?
            if first_minute is None:
                break
            floor = iv.bucket_start(first_minute)
        span *= 4
    return out


def read_latest_in_windows(read: Read, first: FirstMinute, iv: Interval, hi: datetime, count: int
                           ) -> list[HistoricalCandle]:
    """The last `count` buckets before `hi` of an interval aggregated on the fly, oldest first:
    a window of `count` buckets and a little room for quiet ones, widened where sparse, down to
    the first 1-minute candle, asked only then (it bounds every level; on TimescaleDB min()
    over a continuous aggregate would scan its view, over ``candles`` it is one index probe)."""
    first_minute: datetime | None = None
    span = _room(count)
    while True:
        lo = hi - span * iv.delta if first_minute is None else max(hi - span * iv.delta, iv.bucket_start(first_minute))
        rows = read(lo, hi, True, count)
        if len(rows) >= count:
            return rows[::-1]
        if first_minute is None:
            first_minute = first()
            if first_minute is None:
                return []
        if lo <= first_minute:
            return rows[::-1]
        span *= 4


def read_first_in_windows(read: Read, iv: Interval, lo: datetime, hi: datetime, limit: int
                          ) -> list[HistoricalCandle]:
    """The first `limit` buckets in ``[lo, hi)`` of an interval aggregated on the fly, scanning
    the source in windows of `limit` buckets (widened over sparse stretches)."""
    out: list[HistoricalCandle] = []
    span = limit
    while len(out) < limit and lo < hi:
        upper = min(hi, lo + span * iv.delta)
        out.extend(read(lo, upper, False, limit - len(out)))
        lo, span = upper, span * 4
    return out
