"""The spool's bytes: blocks (header, JSON meta, payload) and the record lines of candle and
sync blocks.

A block is written with a single ``os.write``::

    header  (25 bytes) magic "KHS1", kind, record count, meta length, payload length,
                       CRC32 of meta + payload, CRC32 of the header's first 21 bytes
    meta    JSON: for trade blocks {symbol: [lowest id, highest id, [touched minutes]]}
    payload trade blocks: the rows as PostgreSQL COPY text (fed to COPY unchanged);
            candle and sync blocks: one tab-separated line per record (``encode_*``)

CRCs use ``binascii.crc32``, which keeps the GIL: a spool call never hands the interpreter to
another thread mid-way, and both the producer and the flush thread would wait to get it back.
A block whose data ends inside it is *torn* (:class:`TornBlock`: a killed process's last
write); one whose body fails its CRC parses as None; a header that fails its own CRC is a
ValueError (its lengths cannot be trusted).
"""

from __future__ import annotations

import binascii
import json
import struct
from datetime import datetime
from decimal import Decimal

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


class TornBlock(Exception):
    """Too few bytes for the block the header announces (or for a header)."""


def parse_block(data: bytes | memoryview, offset: int) -> tuple[tuple[str, int, dict, bytes] | None, int]:
    """Parse the block at `offset`: ((kind, count, meta, payload) or None if its body is
    corrupt, offset after it). Raises TornBlock when the data ends inside it and ValueError when
    its header is damaged."""
    end = offset + HEADER_SIZE
    if end > len(data):
        raise TornBlock
    magic, kind, count, meta_len, payload_len, crc, head_crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC or binascii.crc32(data[offset:end - 4]) != head_crc:
        raise ValueError("damaged block header")
    meta_end = end + meta_len
    stop = meta_end + payload_len
    if stop > len(data):
        raise TornBlock
    meta_bytes = bytes(data[end:meta_end])
    payload = bytes(data[meta_end:stop])
    if binascii.crc32(payload, binascii.crc32(meta_bytes)) != crc:
        return None, stop
    meta = json.loads(meta_bytes) if meta_bytes else {}
    return (kind.decode(), count, meta, payload), stop

