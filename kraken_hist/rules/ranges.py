"""Range algebra: union, difference, intersection and runs of half-open ranges, defined once.

A *range list* is a list of half-open ``(start, end)`` pairs. Every function that returns
one guarantees the invariants, whatever order or overlap its input had:

* sorted by start;
* disjoint and not touching (``a.end < b.start`` for consecutive ranges: touching or
  overlapping input is merged);
* no empty ranges (``start < end``) — so a complete history gives ``[]``.

The functions are generic: datetimes, ints (trade ids as ``[first, last + 1)``), anything
ordered. Gap detection and filling, the backfill's coverage, the refresh's windows, the archive's
ownership and the writer's touched minutes all use these.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from kraken_hist.core.timeutils import floor_minute

T = TypeVar("T", bound=Any)
Range = tuple[T, T]

ONE_MINUTE = timedelta(minutes=1)


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sort, merge overlapping or touching ranges, drop empty ones."""
    out: list[Range] = []
    for start, end in sorted((r for r in ranges if r[0] < r[1]), key=lambda r: r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def union(*range_lists: Iterable[Range]) -> list[Range]:
    """Everything in any of the lists."""
    return normalize(r for ranges in range_lists for r in ranges)


def subtract(ranges: Iterable[Range], holes: Iterable[Range]) -> list[Range]:
    """The parts of `ranges` not in `holes` (one merge-like pass over both sorted lists)."""
    base, cut = normalize(ranges), normalize(holes)
    out: list[Range] = []
    j = 0
    for start, end in base:
        cursor = start
        while j < len(cut) and cut[j][1] <= cursor:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > cursor:
                out.append((cursor, cut[k][0]))
            cursor = max(cursor, cut[k][1])
            if cursor >= end:
                break
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def intersect(a: Iterable[Range], b: Iterable[Range]) -> list[Range]:
    """The parts present in both lists."""
    left, right = normalize(a), normalize(b)
    out: list[Range] = []
    i = j = 0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if start < end:
            out.append((start, end))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def complement(ranges: Iterable[Range], lo: T, hi: T) -> list[Range]:
    """What ``[lo, hi)`` holds outside `ranges`: the holes of a span."""
    return subtract([(lo, hi)], ranges)


def clip(ranges: Iterable[Range], lo: T | None = None, hi: T | None = None) -> list[Range]:
    """`ranges` cut to ``[lo, hi)`` (an open side when None)."""
    out: list[Range] = []
    for start, end in normalize(ranges):
        start = start if lo is None or start >= lo else lo
        end = end if hi is None or end <= hi else hi
        if start < end:
            out.append((start, end))
    return out


def total(ranges: Iterable[Range], zero: Any = 0) -> Any:
    """Summed length of the (normalized) ranges; pass ``timedelta(0)`` for datetimes."""
    length = zero
    for start, end in normalize(ranges):
        length = length + (end - start)
    return length


def missing_id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Runs ``(first_missing, last_missing)`` between consecutive ids of an ascending sequence.

    The pure twin of the SQL hole finder (``lag(trade_id)`` over the primary key): Kraken's
    trade ids are contiguous per pair, so any jump is exactly the ids that are missing.
    """
    runs: list[tuple[int, int]] = []
    previous: int | None = None
    for trade_id in ids:
        if previous is not None:
            if trade_id <= previous:
                raise ValueError(f"ids must be strictly ascending: {trade_id} after {previous}")
            if trade_id > previous + 1:
                runs.append((previous + 1, trade_id - 1))
        previous = trade_id
    return runs


def minute_runs(minutes: Iterable[datetime]) -> list[Range]:
    """Whole-minute ranges covering the given minute starts, consecutive minutes merged."""
    return normalize((floor_minute(m), floor_minute(m) + ONE_MINUTE) for m in minutes)


def number_runs(numbers: Iterable[int], gap: int = 1) -> list[tuple[int, int]]:
    """Half-open runs ``[first, last + 1)`` covering the given integers (any order, repeats
    allowed), numbers at most `gap` apart joined into one run (gap 1: only consecutive ones)."""
    ordered = sorted(set(numbers))
    runs: list[tuple[int, int]] = []
    if not ordered:
        return runs
    start = prev = ordered[0]
    for number in ordered[1:]:
        if number - prev > gap:
            runs.append((start, prev + 1))
            start = number
        prev = number
    runs.append((start, prev + 1))
    return runs
