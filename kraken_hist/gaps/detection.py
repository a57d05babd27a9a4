"""Find every hole in stored data, in SQL, without a single exchange call.

Three kinds of gap (``GapKind``):

* ``TRADE_IDS`` — Kraken's trade ids are contiguous per pair (KRAKEN.md), so a jump in the
  stored positive ids is exactly the missing trades, and the neighbours' times bound when
  they happened. Negative ids are synthetic (id-less CSV trades) and take no part.
* ``UNCOVERED`` — time inside a symbol's stored history that nothing vouches for: not in any
  source's coverage (except ``ohlc``, which vouches for candles, not trades) and not between
  two stored trades with contiguous ids. A quiet market with contiguous ids is *known* quiet.
* ``CANDLES`` — minutes whose stored trades disagree with the stored 1-minute candle
  (missing, stale, or an exchange candle where trades are stored); repaired locally.

Ids in ``refused_trades`` (trades the exchange sent with impossible values, ``bounds``) are
accounted for: they are no ``TRADE_IDS`` gap, and are listed apart (``SymbolScan.refused``,
kind ``REFUSED``) so that they are seen as refused, never fetched again.

Speed comes from checking cheap totals first and looking closer only where they disagree:
per symbol, the count of positive ids against ``max - min + 1`` (an index-only scan) and
the trade count against the candles' summed trade counts (outside trade-id holes); then per
block of 256 ids / per day; then per id / per minute, where candles are compared field by
field with what ``store.rebuild_candles`` would write. A symbol without holes costs one
index-only scan of its trades, one scan of its candles and a few index probes.

Known limit of the fast path: a candle whose values are wrong while its minute's trade count
is right (trades are immutable here, so only a hand edit makes one) is found only when its
day is examined for another reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from kraken_hist.rules import ranges as ranges
from kraken_hist.storage import ownership, store
from kraken_hist.storage.pair_store import stored_price_decimals
from kraken_hist.rules.sql import MINUTE_CANDLES_FROM_TRADES
from kraken_hist.storage.store import read_sync_status
from kraken_hist.core.timeutils import ONE_MINUTE, UTC, check_aware, floor_minute
from kraken_hist.core.types import DataGap, GapKind

logger = logging.getLogger(__name__)

MICROSECOND = timedelta(microseconds=1)
BEGINNING = datetime(1, 1, 1, tzinfo=UTC)  # "since the beginning" as a comparable bound
#: Coverage sources that vouch for trades; ``ohlc`` coverage only says the candles are complete.
TRADE_COVERAGE_EXCLUDES = ("ohlc",)
#: Ids per block when narrowing down where a symbol's holes are.
ID_BLOCK_BITS = 8

# Index-only scans of the primary key when the whole history is checked.
_TRADE_TOTALS = """
SELECT count(*) FILTER (WHERE trade_id > 0), count(*) FROM trades WHERE symbol = %(symbol)s
"""
_TRADE_TOTALS_SINCE = """
SELECT count(*) FILTER (WHERE trade_id > 0), count(*)
FROM trades WHERE symbol = %(symbol)s AND time >= %(since)s
"""

_CANDLE_TOTALS = """
SELECT coalesce(sum(trades), 0) FROM candles
WHERE symbol = %(symbol)s AND time >= %(since)s AND source = 'trades'
"""

_WINDOW_TOTALS = """
SELECT (SELECT count(*) FROM trades WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s),
       (SELECT coalesce(sum(trades), 0) FROM candles
        WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(lo)s AND time < %(hi)s)
"""

_EDGE = """
SELECT trade_id, time FROM trades
WHERE symbol = %(symbol)s AND trade_id > 0 AND time >= %(since)s
ORDER BY trade_id {order} LIMIT 1
"""

_TIME_EDGE = """
SELECT time FROM trades WHERE symbol = %(symbol)s AND time >= %(since)s ORDER BY time {order} LIMIT 1
"""

# Blocks of ids whose count disagrees with their id span, or that do not continue the block
# before them, are where the holes are; lag() over the primary key then names them exactly.
_ID_HOLES = """
WITH blocks AS (
    SELECT trade_id >> %(bits)s AS block, count(*) AS n, min(trade_id) AS lo, max(trade_id) AS hi
    FROM trades
    WHERE symbol = %(symbol)s AND trade_id BETWEEN %(lo)s AND %(hi)s
    GROUP BY 1
), suspect AS (
    SELECT lo, hi, n, lag(hi) OVER (ORDER BY block) AS prev_hi FROM blocks
), windows AS (
    SELECT coalesce(prev_hi, lo) AS from_id, hi AS to_id
    FROM suspect WHERE n <> hi - lo + 1 OR lo <> prev_hi + 1
)
SELECT DISTINCT h.prev_id + 1, h.trade_id - 1, h.prev_time, h.time
FROM windows w CROSS JOIN LATERAL (
    SELECT trade_id, time,
           lag(trade_id) OVER (ORDER BY trade_id) AS prev_id,
           lag(time) OVER (ORDER BY trade_id) AS prev_time
    FROM trades
    WHERE symbol = %(symbol)s AND trade_id BETWEEN w.from_id AND w.to_id
) h
WHERE h.trade_id - h.prev_id > 1
ORDER BY 1
"""

# Days whose trade count (index-only) differs from their candles' summed trade counts.
_SUSPECT_DAYS = """
WITH t AS (
    SELECT date_trunc('day', time, 'UTC') AS day, count(*) AS n
    FROM trades WHERE symbol = %(symbol)s AND time >= %(since)s GROUP BY 1
), c AS (
    SELECT date_trunc('day', time, 'UTC') AS day, sum(trades) AS n
    FROM candles WHERE symbol = %(symbol)s AND time >= %(since)s AND source = 'trades' GROUP BY 1
)
SELECT day FROM t FULL JOIN c USING (day)
WHERE t.n IS DISTINCT FROM c.n
ORDER BY 1
"""

# The same candle rebuild_candles would write, compared with what is stored, minute by minute.
_BAD_MINUTES = f"""
WITH built AS ({MINUTE_CANDLES_FROM_TRADES}
), stored AS (
    SELECT time AS minute, open, high, low, close, vwap, volume, trades, source
    FROM candles WHERE symbol = %(symbol)s AND time >= %(start)s AND time < %(end)s
)
SELECT coalesce(b.minute, s.minute)
FROM built b FULL JOIN stored s ON s.minute = b.minute
WHERE (b.minute IS NULL AND s.source = 'trades')
   OR (b.minute IS NOT NULL AND (s.minute IS NULL OR
       (b.open, b.high, b.low, b.close, b.vwap, b.volume, b.trades, 'trades')
       IS DISTINCT FROM (s.open, s.high, s.low, s.close, s.vwap, s.volume, s.trades, s.source)))
ORDER BY 1
"""

_COVERAGE = """
SELECT lower(r), upper(r)
FROM (SELECT unnest(range_agg(ranges)) AS r
      FROM coverage WHERE symbol = %(symbol)s AND NOT (source = ANY(%(excluded)s))) merged
WHERE upper(r) > %(since)s
ORDER BY 1
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class SymbolScan:
    """What detection learnt about one symbol: its gaps and how far its history reaches."""

    symbol: str
    gaps: list[DataGap]
    newest_time: datetime | None  # newest stored trade or covered instant
    refused: list[DataGap] = field(default_factory=list)  # kind REFUSED: accounted for, not missing


def read_symbol_gaps(
    conn: psycopg.Connection,
    symbol: str,
    *,
    min_gap_minutes: float = 2,
    since: datetime | None = None,
    verify_candles: bool = False,
    price_decimals: int | None = None,
) -> SymbolScan:
    """Every gap of `symbol` at or after `since` (default: all of history).

    Candles are checked against trade counts first (cheap), and field by field only on days
    whose counts disagree; `verify_candles` compares every minute field by field, so an edited
    candle whose trade count is unchanged is found too (a full pass over the trades).
    Candles are rebuilt at `price_decimals` (default: the database's pair table says).

    Run it inside one REPEATABLE READ transaction so all checks see one snapshot.
    Invariants of the answer: gaps sorted by (kind order, start); trade-id gaps name exactly
    the missing ids; uncovered ranges are disjoint, at least `min_gap_minutes` long and never
    overlap a trade-id gap's window; candle gaps are runs of whole minutes outside trade-id
    gap windows (filling those trades rebuilds their candles anyway).
    """
    lo = floor_minute(check_aware(since, "since")) if since is not None else BEGINNING
    # JIT compilation costs far more than these index scans (the planner overestimates the
    # lateral hole search by orders of magnitude); SET LOCAL ends with the caller's transaction
    conn.execute("SET LOCAL jit = off")
    params = {"symbol": symbol, "since": lo}
    totals = _TRADE_TOTALS if since is None else _TRADE_TOTALS_SINCE
    n_pos, n_all = conn.execute(totals, params).fetchone()  # type: ignore[misc]
    first = conn.execute(_EDGE.format(order="ASC"), params).fetchone()
    last = conn.execute(_EDGE.format(order="DESC"), params).fetchone()

    id_gaps: list[DataGap] = []
    if first is not None and last is not None and n_pos < last[0] - first[0] + 1:
        id_gaps = _read_id_holes(conn, symbol, lo, first[0], last[0])
    id_gaps.extend(_tail_hole(conn, symbol, last))
    refused: list[DataGap] = []
    if id_gaps:
        id_gaps, refused = _without_refused(conn, symbol, id_gaps)
    if id_gaps:
        id_gaps = _without_archive_jumps(conn, symbol, id_gaps)

    candle_gaps: list[DataGap] = []
    candle_sum = conn.execute(_CANDLE_TOTALS, params).fetchone()[0]  # type: ignore[index]
    # candles inside trade-id holes are stale by construction and are rebuilt by their fill:
    # compare the totals outside them
    for hole_lo, hole_hi in _widen_to_minutes([(g.start, g.end + MICROSECOND) for g in id_gaps]):
        in_trades, in_candles = conn.execute(
            _WINDOW_TOTALS, {"symbol": symbol, "lo": max(hole_lo, lo), "hi": hole_hi}
        ).fetchone()  # type: ignore[misc]
        n_all -= in_trades
        candle_sum -= in_candles
    if verify_candles and first is not None and last is not None:
        candle_gaps = _read_candle_gaps(conn, symbol, lo, id_gaps, price_decimals, every_day=(max(lo, floor_minute(first[1])),
                                                                               floor_minute(last[1]) + ONE_MINUTE))
    elif candle_sum != n_all:
        candle_gaps = _read_candle_gaps(conn, symbol, lo, id_gaps, price_decimals)

    uncovered, newest = _read_uncovered(conn, symbol, lo, first, last, id_gaps, min_gap_minutes)
    return SymbolScan(symbol=symbol, gaps=id_gaps + uncovered + candle_gaps, newest_time=newest, refused=refused)


def _read_id_holes(conn: psycopg.Connection, symbol: str, since: datetime, lo: int, hi: int) -> list[DataGap]:
    rows = conn.execute(
        _ID_HOLES, {"symbol": symbol, "since": since, "lo": lo, "hi": hi, "bits": ID_BLOCK_BITS}
    ).fetchall()
    return [
        DataGap(symbol=symbol, kind=GapKind.TRADE_IDS, start=prev_time, end=next_time,
                first_missing_id=first_missing, last_missing_id=last_missing)
        for first_missing, last_missing, prev_time, next_time in rows
    ]


def _without_refused(conn: psycopg.Connection, symbol: str,
                     id_gaps: list[DataGap]) -> tuple[list[DataGap], list[DataGap]]:
    """Split id holes by the refused ids inside them: (what is still missing, runs of refused ids)."""
    missing: list[DataGap] = []
    refused: list[DataGap] = []
    for gap in id_gaps:
        lo, hi = gap.first_missing_id, gap.last_missing_id
        assert lo is not None and hi is not None
        ids = store.read_refused_ids(conn, symbol, lo, hi)
        if not ids:
            missing.append(gap)
            continue
        for kind, (a, b) in _id_runs(lo, hi, ids):
            refused_or_missing = refused if kind is GapKind.REFUSED else missing
            refused_or_missing.append(DataGap(symbol=symbol, kind=kind, start=gap.start, end=gap.end,
                                              first_missing_id=a, last_missing_id=b))
    return missing, refused


def _id_runs(lo: int, hi: int, refused: list[int]) -> list[tuple[GapKind, tuple[int, int]]]:
    """``lo..hi`` cut into runs of refused ids (sorted, inside it) and runs of missing ones."""
    runs: list[tuple[GapKind, tuple[int, int]]] = []
    position = lo
    for trade_id in refused:
        if trade_id > position:
            runs.append((GapKind.TRADE_IDS, (position, trade_id - 1)))
        if runs and runs[-1][0] is GapKind.REFUSED and runs[-1][1][1] == trade_id - 1:
            runs[-1] = (GapKind.REFUSED, (runs[-1][1][0], trade_id))
        else:
            runs.append((GapKind.REFUSED, (trade_id, trade_id)))
        position = trade_id + 1
    if position <= hi:
        runs.append((GapKind.TRADE_IDS, (position, hi)))
    return runs


def _without_archive_jumps(conn: psycopg.Connection, symbol: str, id_gaps: list[DataGap]) -> list[DataGap]:
    """Drop the id jumps across archive-owned time: the archive holds those trades (without
    Kraken's ids), so they are not missing (``ownership.hole_explained``)."""
    archive = store.read_coverage(conn, symbol, ownership.ARCHIVE_SOURCE)
    if not archive:
        return id_gaps
    by_id = ranges.union(*(store.read_coverage(conn, symbol, source) for source in ownership.ID_SOURCES))
    return [g for g in id_gaps if not ownership.hole_explained((g.start, g.end), archive, by_id)]


def _tail_hole(conn: psycopg.Connection, symbol: str, last: tuple[int, datetime] | None) -> list[DataGap]:
    """Ids after the newest stored one that the resume point says were stored once."""
    status = read_sync_status(conn, symbol, "trades")
    if status is None or status["last_trade_id"] is None or last is None:
        return []
    expected_last = int(status["last_trade_id"])
    if expected_last <= last[0]:
        return []
    end = status["last_time"] if status["last_time"] is not None and status["last_time"] >= last[1] else last[1]
    return [DataGap(symbol=symbol, kind=GapKind.TRADE_IDS, start=last[1], end=end,
                    first_missing_id=last[0] + 1, last_missing_id=expected_last)]


def _read_candle_gaps(
    conn: psycopg.Connection, symbol: str, since: datetime, id_gaps: list[DataGap], decimals: int | None,
    every_day: ranges.Range | None = None,
) -> list[DataGap]:
    """Minutes whose candle is not what the trades build: on the days whose counts disagree,
    or over all of `every_day` (lo, hi) when given."""
    if every_day is None:
        days = [row[0] for row in conn.execute(_SUSPECT_DAYS, {"symbol": symbol, "since": since})]
        spans = ranges.normalize((d, d + timedelta(days=1)) for d in days)
    else:
        spans = [every_day]
    if decimals is None:
        decimals = stored_price_decimals(conn, symbol)
    minutes: list[datetime] = []
    for day_lo, day_hi in spans:
        rows = conn.execute(
            _BAD_MINUTES,
            {"symbol": symbol, "start": max(day_lo, since), "end": day_hi, "decimals": decimals},
        ).fetchall()
        minutes.extend(row[0] for row in rows)
    # minutes touching a trade-id hole are rebuilt when its trades are fetched
    holes = [(g.start, g.end + MICROSECOND) for g in id_gaps]
    bad = ranges.subtract(ranges.minute_runs(minutes), _widen_to_minutes(holes))
    return [DataGap(symbol=symbol, kind=GapKind.CANDLES, start=a, end=b) for a, b in bad]


def _widen_to_minutes(spans: list[ranges.Range]) -> list[ranges.Range]:
    out = []
    for start, end in spans:
        hi = floor_minute(end)
        out.append((floor_minute(start), hi if hi == end else hi + timedelta(minutes=1)))
    return ranges.normalize(out)


def _read_uncovered(
    conn: psycopg.Connection,
    symbol: str,
    since: datetime,
    first: tuple[int, datetime] | None,
    last: tuple[int, datetime] | None,
    id_gaps: list[DataGap],
    min_gap_minutes: float,
) -> tuple[list[DataGap], datetime | None]:
    params = {"symbol": symbol, "since": since, "excluded": list(TRADE_COVERAGE_EXCLUDES)}
    covered = [(max(a, since), b) for a, b in conn.execute(_COVERAGE, params).fetchall() if a is not None]
    oldest = conn.execute(_TIME_EDGE.format(order="ASC"), params).fetchone()
    newest = conn.execute(_TIME_EDGE.format(order="DESC"), params).fetchone()
    starts = [t for t in (oldest[0] if oldest else None, covered[0][0] if covered else None) if t is not None]
    ends = [t for t in (newest[0] + MICROSECOND if newest else None, covered[-1][1] if covered else None)
            if t is not None]
    if not starts or not ends:
        return [], None
    # from the start of the oldest minute: a candle built from trades there is only right if
    # the minute's earlier part is known too (a stream's first minute, an archive starting mid-minute)
    # (a scan limited by `since` starts at its first trade: what precedes it is not its business)
    span_lo, span_hi = (floor_minute(min(starts)) if since == BEGINNING else min(starts)), max(ends)
    known = list(covered)
    if first is not None and last is not None:
        known.append((first[1], last[1] + MICROSECOND))  # contiguous ids, apart from id holes
    known.extend((g.start, g.end + MICROSECOND) for g in id_gaps)  # reported as TRADE_IDS
    threshold = timedelta(minutes=min_gap_minutes)
    pieces = ranges.complement(known, span_lo, span_hi)
    partial = _in_trade_candle_minutes(conn, symbol, [p for p in pieces if p[1] - p[0] < threshold])
    gaps = [
        DataGap(symbol=symbol, kind=GapKind.UNCOVERED, start=a, end=b)
        for a, b in pieces
        if b - a >= threshold or (a, b) in partial
    ]
    return gaps, span_hi


def _in_trade_candle_minutes(conn: psycopg.Connection, symbol: str, pieces: list[ranges.Range]) -> set:
    """The short unknown `pieces` that fall in a minute holding a candle built from trades: that
    candle is partial (KRAKEN.md's candle needs every trade of its minute), so however short,
    the piece is a gap (it is filled by fetching its trades, which completes the candle)."""
    if not pieces:
        return set()
    minutes = _widen_to_minutes(pieces)
    rows = conn.execute(
        """SELECT b.lo, b.hi FROM unnest(%s::timestamptz[], %s::timestamptz[]) AS b(lo, hi)
           WHERE EXISTS (SELECT 1 FROM candles c WHERE c.symbol = %s AND c.source = 'trades'
                         AND c.time >= b.lo AND c.time < b.hi)""",
        ([a for a, _ in minutes], [b for _, b in minutes], symbol)).fetchall()
    flagged = [(a, b) for a, b in rows]
    return {p for p in pieces if ranges.intersect([p], flagged)}
