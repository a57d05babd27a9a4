"""Plain Time and Sales files parsed a block at a time with numpy: the import's fast path.

Kraken's ``XBTUSD.csv`` (``timestamp,price,volume``, no header) is gigabytes of uniform
lines. A Python loop costs about 3 µs a line, more than PostgreSQL needs to store one, so
clean blocks are validated, numbered and formatted as whole arrays instead:

* one pass of array tests proves every line is ``digits,decimal,decimal\\n`` with a positive
  price and volume, times within ``bounds`` (the array twin of the line parser's rule) that
  never go back; any other block (a bad line, ``\\r\\n``, exponents, a second with too many
  trades) goes line by line through ``trade_lines.parse_plain_trades``, which reports each bad
  line with its number. Both paths give the same rows.
* rows go to PostgreSQL as binary COPY tuples (``binary_copy``) built as one structured array: ints,
  microseconds and base-10000 numerics, each number with its own display scale, so the
  stored values are exactly the file's text (and the server parses nothing).
* 1-minute candles come from exact integer arithmetic: prices and volumes scaled to whole
  numbers, products summed in base-10**6 limbs that cannot overflow int64, with the display
  scales SQL's aggregates would give.

Blocks end on a minute boundary (``stream_plain_trades``), so every minute's trades and
candle are in exactly one chunk: chunks can be stored in any order, or in parallel.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO

import numpy as np

from kraken_hist.core.bounds import unix_seconds_refused
from kraken_hist.ingest.archive.fields import plain_line_second
from kraken_hist.ingest.archive.rows import (
    MAX_SECOND,
    MAX_TRADES_PER_SECOND,
    PLAIN_COLUMNS,
    SYNTHETIC_ID_BASE,
    BadRowReport,
    SecondBlocker,
    TradeChunk,
)
from kraken_hist.ingest.archive.trade_lines import parse_plain_trades
from kraken_hist.core.timeutils import EPOCH, check_aware, utcnow
from kraken_hist.ingest.archive.binary_copy import (
    BINARY_HEADER, BINARY_TRAILER, LIMB, Numeric, binary_tuples, microseconds, numeric_from_limbs, numeric_from_scaled,
)

__all__ = ["BINARY_HEADER", "BINARY_TRAILER", "MAX_BLOCK_CHUNKS", "build_chunk", "last_minute_start", "scan_block",
           "stream_plain_trades"]

_NEWLINE, _COMMA, _DOT = 10, 44, 46
# Byte classes: 0 digit, 1 comma, 2 dot, 3 newline, 4 anything else.
_CLASS = np.full(256, 4, dtype=np.uint8)
_CLASS[48:58] = 0
_CLASS[_COMMA], _CLASS[_DOT], _CLASS[_NEWLINE] = 1, 2, 3
_POWERS = 10 ** np.arange(19, dtype=np.int64)
#: Digits a scaled price or volume may have (int64 holds 18).
_MAX_DIGITS = 18
#: Trades one minute may hold on the fast path (limb sums stay below 2**63).
_MAX_MINUTE_TRADES = 3_000_000


# --------------------------------------------------------------------------- scanning

@dataclass(slots=True)
class _Number:
    """A column of decimal fields: each value scaled to a common exponent, and its own scale."""

    scaled: np.ndarray  # int64 value x 10**scale
    scale: int  # common to the column, a multiple of 4
    frac: np.ndarray  # digits after the point as written (the stored numeric's scale)


@dataclass(slots=True)
class _Scan:
    """A clean block: every line parsed, nothing formatted yet."""

    line_end: np.ndarray  # index of each line's newline
    seconds: np.ndarray
    ordinal: np.ndarray  # position of each line within its second
    price: _Number
    volume: _Number


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal values in sorted `keys`: where each run starts, and each key's run."""
    new_run = np.empty(len(keys), dtype=bool)
    new_run[0] = True
    new_run[1:] = keys[1:] != keys[:-1]
    return np.flatnonzero(new_run), np.cumsum(new_run) - 1


def _digits_at(buf: np.ndarray, start: np.ndarray, end: np.ndarray, dot: np.ndarray) -> np.ndarray:
    """Horner's rule over fields ``[start, end)``, skipping the dot at `dot` (or none: -1)."""
    value = np.zeros(len(start), dtype=np.int64)
    width = int((end - start).max()) if len(start) else 0
    last = len(buf) - 1
    for k in range(width):
        pos = start + k
        take = (pos < end) & (pos != dot)
        digit = buf[np.minimum(pos, last)].astype(np.int64) - 48
        value = np.where(take, value * 10 + digit, value)
    return value


def _number(buf: np.ndarray, start: np.ndarray, end: np.ndarray, dot_line: np.ndarray,
            dot_pos: np.ndarray, n: int) -> _Number | None:
    """Parse one decimal column; None when a value would not fit the fast path's integers."""
    dot = np.full(n, -1, dtype=np.int64)
    dot[dot_line] = dot_pos
    has_dot = dot >= 0
    length = end - start
    if np.any(length - has_dot < 1):  # a lone "." is not a number
        return None
    frac = np.where(has_dot, end - dot - 1, 0)
    scale = -(-int(frac.max()) // 4) * 4  # a multiple of 4: whole base-10000 digits after the point
    whole = length - has_dot - frac
    if int((whole + scale).max()) > _MAX_DIGITS:
        return None
    mantissa = _digits_at(buf, start, end, dot)
    return _Number(mantissa * _POWERS[scale - frac], scale, frac)


def scan_block(data: bytes, after_second: int, now: datetime) -> _Scan | None:
    """Parse `data` (whole lines, ending with a newline) if every line is a clean plain line
    whose time is within ``bounds`` given `now` and not before `after_second` nor the line
    before it; otherwise None."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if not len(buf) or buf[-1] != _NEWLINE:
        return None
    classes = _CLASS[buf]
    if np.any(classes == 4):
        return None
    line_end = np.flatnonzero(classes == 3)
    commas = np.flatnonzero(classes == 1)
    n = len(line_end)
    if len(commas) != 2 * n:
        return None
    first, second = commas[0::2], commas[1::2]
    line_start = np.empty(n, dtype=np.int64)
    line_start[0] = 0
    line_start[1:] = line_end[:-1] + 1
    # Two commas strictly inside every line, with something between: as there are exactly
    # 2n commas, each line then holds exactly its own two.
    if np.any(first <= line_start) or np.any(second <= first + 1) or np.any(line_end <= second + 1):
        return None
    if np.any(first - line_start > 10):
        return None
    dots = np.flatnonzero(classes == 2)
    dot_line = np.searchsorted(line_end, dots)
    in_volume = dots > second[dot_line]
    in_price = ~in_volume & (dots > first[dot_line])
    if not np.all(in_volume | in_price):  # a dot in the timestamp
        return None
    price_dot_line, volume_dot_line = dot_line[in_price], dot_line[in_volume]
    if (len(price_dot_line) and np.any(np.diff(price_dot_line) == 0)) or \
            (len(volume_dot_line) and np.any(np.diff(volume_dot_line) == 0)):
        return None  # two dots in one field
    seconds = _digits_at(buf, line_start, first, np.full(n, -1, dtype=np.int64))
    if seconds[0] < after_second or np.any(np.diff(seconds) < 0) or np.any(unix_seconds_refused(seconds, now)):
        return None
    second_starts, second_run = _runs(seconds)
    ordinal = np.arange(n) - second_starts[second_run]
    if int(ordinal.max()) >= MAX_TRADES_PER_SECOND:  # synthetic ids would collide
        return None
    minute_starts, _ = _runs(seconds // 60)
    if int(np.diff(np.append(minute_starts, n)).max()) > _MAX_MINUTE_TRADES:  # limb sums could overflow
        return None
    price = _number(buf, first + 1, second, price_dot_line, dots[in_price], n)
    volume = _number(buf, second + 1, line_end, volume_dot_line, dots[in_volume], n)
    if price is None or volume is None or np.any(price.scaled <= 0) or np.any(volume.scaled <= 0):
        return None
    return _Scan(line_end, seconds, ordinal, price, volume)


def last_minute_start(seconds: np.ndarray) -> int:
    """Index of the first line of the block's last minute (0: the block is one minute)."""
    minutes = seconds // 60
    return int(np.searchsorted(minutes, minutes[-1], side="left"))


# --------------------------------------------------------------------------- exact sums

def _limbs(values: np.ndarray) -> list[np.ndarray]:
    """Base-10**6 limbs of values below 10**18, least significant first."""
    low, rest = values % LIMB, values // LIMB
    return [low, rest % LIMB, rest // LIMB]


def _carry(sums: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    """Limb sums (each below 2**63) → `count` base-10**6 digits, least significant first."""
    digits = []
    carry = np.zeros_like(sums[0])
    for k in range(count):
        carry, digit = np.divmod((sums[k] if k < len(sums) else 0) + carry, LIMB)
        digits.append(digit)
    return digits


def _group_argextreme(values: np.ndarray, starts: np.ndarray, group: np.ndarray, largest: bool) -> np.ndarray:
    """Index of the first largest (or smallest) value of each group of a sorted grouping."""
    reduce = np.maximum.reduceat if largest else np.minimum.reduceat
    extreme = reduce(values, starts)
    index = np.where(values == extreme[group], np.arange(len(values)), len(values))
    return np.minimum.reduceat(index, starts)


# --------------------------------------------------------------------------- chunks

def build_chunk(scan: _Scan, stop: int, *, symbol: str, blocker: SecondBlocker | None,
                first_line_no: int) -> TradeChunk:
    """COPY rows (``PLAIN_COLUMNS``) and candles of the scan's lines ``[0, stop)``."""
    seconds = scan.seconds[:stop]
    ids = SYNTHETIC_ID_BASE + seconds * MAX_TRADES_PER_SECOND + scan.ordinal[:stop]
    keep = blocker.blocked_seconds(seconds) if blocker else None
    nbytes = int(scan.line_end[stop - 1]) + 1
    chunk = TradeChunk(payload=[], columns=PLAIN_COLUMNS, candles=[], lines=stop, bytes=nbytes,
                       last_line=first_line_no + stop - 1,
                       first_time=EPOCH + timedelta(seconds=int(seconds[0])),
                       last_time=EPOCH + timedelta(seconds=int(seconds[-1])))
    index = np.arange(stop) if keep is None else np.flatnonzero(~keep)
    chunk.covered = stop - len(index)
    chunk.rows = len(index)
    if not chunk.rows:
        return chunk
    sec, ids = seconds[index], ids[index]
    chunk.min_id, chunk.max_id = int(ids[0]), int(ids[-1])
    price, volume = scan.price, scan.volume
    p, v = price.scaled[index], volume.scaled[index]
    p_frac, v_frac = price.frac[index], volume.frac[index]
    chunk.payload.append(binary_tuples([
        ("int8", ids), ("int8", microseconds(sec)),
        ("numeric", numeric_from_scaled(p, price.scale, p_frac)),
        ("numeric", numeric_from_scaled(v, volume.scale, v_frac)),
        ("text", symbol.encode()), ("text", b"csv"),
    ], chunk.rows))
    chunk.candles = [_candles(sec, p, v, p_frac, v_frac, price.scale, volume.scale)]
    chunk.binary = True
    return chunk


def _candles(seconds: np.ndarray, p: np.ndarray, v: np.ndarray, p_frac: np.ndarray, v_frac: np.ndarray,
             price_scale: int, volume_scale: int) -> bytes:
    """Binary candle tuples (time, open, high, low, close, notional, volume, trades), one
    per minute, exactly as SQL over the same trades has them: each price keeps its trade's
    scale; Σ p·v and Σ v are exact, with the display scale of SQL's sum (the largest in the
    minute), on which PostgreSQL's division (the vwap) depends."""
    minutes = seconds // 60
    starts, group = _runs(minutes)
    counts = np.diff(np.append(starts, len(minutes)))
    high = _group_argextreme(p, starts, group, largest=True)
    low = _group_argextreme(p, starts, group, largest=False)
    close = starts + counts - 1
    pl, vl = _limbs(p), _limbs(v)
    notional = []
    for k in range(5):  # limb k of p·v: Σ p_a·v_b over a + b = k, each term below 3·10**12
        term = np.zeros(len(p), dtype=np.int64)
        for a in range(max(0, k - 2), min(k, 2) + 1):
            term += pl[a] * vl[k - a]
        notional.append(np.add.reduceat(term, starts))
    volume = [np.add.reduceat(limb, starts) for limb in vl]

    def price_at(rows: np.ndarray) -> Numeric:
        return numeric_from_scaled(p[rows], price_scale, p_frac[rows])

    return binary_tuples([
        ("int8", microseconds(minutes[starts] * 60)),
        ("numeric", price_at(starts)), ("numeric", price_at(high)), ("numeric", price_at(low)),
        ("numeric", price_at(close)),
        ("numeric", numeric_from_limbs(_carry(notional, 8), price_scale + volume_scale,
                                        np.maximum.reduceat(p_frac + v_frac, starts))),
        ("numeric", numeric_from_limbs(_carry(volume, 6), volume_scale, np.maximum.reduceat(v_frac, starts))),
        ("int4", counts),
    ], len(starts))


# --------------------------------------------------------------------------- the stream

def _split_lines(block: bytes) -> list[bytes]:
    """Lines as iterating a binary file gives them: split after each newline only."""
    parts = block.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _fallback_cut(lines: Sequence[bytes], after_second: int, now: datetime) -> int:
    """Where a block that the fast path refused may end: before the first line that
    ``parse_plain_trades`` would store in the block's last minute. 0 when the block holds a
    single minute (read more); ``len(lines)`` when it would store nothing at all."""
    previous, minute, cut, first = after_second, -1, 0, -1
    for i, line in enumerate(lines):
        second = plain_line_second(line)
        if second is None or second < previous or second > MAX_SECOND or unix_seconds_refused(second, now):
            continue  # reported as backwards or out of range, never stored
        if first < 0:
            first = i
        if second // 60 != minute:
            minute, cut = second // 60, i
        previous = second
    if first < 0:
        return len(lines)
    return 0 if cut == first else cut


#: Lines a block may grow to (in chunks) while it holds a single minute, before the rest of the
#: file is read line by line instead.
MAX_BLOCK_CHUNKS = 4


def stream_plain_trades(
    stream: IO[bytes],
    *,
    symbol: str,
    report: BadRowReport,
    chunk_size: int,
    blocker: SecondBlocker | None = None,
    head: bytes = b"",
    first_line_no: int = 1,
    now: datetime | None = None,
) -> Iterator[TradeChunk]:
    """A plain Time and Sales stream → chunks of about `chunk_size` lines, each ending on a
    minute boundary, with the same rows, ids, candles and bad-line reports as
    ``parse_plain_trades`` (which handles the blocks the array path refuses).

    `head` is what the caller already read from the stream (the sniffed first line); `now`
    (default: the wall clock, read once) bounds the times as in ``parse_plain_trades``.
    """
    now = utcnow() if now is None else check_aware(now, "now")
    sym = symbol
    pending = head
    line_no = first_line_no  # number of pending's first line
    after = -1  # last second stored or covered: no later line may go before it
    want = chunk_size  # lines a block should hold; doubled while a block is a single minute
    per_line = 32  # bytes per line, refined as we go
    eof = False
    while True:
        while not eof and pending.count(b"\n") < want:
            more = stream.read(max(1 << 16, (want - pending.count(b"\n")) * per_line))
            if more:
                pending += more
            else:
                eof = True
        if not pending:
            return
        newlines = np.flatnonzero(np.frombuffer(pending, dtype=np.uint8) == _NEWLINE)
        if len(newlines) > want or (len(newlines) == want and not eof):
            end = int(newlines[want - 1]) + 1
            block, rest = pending[:end], pending[end:]
        else:
            block, rest = pending, b""
        final = eof and not rest
        scan = scan_block(block, after + 1, now)
        if scan is not None:
            stop = len(scan.seconds) if final else last_minute_start(scan.seconds)
            if stop == 0:
                if want >= MAX_BLOCK_CHUNKS * chunk_size:
                    break  # a minute too big to hold: the rest goes line by line (below)
                want *= 2
                continue
            chunk = build_chunk(scan, stop, symbol=sym, blocker=blocker, first_line_no=line_no)
            used = chunk.bytes
            after = int(scan.seconds[stop - 1])
            yield chunk
        else:
            lines = _split_lines(block)
            stop = len(lines) if final else _fallback_cut(lines, after, now)
            if stop == 0:
                if want >= MAX_BLOCK_CHUNKS * chunk_size:
                    break  # a minute too big to hold: the rest goes line by line (below)
                want *= 2
                continue
            used = sum(map(len, lines[:stop]))
            for chunk in parse_plain_trades(lines[:stop], symbol=sym, report=report, chunk_size=chunk_size,
                                            blocker=blocker, first_line_no=line_no, after_second=after,
                                            now=now):
                if chunk.last_time is not None:
                    after = int((chunk.last_time - EPOCH).total_seconds())
                yield chunk
        per_line = max(8, used // max(1, stop))
        line_no += stop
        pending = block[used:] + rest
        want = chunk_size
    # A minute holding more than MAX_BLOCK_CHUNKS chunks of lines (a degenerate file: millions
    # of lines in one second, most of them bad): the line parser reads the rest of the stream
    # one line at a time, so memory stays that of a chunk (a second keeps at most
    # MAX_TRADES_PER_SECOND rows, every further line of it is a bad line, counted, not held)
    if not pending.endswith(b"\n"):
        pending += stream.readline()  # the partial last line, whole
    yield from parse_plain_trades(itertools.chain(_split_lines(pending), stream), symbol=sym, report=report,
                                  chunk_size=chunk_size, blocker=blocker, first_line_no=line_no,
                                  after_second=after, now=now)
