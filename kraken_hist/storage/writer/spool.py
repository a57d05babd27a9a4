"""The writer's local append-only spool: batches that could not (yet) go to PostgreSQL.

A spool is a directory of segment files replayed in name order; a segment is a sequence of
**blocks**, one per batch, each written with a single ``os.write``::

    header  (25 bytes) magic "KHS1", kind, record count, meta length, payload length,
                       CRC32 of meta + payload, CRC32 of the header's first 21 bytes
    meta    JSON: for trade blocks {symbol: [lowest id, highest id, [touched minutes]]}
    payload trade blocks: the rows as PostgreSQL COPY text (fed to COPY unchanged);
            candle and sync blocks: one tab-separated line per record (``encode_*``)

Trade payloads are the very bytes the writer holds in memory, so spooling a batch costs one
write and replaying it one read, one CRC and one COPY; no per-row work in Python. (CRCs use
``binascii.crc32``, which keeps the GIL: a spool call never hands the interpreter to another
thread mid-way, and both the producer and the flush thread would wait to get it back.)

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
order. One process at a time owns a spool directory (``fcntl.flock`` on ``.lock``).

Ownership by database: a spool belongs to one database, named in the slot's ``database.json``
(written atomically before the slot holds anything): the server's ``system_identifier``
(``pg_control_system()``) and the database's oid, which name it however it is reached, and a
password-free ``host:port/dbname`` for messages. A writer that has not reached its server yet
writes only the description (a *pending* label) and completes it once it has. :func:`claim`
picks a writer's slot and decides about every unowned slot holding records:

* labelled with the writer's database (or pending with the same description): replayed by it
  (several such slots are merged, oldest label first);
* labelled with another database: :class:`SpoolOwnerError`; nothing is replayed or removed;
* labelled, while the writer's own server cannot be reached: *held* (records numbered, files
  untouched) until the writer reads its identity, then replayed or released (see the writer);
* unlabelled (written before spools recorded their database) or with an unreadable label:
  refused like another database's, unless the caller vouches for it (``adopt_unlabelled``),
  since nothing in it says where it was meant to go.
"""

from __future__ import annotations

import binascii
import fcntl
import json
import logging
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from kraken_hist.core.errors import PermanentError

logger = logging.getLogger(__name__)

_FIRST_NUMBER = 500_000_000_000  # room to count down (spills) and up (appends)
_SUFFIX = ".spool"
LABEL_FILE = "database.json"  # which database the slot's records belong to
_SLOT_PREFIX = "slot-"
#: Start a new tail segment past this size, so fully replayed files are removed early.
MAX_SEGMENT_BYTES = 16 * 1024 * 1024

TRADE = "T"
CANDLE = "C"
SYNC = "S"

MAGIC = b"KHS1"
_HEAD = struct.Struct("<4scIIII")  # magic, kind, count, meta length, payload length, body crc
_HEADER = struct.Struct("<4scIIIII")  # ... + header crc
HEADER_SIZE = _HEADER.size

_NULL = ""  # None is stored as an empty field; no stored text field can be empty otherwise


# ---------------------------------------------------------------- record lines (candles, syncs)

def _opt(value: object) -> str:
    return _NULL if value is None else str(value)


def encode_candle(row: tuple) -> str:
    """(symbol, time, open, high, low, close, vwap, volume, trades, source) → one line (no newline)."""
    symbol, time, open_, high, low, close, vwap, volume, trades, source = row
    return (
        f"{CANDLE}\t{symbol}\t{time.isoformat()}\t{open_}\t{high}\t{low}\t{close}\t{_opt(vwap)}"
        f"\t{volume}\t{trades}\t{source}"
    )


def encode_sync(row: tuple) -> str:
    """(symbol, data_type, time, cursor, last_trade_id, details_json) → one line (no newline)."""
    symbol, data_type, time, cursor, last_trade_id, details_json = row
    fields = (symbol, data_type, _opt(time and time.isoformat()), _opt(cursor), _opt(last_trade_id), details_json)
    for value in fields:
        if "\t" in value or "\n" in value:
            raise ValueError(f"sync status field {value!r} must not contain tabs or newlines")
    return f"{SYNC}\t" + "\t".join(fields)


def _none(text: str) -> str | None:
    return None if text == _NULL else text


def decode(body: str) -> tuple[str, tuple]:
    """A candle or sync line → (kind, row) in the shape the encoders took."""
    kind, _, rest = body.partition("\t")
    f = rest.split("\t")
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


def encode_lines(bodies: list[str]) -> bytes:
    """Candle/sync lines → a block payload."""
    return ("\n".join(bodies) + "\n").encode() if bodies else b""


def decode_lines(payload: bytes) -> list[tuple[str, tuple]]:
    return [decode(line) for line in payload.decode().splitlines()]


# ---------------------------------------------------------------- blocks

def encode_block(kind: str, count: int, meta: dict, payload: bytes) -> bytes:
    """One block: header, JSON meta, payload."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
    crc = binascii.crc32(payload, binascii.crc32(meta_bytes))
    head = _HEAD.pack(MAGIC, kind.encode(), count, len(meta_bytes), len(payload), crc)
    return b"".join((head, struct.pack("<I", binascii.crc32(head)), meta_bytes, payload))


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
        except (_Torn, ValueError):
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


class _Torn(Exception):
    """Too few bytes for the block the header announces (or for a header)."""


def parse_block(data: bytes | memoryview, offset: int) -> tuple[tuple[str, int, dict, bytes] | None, int]:
    """Parse the block at `offset`: ((kind, count, meta, payload) or None if its body is
    corrupt, offset after it). Raises _Torn when the data ends inside it and ValueError when
    its header is damaged."""
    end = offset + HEADER_SIZE
    if end > len(data):
        raise _Torn
    magic, kind, count, meta_len, payload_len, crc, head_crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC or binascii.crc32(data[offset:end - 4]) != head_crc:
        raise ValueError("damaged block header")
    meta_end = end + meta_len
    stop = meta_end + payload_len
    if stop > len(data):
        raise _Torn
    meta_bytes = bytes(data[end:meta_end])
    payload = bytes(data[meta_end:stop])
    if binascii.crc32(payload, binascii.crc32(meta_bytes)) != crc:
        return None, stop
    meta = json.loads(meta_bytes) if meta_bytes else {}
    return (kind.decode(), count, meta, payload), stop


# ---------------------------------------------------------------- which database a spool belongs to

class SpoolOwnerError(PermanentError):
    """A spool holds records of another database (or of an unknown one): kept, not replayed."""


@dataclass(frozen=True, slots=True)
class DatabaseIdentity:
    """A database as a spool label names it. ``system_identifier`` (the server's, from
    ``pg_control_system()``) and ``database_oid`` identify it however it is reached (None
    until the server has answered); ``description`` (``host:port/dbname``, never a password)
    is for messages."""

    description: str
    system_identifier: str | None = None
    database_oid: int | None = None
    database: str | None = None

    @property
    def known(self) -> bool:
        return self.system_identifier is not None and self.database_oid is not None

    def __str__(self) -> str:
        if self.known:
            return f"{self.description} (server {self.system_identifier}, database oid {self.database_oid})"
        return f"{self.description} (server not reached yet)"

    def to_json(self) -> dict[str, Any]:
        return {"description": self.description, "system_identifier": self.system_identifier,
                "database_oid": self.database_oid, "database": self.database}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DatabaseIdentity":
        oid = data.get("database_oid")
        sysid = data.get("system_identifier")
        return cls(str(data["description"]), None if sysid is None else str(sysid),
                   None if oid is None else int(oid), data.get("database"))


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a libpq URL or conninfo string (no user, no password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "?"
    host = info.get("host") or info.get("hostaddr") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or '?'}"


_IDENTITY_QUERY = """
SELECT (SELECT system_identifier FROM pg_control_system())::text, d.oid::bigint, d.datname
FROM pg_database d WHERE d.datname = current_database()
"""


def read_identity(conn: psycopg.Connection, description: str) -> DatabaseIdentity:
    """The identity of the database `conn` is connected to."""
    sysid, oid, name = conn.execute(_IDENTITY_QUERY).fetchone()  # type: ignore[misc]
    return DatabaseIdentity(description, sysid, oid, name)


def same_database(label: DatabaseIdentity, current: DatabaseIdentity) -> bool | None:
    """Whether a spool labelled `label` belongs to the database `current`; None while that
    cannot be told (a full label, and the current server not reached yet). A pending label
    (its writer never reached its server) is matched by description."""
    if label.known and current.known:
        return (label.system_identifier, label.database_oid) == (current.system_identifier, current.database_oid)
    if label.known:
        return None
    return label.description == current.description


def foreign_message(directory: Path, records: int, label: DatabaseIdentity | None, current: DatabaseIdentity) -> str:
    """One line: whose records a spool holds, that they are kept, and what to do."""
    where = f"spool {directory} holds {records:,} records"
    if label is None:
        return (f"{where} written without a record of their database (by an older kraken_hist); they are kept "
                f"and not replayed: if they belong to {current.description}, replay them there once with "
                f"adopt_unlabelled_spool=True (kraken-hist stream --adopt-unlabelled-spool), otherwise move "
                f"{directory} out of {directory.parent}")
    return (f"{where} for database {label}, not for {current}, the database this writer uses; they are kept "
            f"and not replayed: point KRAKEN_HIST_DATABASE_URL at {label.description} to replay them there, "
            f"or move {directory} out of {directory.parent} to go on without them")


# ---------------------------------------------------------------- the spool

class Spool:
    """Segment files under one directory, owned by this process while open. Not thread-safe:
    the writer serialises calls under its own lock (except :meth:`Block.read`)."""

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
                except (_Torn, ValueError):
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
                except _Torn:
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


@dataclass(slots=True)
class Claim:
    """What :func:`claim` found: the writer's spool (recovered, labelled), the spools held
    until the writer's server is reached (recovered, files untouched, numbered first), and
    how many records all of them hold (numbered 1..recovered)."""

    spool: Spool
    held: list[Spool]
    recovered: int


def claim(root: Path, identity: DatabaseIdentity, *, adopt_unlabelled: bool = False) -> Claim:
    """Lock and open a spool slot under `root` for a writer of database `identity`, taking
    over every unowned slot that holds records of that database (merged into the oldest).

    Raises SpoolOwnerError, having changed nothing, when an unowned slot holds records of
    another database, or unlabelled records and not `adopt_unlabelled`. With `identity`
    pending (its server not reached), slots labelled with a full identity are held: numbered
    first, and neither repaired nor merged until the caller has compared the identities
    (:func:`same_database`, :meth:`Spool.absorb`). Slots owned by a living process are
    not looked at."""
    root.mkdir(parents=True, exist_ok=True)
    locked: list[Spool] = []
    own: list[Spool] = []
    held: list[Spool] = []
    empty: list[Spool] = []
    try:
        for path in sorted(_slots(root), key=_slot_index):
            candidate = Spool(path)
            if not candidate._try_lock():
                continue
            locked.append(candidate)
            if not candidate.has_segments():
                empty.append(candidate)
                continue
            label = candidate.read_label()
            verdict = adopt_unlabelled if label is None else same_database(label, identity)
            if verdict is False:
                records = candidate.count_records()
                if not records:  # nothing intact in it: free for us
                    empty.append(candidate)
                    continue
                raise SpoolOwnerError(foreign_message(candidate.directory, records, label, identity))
            (own if verdict else held).append(candidate)
        for spools in (own, held):
            spools.sort(key=lambda s: (s.created, _slot_index(s.directory)))
        seq = 1
        for spool in held:
            seq += spool.recover(seq, repair=False)
        target = own[0] if own else empty[0] if empty else _new_slot(root)
        if target not in locked:
            locked.append(target)
        seq += target.recover(seq)
        for spool in own[1:]:
            seq += spool.recover(seq)
            target.absorb(spool, front=False)
        target.write_label(identity, min((s.created for s in own if s.created), default=None) or time.time())
    except BaseException:
        for spool in locked:
            spool.close()
        raise
    for spool in locked:
        if spool is not target and spool not in held:
            spool.close()
    return Claim(target, held, seq - 1)


def _slots(root: Path) -> list[Path]:
    return [p for p in root.glob(_SLOT_PREFIX + "*") if p.name[len(_SLOT_PREFIX):].isdigit() and p.is_dir()]


def _slot_index(path: Path) -> int:
    return int(path.name[len(_SLOT_PREFIX):])


def _new_slot(root: Path) -> Spool:
    for index in range(1024):
        path = root / f"{_SLOT_PREFIX}{index}"
        if path.exists():
            continue
        spool = Spool(path)
        if spool._try_lock():
            return spool
    raise RuntimeError(f"no free spool slot under {root}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
