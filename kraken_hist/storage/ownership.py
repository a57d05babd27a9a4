"""One owner per second: which source family may store a symbol's trades of a given second.

Kraken's trades reach us from two families whose rows cannot be matched one to one:

* the **id family** — REST Trades and the WebSocket (and archive files that carry Kraken's
  ids): every trade has Kraken's contiguous per-pair id, so duplicates are dropped by id;
* the **archive** — Time and Sales CSV lines: whole seconds, no id, synthetic ids of our own.

A second stored by both would be doubled, so each (symbol, second) has exactly one owner:

* the archive owns second S when coverage ``csv`` holds the whole of ``[S, S+1)``;
* the id family owns S when an id-bearing trade is stored in S or REST/WebSocket coverage
  touches S (a claim by the id family is never taken back).

Every writing path claims under :func:`lock_symbol`, inside the transaction that writes:
an id-family writer drops trades of archive-owned seconds (:data:`ARCHIVE_OWNED`); the
archive importer re-reads the id family's evidence in its chunk's window (:func:`read_id_owned`)
and stores and claims only the other seconds (:func:`archive_claim`). Both decisions read the
database after the lock is taken, so whichever commits first owns the second.

The pure helpers below are the rule; the SQL fragments are its database twins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import psycopg

from kraken_hist.rules import ranges as ranges
from kraken_hist.storage.db import text_array
from kraken_hist.core.timeutils import check_aware

ONE_SECOND = timedelta(seconds=1)
ARCHIVE_SOURCE = "csv"
ID_FILE_SOURCE = "csv_ids"  # coverage of archive files that carry Kraken's trade ids
ID_SOURCES = ("rest", "ws", ID_FILE_SOURCE)

#: True for a trade ``{alias}.time`` of ``{alias}.symbol`` whose second the archive owns.
ARCHIVE_OWNED = """EXISTS (
    SELECT 1 FROM coverage own
    WHERE own.symbol = {alias}.symbol AND own.source = 'csv'
      AND own.ranges @> tstzrange(date_trunc('second', {alias}.time),
                                  date_trunc('second', {alias}.time) + interval '1 second', '[)'))"""

#: Whether the archive owns any second of ``[%(lo)s, %(hi)s)`` for ``%(symbol)s`` (one key probe).
ARCHIVE_TOUCHES = """
SELECT coalesce(bool_or(ranges && tstzrange(%(lo)s, %(hi)s, '[)')), false)
FROM coverage WHERE symbol = %(symbol)s AND source = 'csv'
"""

#: ARCHIVE_TOUCHES for many symbols at once: arrays ``symbol``, ``first`` and ``last`` (minute
#: numbers: ``[first, last + 1)`` minutes); true if any.
ARCHIVE_TOUCHES_ANY = """
SELECT EXISTS (
    SELECT 1 FROM unnest(%(symbol)s::text[], %(first)s::bigint[], %(last)s::bigint[]) AS p(symbol, first, last)
    JOIN coverage c ON c.symbol = p.symbol AND c.source = 'csv'
                   AND c.ranges && tstzrange(to_timestamp(p.first * 60), to_timestamp((p.last + 1) * 60), '[)'))
"""

#: Seconds of ``[%(lo)s, %(hi)s)`` holding a stored id-bearing trade (positive Kraken id).
_ID_TRADE_SECONDS = """
SELECT DISTINCT date_trunc('second', time) FROM trades
WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s AND trade_id > 0
"""

#: REST/WebSocket coverage overlapping ``[%(lo)s, %(hi)s)``.
_ID_COVERAGE = """
SELECT lower(r), upper(r)
FROM (SELECT unnest(ranges * tstzmultirange(tstzrange(%(lo)s, %(hi)s, '[)'))) AS r
      FROM coverage WHERE symbol = %(symbol)s AND source = ANY(%(sources)s)) parts
WHERE NOT isempty(r)
"""

Range = tuple[datetime, datetime]


def lock_symbol(conn: psycopg.Connection, symbol: str, *, shared: bool = False) -> None:
    """Take the symbol's data lock until this transaction ends.

    Every path that stores trades, candles built from them or coverage takes it. Exclusive
    by default; the chunks of one archive import (which claim disjoint seconds, and of which
    only one import per symbol runs at a time) take it shared, so they still store in parallel
    while every other writer waits for them and they for it.
    """
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(f"SELECT {function}(hashtextextended(%s, 0))", (f"symbol:{symbol}",))


def lock_symbols(conn: psycopg.Connection, symbols: Iterable[str]) -> None:
    """:func:`lock_symbol` (exclusive) for several symbols in one statement, in one order
    (byte order of the names) so that two writers locking overlapping sets never deadlock."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('symbol:' || s, 0)) FROM unnest(%s::text[]) AS s",
                 (text_array(sorted(set(symbols))),))  # unnest yields the array in its order


# --------------------------------------------------------------------------- the pure rule

def second_floor(when: datetime) -> datetime:
    """The start of the second `when` falls in."""
    return check_aware(when).replace(microsecond=0)


def whole_seconds(spans: Iterable[Range]) -> list[Range]:
    """Every second touched by `spans`, as sorted disjoint ranges of whole seconds."""
    out = []
    for lo, hi in spans:
        if hi <= lo:
            continue
        end = second_floor(hi)
        out.append((second_floor(lo), end if end == hi else end + ONE_SECOND))
    return ranges.normalize(out)


def seconds_of(times: Iterable[datetime]) -> list[Range]:
    """The seconds holding `times`, as sorted disjoint ranges."""
    return ranges.normalize((second_floor(t), second_floor(t) + ONE_SECOND) for t in times)


def id_owned(id_trade_times: Iterable[datetime], id_coverage: Iterable[Range]) -> list[Range]:
    """Seconds the id family owns: those holding an id-bearing trade or touched by its coverage."""
    return ranges.union(seconds_of(id_trade_times), whole_seconds(id_coverage))


def archive_claim(window: Range, owned_by_ids: Sequence[Range]) -> list[Range]:
    """What an archive segment covering `window` (whole seconds) may claim: the window
    without the seconds the id family owns. Always whole seconds."""
    lo, hi = window
    return ranges.subtract(whole_seconds([(lo, hi)]), owned_by_ids)


def archive_keeps(second: datetime, owned_by_ids: Sequence[Range]) -> bool:
    """Whether an archive line of `second` may be stored (the id family does not own it)."""
    start = second_floor(second)
    return not ranges.intersect([(start, start + ONE_SECOND)], owned_by_ids)


def archive_owns(when: datetime, archive_coverage: Sequence[Range]) -> bool:
    """Whether the archive owns the second of `when` (the pure twin of :data:`ARCHIVE_OWNED`)."""
    start = second_floor(when)
    return any(lo <= start and start + ONE_SECOND <= hi for lo, hi in archive_coverage)


def hole_explained(window: Range, archive_coverage: Sequence[Range], id_coverage: Sequence[Range]) -> bool:
    """Whether a jump in stored trade ids between trades at the two ends of `window` is the
    archive's doing: the missing ids are trades of archive-owned seconds (stored without
    their ids), so nothing is missing. True when the window reaches into archive-owned time
    and every second of it (the end seconds whole: missing trades may share them) is either
    the archive's or covered by REST/WebSocket. A jump with no archive time inside is always
    a real hole, whatever coverage says (trades lost after they were covered)."""
    seconds = whole_seconds([window])
    if not ranges.intersect(seconds, archive_coverage):
        return False
    return not ranges.subtract(seconds, ranges.union(archive_coverage, id_coverage))


# --------------------------------------------------------------------------- database reads

def archive_touches(conn: psycopg.Connection, symbol: str, lo: datetime, hi: datetime) -> bool:
    """Whether the archive owns (part of) any second of ``[lo, hi)``: a writer's fast path
    probe before it COPYs without looking at ownership row by row."""
    row = conn.execute(ARCHIVE_TOUCHES, {"symbol": symbol, "lo": lo, "hi": hi}).fetchone()
    return bool(row and row[0])


def read_id_owned(conn: psycopg.Connection, symbol: str, lo: datetime, hi: datetime, *,
                  with_trades: bool = True) -> list[Range]:
    """Seconds of ``[lo, hi)`` (widened to whole seconds) the id family owns right now.
    Call it under :func:`lock_symbol` so the answer holds until the transaction ends.
    ``with_trades=False`` skips looking at stored trades (the caller knows there are none)."""
    if hi <= lo:
        return []
    (lo_s, hi_s), = whole_seconds([(lo, hi)])
    params = {"symbol": symbol, "lo": lo_s, "hi": hi_s, "sources": list(ID_SOURCES)}
    seconds = [row[0] for row in conn.execute(_ID_TRADE_SECONDS, params)] if with_trades else []
    covered = [(a, b) for a, b in conn.execute(_ID_COVERAGE, params)]
    return id_owned(seconds, covered)
