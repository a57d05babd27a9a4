"""The writer's local append-only spool: records that could not (yet) go to PostgreSQL.

A spool is a directory of segment files replayed in name order. Each line is one record,
``<crc32 hex>\\t<kind>\\t<fields...>\\n``, written with one ``os.write`` per append, so a
killed process leaves at worst one torn last line (detected by its missing newline or
checksum, and dropped). Durability policy: every append reaches the OS at once (survives
the process being killed); the tail segment is ``fsync``-ed by :meth:`Spool.sync` (the
writer calls it at most once a second while dirty, and on stop), spilled segments are
``fsync``-ed before they count. An OS crash or power loss can so lose at most about one
second of spooled records; a process crash loses none.

Ordering: segments are numbered; appends go to the tail (numbers counting up), spills of
older records go in front of everything (numbers counting down), so replaying in name
order replays in acceptance order. One process at a time owns a spool directory
(``fcntl.flock`` on ``.lock``); the writer picks the first free slot under its spool root.
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

_FIRST_NUMBER = 500_000_000_000  # room to count down (spills) and up (appends)
_SUFFIX = ".spool"
#: Start a new tail segment past this size, so replays read moderate files.
MAX_SEGMENT_BYTES = 16 * 1024 * 1024

TRADE = "T"
CANDLE = "C"
SYNC = "S"

_NULL = ""  # None is stored as an empty field; no stored text field can be empty otherwise


@dataclass(slots=True)
class Segment:
    """One spool file; ``first_seq`` orders it among the writer's pending records."""

    number: int
    path: Path
    records: int
    first_seq: int
    done: int = 0  # records at the start already committed (skipped on a retry in this process)


# ---------------------------------------------------------------- encoding

def _opt(value: object) -> str:
    return _NULL if value is None else str(value)


def encode_trade(row: tuple) -> str:
    """(symbol, trade_id, time, price, volume, side, ord_type, source) → spool body."""
    symbol, trade_id, time, price, volume, side, ord_type, source = row
    return f"{TRADE}\t{symbol}\t{trade_id}\t{time.isoformat()}\t{price}\t{volume}\t{_opt(side)}\t{_opt(ord_type)}\t{source}"


def encode_candle(row: tuple) -> str:
    """(symbol, time, open, high, low, close, vwap, volume, trades, source) → spool body."""
    symbol, time, open_, high, low, close, vwap, volume, trades, source = row
    return (
        f"{CANDLE}\t{symbol}\t{time.isoformat()}\t{open_}\t{high}\t{low}\t{close}\t{_opt(vwap)}"
        f"\t{volume}\t{trades}\t{source}"
    )


def encode_sync(row: tuple) -> str:
    """(symbol, data_type, time, cursor, last_trade_id, details_json) → spool body."""
    symbol, data_type, time, cursor, last_trade_id, details_json = row
    fields = (symbol, data_type, _opt(time and time.isoformat()), _opt(cursor), _opt(last_trade_id), details_json)
    for value in fields:
        if "\t" in value or "\n" in value:
            raise ValueError(f"sync status field {value!r} must not contain tabs or newlines")
    return f"{SYNC}\t" + "\t".join(fields)


def _none(text: str) -> str | None:
    return None if text == _NULL else text


def decode(body: str) -> tuple[str, tuple]:
    """Spool body → (kind, row) in the shape the encoders took."""
    kind, _, rest = body.partition("\t")
    f = rest.split("\t")
    if kind == TRADE:
        return kind, (
            f[0], int(f[1]), datetime.fromisoformat(f[2]), Decimal(f[3]), Decimal(f[4]),
            _none(f[5]), _none(f[6]), f[7],
        )
    if kind == CANDLE:
        vwap = _none(f[6])
        return kind, (
            f[0], datetime.fromisoformat(f[1]), Decimal(f[2]), Decimal(f[3]), Decimal(f[4]), Decimal(f[5]),
            None if vwap is None else Decimal(vwap), Decimal(f[7]), int(f[8]), f[9],
        )
    if kind == SYNC:
        time, cursor, last_id = _none(f[2]), _none(f[3]), _none(f[4])
        return kind, (
            f[0], f[1], None if time is None else datetime.fromisoformat(time), cursor,
            None if last_id is None else int(last_id), f[5],
        )
    raise ValueError(f"unknown spool record kind {kind!r}")


def frame(body: str) -> bytes:
    data = body.encode()
    return b"%08x\t%s\n" % (zlib.crc32(data), data)


def _unframe(line: bytes) -> str | None:
    """The body of a whole, intact line; None when torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b"\t":
        return None
    data = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(data):
            return None
    except ValueError:
        return None
    return data.decode()


# ---------------------------------------------------------------- the spool

class Spool:
    """Segment files under one directory, owned by this process while open. Not thread-safe:
    the writer serialises calls under its own lock (appends) or its flush thread (reads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.segments: list[Segment] = []  # in replay order; the last may be the open tail
        self._lock_fd: int | None = None
        self._tail_fd: int | None = None
        self._tail: Segment | None = None
        self._tail_bytes = 0
        self._dirty = False
        self.corrupt = 0  # damaged lines skipped

    # -- ownership -----------------------------------------------------------
    @classmethod
    def open_free_slot(cls, root: Path) -> "Spool":
        """Lock and open the first spool slot under `root` that no living process owns."""
        root.mkdir(parents=True, exist_ok=True)
        for index in range(1024):
            spool = cls(root / f"slot-{index}")
            if spool._try_lock():
                return spool
        raise RuntimeError(f"no free spool slot under {root}")

    def _try_lock(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def recover(self, next_seq: int) -> int:
        """Load the segments a previous owner left (dropping torn tails); number their records
        from `next_seq`. Returns how many records they hold."""
        total = 0
        for path in sorted(self.directory.glob("*" + _SUFFIX)):
            count = self._repair(path)
            if count == 0:
                path.unlink()
                continue
            self.segments.append(Segment(int(path.stem), path, count, next_seq + total))
            total += count
        return total

    def _repair(self, path: Path) -> int:
        """Count intact records; cut a torn last line so later appends never follow garbage."""
        count = 0
        good_end = 0
        offset = 0
        with path.open("rb") as handle:
            for line in handle:
                offset += len(line)
                if _unframe(line) is None:
                    if line.endswith(b"\n"):
                        self.corrupt += 1
                        logger.error("spool %s: damaged record at byte %d skipped", path, offset - len(line))
                        good_end = offset
                    continue
                count += 1
                good_end = offset
        if good_end < offset:
            logger.warning("spool %s: torn last record (%d bytes) dropped", path, offset - good_end)
            with path.open("r+b") as handle:
                handle.truncate(good_end)
        return count

    def close(self) -> None:
        self.close_tail()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing -------------------------------------------------------------
    @property
    def pending(self) -> int:
        return sum(s.records - s.done for s in self.segments)

    def __bool__(self) -> bool:
        return bool(self.segments)

    def append(self, bodies: Iterable[str], first_seq: int) -> int:
        """Append records at the tail (one write); returns how many."""
        data = b"".join(frame(b) for b in bodies)
        if not data:
            return 0
        count = data.count(b"\n")
        if self._tail is None or self._tail_bytes > MAX_SEGMENT_BYTES:
            self._open_tail(first_seq)
        assert self._tail is not None and self._tail_fd is not None
        _write_all(self._tail_fd, data)
        self._tail_bytes += len(data)
        self._tail.records += count
        self._dirty = True
        return count

    def prepend(self, bodies: Iterable[str], first_seq: int) -> int:
        """Write older records as a new first segment, fsync-ed before returning."""
        data = b"".join(frame(b) for b in bodies)
        if not data:
            return 0
        number = (self.segments[0].number if self.segments else _FIRST_NUMBER) - 1
        path = self.directory / f"{number:012d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_directory()
        count = data.count(b"\n")
        self.segments.insert(0, Segment(number, path, count, first_seq))
        return count

    def _open_tail(self, first_seq: int) -> None:
        self.close_tail()
        number = (self.segments[-1].number if self.segments else _FIRST_NUMBER) + 1
        path = self.directory / f"{number:012d}{_SUFFIX}"
        self._tail_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._sync_directory()
        self._tail = Segment(number, path, 0, first_seq)
        self._tail_bytes = 0
        self.segments.append(self._tail)

    def close_tail(self) -> None:
        """Seal the tail (fsync); the next append starts a new segment."""
        if self._tail_fd is not None:
            os.fsync(self._tail_fd)
            os.close(self._tail_fd)
        self._tail_fd = None
        self._tail = None
        self._dirty = False

    def sync(self) -> None:
        """fsync the tail if it has unsynced appends."""
        if self._dirty and self._tail_fd is not None:
            os.fsync(self._tail_fd)
            self._dirty = False

    def take_sync_fd(self) -> int | None:
        """A duplicate of the dirty tail's descriptor to fsync outside the caller's lock
        (the caller closes it); None when nothing is unsynced."""
        if not self._dirty or self._tail_fd is None:
            return None
        self._dirty = False
        return os.dup(self._tail_fd)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- replay --------------------------------------------------------------
    def sealed(self) -> list[Segment]:
        """Segments no longer appended to, in replay order."""
        return [s for s in self.segments if s is not self._tail]

    def read(self, segment: Segment, chunk: int) -> Iterator[list[tuple[str, tuple]]]:
        """Decoded records of `segment` after its committed prefix, `chunk` at a time."""
        batch: list[tuple[str, tuple]] = []
        index = 0
        with segment.path.open("rb") as handle:
            for line in handle:
                body = _unframe(line)
                if body is None:
                    continue  # counted and reported by recover()/the torn tail; never replayed
                index += 1
                if index <= segment.done:
                    continue
                batch.append(decode(body))
                if len(batch) >= chunk:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def remove(self, segment: Segment) -> None:
        """Forget a fully replayed segment."""
        segment.path.unlink(missing_ok=True)
        self.segments.remove(segment)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
