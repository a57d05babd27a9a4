"""The writer's local append-only spool: batches that could not (yet) go to PostgreSQL.

A spool is a directory of segment files replayed in name order; a segment is a sequence of
blocks (``spool_format``), one per batch, each written with a single ``os.write``. Trade
payloads are the very bytes the writer holds in memory, so spooling a batch costs one write
and replaying it one read, one CRC and one COPY; no per-row work in Python.

Damage: a killed process leaves at worst one torn last block (short, or failing its CRC),
which recovery drops and truncates, so later appends never follow garbage. A complete block
whose body fails its CRC is skipped and counted (``corrupt``); a header that fails its own
CRC ends the segment (its lengths cannot be trusted).

Durability policy: a block reaches the OS with its one write (it survives the process being
killed); the tail segment is ``fsync``-ed at most about once a second while it holds unsynced
blocks (the writer's spool-sync thread) and when it is sealed; spilled segments are
``fsync``-ed before they count. An OS crash can so lose about a second of spooled batches; a
process crash loses none of them. (Records still in the writer's in-memory buffer, at most
one batch, are lost with the process, as any in-memory buffer is.)

Ordering: appends go to the tail segment (numbers counting up), spills of older batches go in
front of everything (numbers counting down), so replaying in name order replays in acceptance
order. One process at a time owns a spool directory (``fcntl.flock`` on ``.lock``); which
database its records belong to is its label (``spool_labels``), and which slot a writer takes
is :func:`spool_claim.claim`'s choice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from kraken_hist.storage.writer.spool_format import TornBlock, encode_block, parse_block
from kraken_hist.storage.writer.spool_labels import LABEL_FILE, DatabaseIdentity

logger = logging.getLogger(__name__)

_FIRST_NUMBER = 500_000_000_000  # room to count down (spills) and up (appends)
_SUFFIX = ".spool"
SLOT_PREFIX = "slot-"
#: Start a new tail segment past this size, so fully replayed files are removed early.
MAX_SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True, eq=False)
class Block:
    """One pending block: where it is and what it holds. ``first_seq`` orders it among the
    writer's pending records; ``meta`` is the decoded JSON meta. ``sums`` is the writer's
    in-memory summary of the payload (never written: a recovered block has none)."""

    segment: "Segment"
    offset: int
    size: int  # whole block, header included
    kind: str
    count: int
    meta: dict
    first_seq: int
    sums: object = None


def read_blocks(blocks: list[Block]) -> list[bytes]:
    """The payloads of consecutive blocks of one segment, with one read, CRCs verified
    (ValueError if the file changed under us)."""
    segment = blocks[0].segment
    start = blocks[0].offset
    size = blocks[-1].offset + blocks[-1].size - start
    if segment.read_fd is None:
        segment.read_fd = os.open(segment.path, os.O_RDONLY)
    data = memoryview(os.pread(segment.read_fd, size, start))
    payloads = []
    for block in blocks:
        if block.segment is not segment:
            raise ValueError("blocks of one read must share a segment")
        try:
            parsed, _ = parse_block(data, block.offset - start)
        except (TornBlock, ValueError):
            parsed = None
        if parsed is None or parsed[0] != block.kind:
            raise ValueError(f"spool block at {segment.path}:{block.offset} is damaged")
        payloads.append(parsed[3])
    return payloads


@dataclass(slots=True, eq=False)
class Segment:
    number: int
    path: Path
    blocks: deque[Block] = field(default_factory=deque)  # pending, in order
    size: int = 0
    read_fd: int | None = None  # opened by read_blocks (the flush thread), closed when removed

    def close_reader(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None


# ---------------------------------------------------------------- the spool

class Spool:
    """Segment files under one directory, owned by this process while open. Not thread-safe:
    the writer serialises calls under its own lock (except :func:`read_blocks`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.segments: list[Segment] = []  # in replay order; the last may be the open tail
        self._lock_fd: int | None = None
        self._tail_fd: int | None = None
        self._tail: Segment | None = None
        self._dirty = False
        self.pending = 0  # records in pending blocks
        self.corrupt = 0  # damaged blocks skipped
        self.label: DatabaseIdentity | None = None  # from LABEL_FILE (read_label / write_label)
        self.created = 0.0  # when the label was first written (orders slots of one database)

    # -- ownership -----------------------------------------------------------
    @classmethod
    def open_free_slot(cls, root: Path) -> "Spool":
        """Lock and open the first spool slot under `root` that no living process owns."""
        root.mkdir(parents=True, exist_ok=True)
        for index in range(1024):
            spool = cls(root / f"{SLOT_PREFIX}{index}")
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

    # -- the label (which database) -----------------------------------------------
    def read_label(self) -> DatabaseIdentity | None:
        """Read LABEL_FILE (None when missing or unreadable)."""
        try:
            data = json.loads((self.directory / LABEL_FILE).read_text())
            self.label = DatabaseIdentity.from_json(data["database"])
            self.created = float(data.get("created") or 0.0)
        except FileNotFoundError:
            self.label = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("spool %s: unreadable %s (%s)", self.directory, LABEL_FILE, exc)
            self.label = None
        return self.label

    def write_label(self, identity: DatabaseIdentity, created: float | None = None) -> None:
        """Replace LABEL_FILE atomically (fsync-ed, then renamed, then the directory fsync-ed)."""
        if created is not None:
            self.created = created
        elif not self.created:
            self.created = time.time()
        body = json.dumps({"format": 1, "database": identity.to_json(), "created": self.created}, indent=1)
        temporary = self.directory / (LABEL_FILE + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.directory / LABEL_FILE)
        self._sync_directory()
        self.label = identity

    def has_segments(self) -> bool:
        """Whether the directory holds a non-empty segment file (intact or not)."""
        return any(path.stat().st_size for path in self.directory.glob("*" + _SUFFIX))

    def count_records(self) -> int:
        """Records in the directory's intact blocks, read only (nothing repaired)."""
        records = 0
        for path in self.directory.glob("*" + _SUFFIX):
            data = path.read_bytes()
            offset = 0
            while offset < len(data):
                try:
                    parsed, offset = parse_block(data, offset)
                except (TornBlock, ValueError):
                    break
                if parsed is not None:
                    records += parsed[1]
        return records

    def recover(self, next_seq: int, *, repair: bool = True) -> int:
        """Load the blocks a previous owner left (dropping a torn tail); number their records
        from `next_seq`. Returns how many records they hold. Without `repair` the files are
        left exactly as they are (a spool that may not be ours)."""
        seq = next_seq
        for path in sorted(self.directory.glob("*" + _SUFFIX)):
            segment = Segment(int(path.stem), path)
            data = path.read_bytes()
            offset = 0
            while offset < len(data):
                try:
                    parsed, stop = parse_block(data, offset)
                except TornBlock:
                    logger.warning("spool %s: torn last block (%d bytes) dropped", path, len(data) - offset)
                    break
                except ValueError:
                    self.corrupt += 1
                    logger.error("spool %s: damaged block header at byte %d; the rest of the file (%d bytes) "
                                 "is dropped", path, offset, len(data) - offset)
                    break
                if parsed is None:
                    self.corrupt += 1
                    logger.error("spool %s: damaged block at byte %d skipped", path, offset)
                else:
                    kind, count, meta, _ = parsed
                    segment.blocks.append(Block(segment, offset, stop - offset, kind, count, meta, seq))
                    seq += count
                offset = stop
            if offset < len(data) and repair:
                with path.open("r+b") as handle:
                    handle.truncate(offset)
            segment.size = offset
            if segment.blocks:
                self.segments.append(segment)
            elif repair:
                path.unlink()
        self.pending = seq - next_seq
        return self.pending

    def absorb(self, other: "Spool", *, front: bool) -> int:
        """Move the recovered segments of `other` (a spool of the same database) into this
        directory, in their order, in front of this spool's segments or (only while this
        spool has no open tail) behind them. Their blocks keep their numbers. Returns how
        many records came."""
        moving = list(other.segments)
        if not moving:
            return 0
        assert other._tail is None and (front or self._tail is None)
        if front:
            base = (self.segments[0].number if self.segments else _FIRST_NUMBER) - len(moving)
        else:
            base = (self.segments[-1].number if self.segments else _FIRST_NUMBER) + 1
        records = 0
        try:  # segment by segment: if a rename fails, each segment is still known where it is
            for index, segment in enumerate(moving):
                segment.close_reader()
                number = base + index
                path = self.directory / f"{number:012d}{_SUFFIX}"
                os.replace(segment.path, path)
                segment.number, segment.path = number, path
                count = sum(block.count for block in segment.blocks)
                other.segments.remove(segment)
                other.pending -= count
                self.segments.insert(index if front else len(self.segments), segment)
                self.pending += count
                records += count
        finally:
            self._sync_directory()
            other._sync_directory()
        self.corrupt += other.corrupt
        other.corrupt = 0
        return records

    def close(self) -> None:
        self.close_tail()
        for segment in self.segments:
            segment.close_reader()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing -------------------------------------------------------------
    def __bool__(self) -> bool:
        return self.pending > 0

    def append(self, kind: str, count: int, meta: dict, payload: bytes, first_seq: int) -> Block:
        """Append one block at the tail (one write)."""
        data = encode_block(kind, count, meta, payload)
        if self._tail is None or self._tail.size > MAX_SEGMENT_BYTES:
            self._open_tail()
        tail = self._tail
        assert tail is not None and self._tail_fd is not None
        _write_all(self._tail_fd, data)
        block = Block(tail, tail.size, len(data), kind, count, meta, first_seq)
        tail.size += len(data)
        tail.blocks.append(block)
        self.pending += count
        self._dirty = True
        return block

    def prepend(self, blocks: list[tuple[str, int, dict, bytes, int]]) -> int:
        """Write older batches ((kind, count, meta, payload, first_seq)) as a new first
        segment, fsync-ed before returning; returns how many records."""
        if not blocks:
            return 0
        number = (self.segments[0].number if self.segments else _FIRST_NUMBER) - 1
        segment = Segment(number, self.directory / f"{number:012d}{_SUFFIX}")
        encoded = []
        for kind, count, meta, payload, first_seq in blocks:
            data = encode_block(kind, count, meta, payload)
            segment.blocks.append(Block(segment, segment.size, len(data), kind, count, meta, first_seq))
            segment.size += len(data)
            encoded.append(data)
        fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, b"".join(encoded))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_directory()
        self.segments.insert(0, segment)
        records = sum(b.count for b in segment.blocks)
        self.pending += records
        return records

    def _open_tail(self) -> None:
        self.close_tail()
        number = (self.segments[-1].number if self.segments else _FIRST_NUMBER) + 1
        path = self.directory / f"{number:012d}{_SUFFIX}"
        self._tail_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._sync_directory()
        self._tail = Segment(number, path)
        self.segments.append(self._tail)

    def close_tail(self) -> None:
        """Seal the tail (fsync); the next append starts a new segment."""
        if self._tail_fd is not None:
            os.fsync(self._tail_fd)
            os.close(self._tail_fd)
        self._tail_fd = None
        self._tail = None
        self._dirty = False

    def take_sync_fd(self) -> int | None:
        """A duplicate of the dirty tail's descriptor to fsync outside the caller's lock
        (the caller closes it); None when nothing is unsynced."""
        if not self._dirty or self._tail_fd is None:
            return None
        self._dirty = False
        return os.dup(self._tail_fd)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- replay --------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """Pending blocks in replay order."""
        return [block for segment in self.segments for block in segment.blocks]

    def first(self) -> Block | None:
        for segment in self.segments:
            if segment.blocks:
                return segment.blocks[0]
        return None

    def done(self, block: Block) -> None:
        """Forget a replayed block; a segment left without pending blocks is removed (the
        tail too: nothing in it needs to survive any more)."""
        segment = block.segment
        segment.blocks.remove(block)
        self.pending -= block.count
        if segment.blocks:
            return
        if segment is self._tail:
            assert self._tail_fd is not None
            os.close(self._tail_fd)
            self._tail_fd = None
            self._tail = None
            self._dirty = False
        segment.close_reader()
        segment.path.unlink(missing_ok=True)
        self.segments.remove(segment)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
