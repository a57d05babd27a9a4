"""Which trade ids of one pair the live stream has handed to the writer: a pure state machine.

Kraken's trade ids are contiguous per pair, so continuity is checked id by id. Per symbol an
:class:`IdSequence` keeps the *frontier* (every id of the record up to it has been handed to
the writer), the highest id seen, and the holes between them; :meth:`IdSequence.next_fetch`
says which ids REST must fetch next (:class:`Fetch`). No I/O, clock, lock or thread: the
integration (``kraken_hist.ingest.live``) holds its lock around every call and does the paging.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from kraken_hist.core.timeutils import floor_minute, to_unix_ns

ONE_MICROSECOND = timedelta(microseconds=1)
#: REST fetches start this much before the last trade we hold: the same trade's time may
#: differ by a microsecond between REST and WebSocket, and duplicates are dropped by id anyway.
REST_MARGIN_NS = 1_000_000

# What IdSequence.accept says about one trade (ordered: NEW and OPENED mean "hand it over").
OLD = 0  # already handed over (a snapshot replay, REST/WebSocket overlap)
EARLY = 1  # before the record's start: the archive's, or older than the minute this record starts in
NEW = 2  # hand it over
OPENED = 3  # hand it over; ids just below it are missing (a new hole: wake the catch-up)


@dataclass(frozen=True, slots=True)
class Hole:
    """Missing ids ``lo..hi``; ``after`` is the time of trade ``lo - 1`` (REST pages by time, so
    fetching starts just before it). ``lo`` None: the lower end is not known yet — the hole runs
    from the first trade at/after ``after`` (the record's anchor) up to ``hi``."""

    lo: int | None
    hi: int
    after: datetime

    @property
    def since(self) -> int:
        """The REST Trades ``since`` (ns, exclusive) to fetch this hole from. With ``lo`` unknown,
        exactly the anchor minus 1 ns: nothing older is requested (it is the archive's)."""
        return to_unix_ns(self.after) - (1 if self.lo is None else REST_MARGIN_NS)


@dataclass(frozen=True, slots=True)
class Fetch:
    """One REST catch-up job: ids ``lo..hi`` (``hi`` None: whatever REST has after them), paged
    from ``since`` (ns, exclusive). ``lo`` None: the pages start at the record's anchor, and their
    first trade at/after it is the first id of the record."""

    lo: int | None
    hi: int | None
    since: int


class IdSequence:
    """Which trade ids of one pair have been handed to the writer: a pure state machine (no I/O,
    clock or lock — the integration holds its lock around every call; threads and REST paging
    stay outside).

    The *record* is the ids ``start..max_seen``: each handed over exactly once, except the
    ``holes`` (sorted, disjoint, below ``max_seen``). The ``frontier`` is the highest id with
    every id of the record up to it handed over — what may be written down as the resume point.

    ``start`` may not be known (``pending``): after an archive ("everything before ``anchor`` is
    stored, the first Kraken id after it is not known") or on a fresh start (the anchor is the
    start of the first trade's minute, so that minute is stored whole). Then the record begins
    with the first trade at/after ``anchor``: trades before it are ``EARLY`` (never handed over),
    later ones are handed over as they come and the ids below the lowest of them form a hole
    ``(None, hi)``, and ``start`` is fixed by REST pages fetched from the anchor (``accept(...,
    fixes_start=True)``: the first of their trades at/after the anchor is the first id after it).
    Until then the frontier is unknown (None) and nothing is written down. ``exact=False`` (no
    REST to ask): the first trade at/after the anchor starts the record; a fresh record starts at
    its first trade.
    """

    __slots__ = ("exact", "pending", "anchor", "origin", "max_seen", "max_seen_time", "holes", "covered_from",
                 "tail_check")

    def __init__(self, *, exact: bool = True) -> None:
        """A fresh record: nothing known yet; its first trade decides where it starts."""
        self.exact = exact
        self.pending = True  # the record's first id is not known yet
        self.anchor: datetime | None = None  # while pending: trades before it are not ours
        self.origin: int | None = None  # REST is never asked for anything before this `since` (anchor - 1 ns)
        self.max_seen: int | None = None
        self.max_seen_time: datetime | None = None
        self.holes: list[Hole] = []
        self.covered_from: datetime | None = None  # start of the time range the record vouches for
        self.tail_check = False  # ask REST what came after max_seen (after a reconnect)

    @classmethod
    def resume(cls, last_id: int, last_time: datetime, *, exact: bool = True) -> "IdSequence":
        """Every id up to `last_id` (traded at `last_time`) is stored."""
        seq = cls(exact=exact)
        seq.pending = False
        seq.max_seen, seq.max_seen_time, seq.covered_from = last_id, last_time, last_time
        return seq

    @classmethod
    def after(cls, anchor: datetime, *, exact: bool = True) -> "IdSequence":
        """Everything before `anchor` is stored (an archive ends there); the first id after it is
        not known. With REST, catch-up starts at once from the anchor."""
        seq = cls(exact=exact)
        seq.anchor = anchor
        seq.origin = to_unix_ns(anchor) - 1
        if exact:
            seq.covered_from = anchor
            seq.tail_check = True
        return seq

    def copy(self) -> "IdSequence":
        twin = IdSequence.__new__(IdSequence)
        for name in self.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.holes = list(self.holes)
        return twin

    # --- transitions ----------------------------------------------------------------------

    def accept(self, trade_id: int, when: datetime, fixes_start: bool = False) -> int:
        """Place one trade; returns OLD, EARLY, NEW or OPENED. `fixes_start`: the trade comes
        from REST pages fetched from the anchor (a :class:`Fetch` with ``lo`` None)."""
        if self.pending:
            anchor = self.anchor
            if anchor is None:  # a fresh record: its first trade decides where it starts
                if not self.exact:
                    return self._start(trade_id, when)
                anchor = self.anchor = self.covered_from = floor_minute(when)
                self.origin = to_unix_ns(anchor) - 1
            if when < anchor:
                return EARLY
            if fixes_start or not self.exact:
                return self._start(trade_id, when)
            if self.max_seen is None:
                self.max_seen, self.max_seen_time = trade_id, when
                self.holes.append(Hole(None, trade_id - 1, anchor))
                return OPENED
        return self._place(trade_id, when)

    def append_run(self, last_id: int, last_time: datetime) -> None:
        """Ids ``max_seen + 1 .. last_id`` were handed over (the caller checked they continue
        the sequence with no gap: they land above every hole, and — above an id at/after the
        anchor — after the anchor)."""
        self.max_seen, self.max_seen_time = last_id, last_time

    def request_tail(self) -> None:
        """Ask REST what traded after the newest id we hold (the stream was away)."""
        if self.max_seen is not None or self.anchor is not None:
            self.tail_check = True

    def next_fetch(self) -> Fetch | None:
        """The REST job this record needs first: its lowest hole, else a requested tail check
        (which it consumes), else None."""
        if self.holes:
            hole = self.holes[0]
            return Fetch(hole.lo, hole.hi, self.since(hole))
        if not self.tail_check:
            return None
        self.tail_check = False
        if self.pending:
            return None if self.origin is None else Fetch(None, None, self.origin)
        assert self.max_seen is not None and self.max_seen_time is not None
        return Fetch(self.max_seen + 1, None, self._clamp(to_unix_ns(self.max_seen_time) - REST_MARGIN_NS))

    def since(self, hole: Hole) -> int:
        """Where REST pages for `hole` start: just before it, never before the record's anchor."""
        return self._clamp(hole.since)

    def _clamp(self, since: int) -> int:
        return since if self.origin is None or since > self.origin else self.origin

    def _start(self, trade_id: int, when: datetime) -> int:
        """`trade_id` is the first id of the record (the first trade at/after the anchor)."""
        self.pending = False
        self.anchor = None
        if self.max_seen is None:
            self.max_seen, self.max_seen_time = trade_id, when
            if self.covered_from is None:
                self.covered_from = when + ONE_MICROSECOND  # same-instant trades before it unknown
            return NEW
        first = self.holes[0]  # (None, hi): every id handed over so far is above hi
        if trade_id <= first.hi:
            self.holes[0] = Hole(trade_id, first.hi, first.after)
        else:  # we hold it already (hi + 1) — or sources disagree on a time at the boundary:
            del self.holes[0]  # the record starts at the lowest id we hold
        return self._place(trade_id, when)

    def _place(self, trade_id: int, when: datetime) -> int:
        top = self.max_seen
        assert top is not None
        if trade_id > top:
            verdict = NEW
            if trade_id > top + 1:
                assert self.max_seen_time is not None
                self.holes.append(Hole(top + 1, trade_id - 1, self.max_seen_time))
                verdict = OPENED
            self.max_seen, self.max_seen_time = trade_id, when
            return verdict
        holes = self.holes
        for index, hole in enumerate(holes):
            if trade_id > hole.hi:
                continue
            if hole.lo is not None and trade_id < hole.lo:
                return OLD
            pieces = []
            if hole.lo is None or trade_id > hole.lo:
                pieces.append(Hole(hole.lo, trade_id - 1, hole.after))
            if trade_id < hole.hi:
                pieces.append(Hole(trade_id + 1, hole.hi, when))
            holes[index:index + 1] = pieces
            return NEW
        return OLD

    # --- reading --------------------------------------------------------------------------

    @property
    def frontier(self) -> int | None:
        """Every id of the record up to here is handed over (None: not known yet)."""
        if self.pending:
            return None
        if self.holes:
            lo = self.holes[0].lo
            assert lo is not None
            return lo - 1
        return self.max_seen

    @property
    def frontier_time(self) -> datetime | None:
        if self.pending:
            return None
        return self.holes[0].after if self.holes else self.max_seen_time

    def still_missing(self, lo: int | None, hi: int) -> list[Hole]:
        """The holes overlapping ids ``lo..hi`` (``lo`` None: from the record's start)."""
        return [h for h in self.holes if (h.lo is None or h.lo <= hi) and (lo is None or h.hi >= lo)]

    def missing_ids(self) -> int:
        """How many ids are known missing (holes whose lower end is not known yet not counted)."""
        return sum(h.hi - h.lo + 1 for h in self.holes if h.lo is not None)

    def open_holes(self) -> list[tuple[int | None, int]]:
        return [(h.lo, h.hi) for h in self.holes]
