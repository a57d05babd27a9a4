"""Time and Sales lines → chunks of COPY rows with synthetic (or the file's own) ids.

Pure logic (no database): the importer hands in a stream of byte lines and gets chunks of
rows already formatted for ``COPY ... FROM STDIN`` (text format), plus a report of every bad
line with its number. Building Python objects per row would cap the import far below what
PostgreSQL can store, so the hot path validates each line with one regular expression and
formats the COPY row directly from the matched bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any

from kraken_hist.core.bounds import trade_id_problem
from kraken_hist.core.timeutils import EPOCH
from kraken_hist.ingest.archive.fields import (
    PLAIN_LINE, TIME_TEXT, TimeText, line_cells, price_and_volume, slow_plain_fields, time_bounds, time_out_of_range,
)
from kraken_hist.ingest.archive.layout import Layout
from kraken_hist.ingest.archive.rows import (
    MAX_TRADES_PER_SECOND, PLAIN_COLUMNS, SYNTHETIC_ID_BASE, BadRowReport, SecondBlocker, TradeChunk,
    synthetic_trade_id,
)

def parse_plain_trades(
    lines: Iterable[bytes],
    *,
    symbol: str,
    report: BadRowReport,
    chunk_size: int,
    blocker: SecondBlocker | None = None,
    first_line_no: int = 1,
    after_second: int = -1,
    now: datetime | None = None,
) -> Iterator[TradeChunk]:
    """Plain Time and Sales lines → chunks of COPY rows (``PLAIN_COLUMNS``) with synthetic ids.

    Per line: one regex match, the id from the second and the ordinal in that second, one
    bytes format, and the running 1-minute candle (exact Decimal sums). Chunks end on a
    minute boundary, so each chunk carries the whole candles of its minutes (``candles``):
    the importer stores them as they are when no other trade shares those minutes.

    Bad lines are reported (strict: raised) and take no ordinal; a line whose time is
    outside ``bounds`` (before Kraken's first trade, after `now` (default: the wall clock)
    plus the skew) is "time_out_of_range"; a line whose second is earlier than the one
    before it (or than `after_second`, where an earlier block of the same file ended) is
    "backwards". Both are skipped.
    """
    now, first_ok, last_ok = time_bounds(now)
    sym = symbol.encode()
    to_text = TimeText()
    match = PLAIN_LINE.match
    exact = Context(prec=100, traps=[Inexact, Overflow, InvalidOperation])
    mul, add, number = exact.multiply, exact.add, Decimal
    blocker = blocker if blocker else None
    line_no = first_line_no - 1
    prev_second = after_second
    prev_ts = b""
    minute = -1
    ordinal = 0
    base = 0
    time_b = b""
    blocked = False
    chunk = TradeChunk(payload=[], columns=PLAIN_COLUMNS, candles=[])
    out = chunk.payload
    append = out.append
    first_id = last_id = None
    first_sec = last_sec = -1
    covered = nbytes = consumed = 0
    # The running candle of `minute`: n trades so far (0: none stored in it).
    n = 0
    o_b = h_b = l_b = c_b = b""
    hi = lo = notional = volume = Decimal(0)
    for line in lines:
        line_no += 1
        consumed += 1
        nbytes += len(line)
        m = match(line)
        if m is not None:
            ts_b, price_b, volume_b = m.groups()
        else:
            fields = slow_plain_fields(line)
            if fields is None:
                continue
            if len(fields) == 2:
                report.add(line_no, fields[0], fields[1], line)  # type: ignore[misc]
                continue
            ts_b, price_b, volume_b = fields  # type: ignore[misc]
        if ts_b == prev_ts:
            second = prev_second
        else:
            second = int(ts_b)
        if second != prev_second:
            if not first_ok <= second <= last_ok:
                report.add(line_no, *time_out_of_range(second, now), line)
                continue
            if second < prev_second:
                report.add(line_no, "backwards", f"time {second} is before the previous line's {prev_second}", line)
                continue
            if second // 60 != minute:
                if n:
                    chunk.candles.append(  # type: ignore[union-attr]
                        b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
                        % (to_text(minute * 60), o_b, h_b, l_b, c_b, str(notional).encode(), str(volume).encode(), n)
                    )
                    n = 0
                if len(out) >= chunk_size or covered >= chunk_size:
                    _close_plain(chunk, first_id, last_id, first_sec, last_sec, covered, nbytes - len(line),
                                 consumed - 1, line_no - 1)
                    yield chunk
                    chunk = TradeChunk(payload=[], columns=PLAIN_COLUMNS, candles=[])
                    out = chunk.payload
                    append = out.append
                    first_id = last_id = None
                    first_sec = last_sec = -1
                    covered, nbytes, consumed = 0, len(line), 1
                minute = second // 60
            prev_second, prev_ts = second, ts_b
            ordinal = 0
            base = SYNTHETIC_ID_BASE + second * MAX_TRADES_PER_SECOND
            time_b = to_text(second)
            blocked = blocker.blocked(second) if blocker is not None else False
        else:
            ordinal += 1
            if ordinal >= MAX_TRADES_PER_SECOND:
                ordinal -= 1
                report.add(
                    line_no, "second_overflow",
                    f"more than {MAX_TRADES_PER_SECOND} trades in second {second}: synthetic ids would collide",
                    line,
                )
                continue
        if first_sec < 0:
            first_sec = second
        last_sec = second
        if blocked:
            covered += 1
            continue
        trade_id = base + ordinal
        append(b"%d\t%s\t%s\t%s\t%s\tcsv\n" % (trade_id, time_b, price_b, volume_b, sym))
        if first_id is None:
            first_id = trade_id
        last_id = trade_id
        price = number(price_b.decode())
        amount = number(volume_b.decode())
        if n:
            if price > hi:
                hi, h_b = price, price_b
            elif price < lo:
                lo, l_b = price, price_b
            c_b = price_b
            notional = add(notional, mul(price, amount))
            volume = add(volume, amount)
            n += 1
        else:
            o_b = h_b = l_b = c_b = price_b
            hi = lo = price
            notional, volume, n = mul(price, amount), amount, 1
    if n:
        chunk.candles.append(  # type: ignore[union-attr]
            b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
            % (to_text(minute * 60), o_b, h_b, l_b, c_b, str(notional).encode(), str(volume).encode(), n)
        )
    if consumed or out:
        _close_plain(chunk, first_id, last_id, first_sec, last_sec, covered, nbytes, consumed, line_no)
        yield chunk


def _close_plain(chunk: TradeChunk, first_id: int | None, last_id: int | None, first_sec: int, last_sec: int,
                 covered: int, nbytes: int, consumed: int, line_no: int) -> None:
    chunk.rows = len(chunk.payload)
    if first_id is not None and last_id is not None:
        chunk.min_id, chunk.max_id = first_id, last_id
    if first_sec >= 0:
        chunk.first_time = EPOCH + timedelta(seconds=first_sec)
        chunk.last_time = EPOCH + timedelta(seconds=last_sec)
    chunk.covered, chunk.bytes, chunk.lines, chunk.last_line = covered, nbytes, consumed, line_no


_SIDES = {b"b": "b", b"buy": "b", b"s": "s", b"sell": "s", b"": None}
_ORD_TYPES = {b"m": "m", b"market": "m", b"l": "l", b"limit": "l", b"": None}


def parse_header_trades(
    lines: Iterable[bytes],
    *,
    layout: Layout,
    symbol: str,
    report: BadRowReport,
    chunk_size: int,
    blocker: SecondBlocker | None = None,
    first_line_no: int = 2,
    now: datetime | None = None,
) -> Iterator[TradeChunk]:
    """Time and Sales lines of a headered file (columns by name) → chunks of COPY rows.

    With a trade_id column the ids are Kraken's own (they deduplicate against REST and
    WebSocket trades by identity, so coverage is not consulted); without one, synthetic ids
    are assigned as in the plain layout, from the trade's whole second. Times outside
    ``bounds`` (given `now`, default the wall clock) are bad lines like any other.
    """
    bounds = time_bounds(now)
    index = {name: i for i, name in enumerate(layout.columns) if name != "misc"}
    ncols = len(layout.columns)
    has_ids = layout.has_ids
    sym = symbol.encode()
    to_text = TimeText()
    line_no = first_line_no - 1
    prev_us = -1
    prev_second = -1
    ordinal = 0
    blocked = False
    chunk = TradeChunk(payload=[])
    for line in lines:
        line_no += 1
        chunk.lines += 1
        chunk.bytes += len(line)
        cells = line_cells(line, line_no, ncols, report)
        if cells is None:
            continue
        row = _parse_trade_cells(cells, index, has_ids, bounds)
        if isinstance(row, tuple) and isinstance(row[0], str):
            report.add_row_problem(line_no, *row, line)  # type: ignore[misc]
            continue
        second, micros, price_b, volume_b, side, ord_type, trade_id = row  # type: ignore[misc]
        total_us = second * 1_000_000 + micros
        if total_us < prev_us:
            report.add(line_no, "backwards", "time is before the previous line's", line)
            continue
        prev_us = total_us
        when = EPOCH + timedelta(seconds=second, microseconds=micros)
        if chunk.first_time is None:
            chunk.first_time = when
        chunk.last_time = when
        if trade_id is None:
            if second != prev_second:
                prev_second, ordinal = second, 0
                blocked = blocker.blocked(second) if blocker else False
            else:
                ordinal += 1
                if ordinal >= MAX_TRADES_PER_SECOND:
                    ordinal -= 1
                    report.add(line_no, "second_overflow",
                               f"more than {MAX_TRADES_PER_SECOND} trades in second {second}", line)
                    continue
            if blocked:
                chunk.covered += 1
                continue
            trade_id = synthetic_trade_id(second, ordinal)
        time_b = to_text(second)
        if micros:
            time_b = time_b[:-3] + b".%06d+00" % micros
        chunk.payload.append(
            b"%s\t%d\t%s\t%s\t%s\t%s\t%s\tcsv\n"
            % (sym, trade_id, time_b, price_b, volume_b, (side or "\\N").encode(), (ord_type or "\\N").encode())
        )
        if len(chunk.payload) == 1:
            chunk.min_id = chunk.max_id = trade_id
        chunk.min_id, chunk.max_id = min(chunk.min_id, trade_id), max(chunk.max_id, trade_id)
        if len(chunk.payload) >= chunk_size:
            chunk.rows, chunk.last_line = len(chunk.payload), line_no
            yield chunk
            chunk = TradeChunk(payload=[])
    if chunk.lines or chunk.payload:
        chunk.rows, chunk.last_line = len(chunk.payload), line_no
        yield chunk


def _parse_trade_cells(cells: list[bytes], index: dict[str, int], has_ids: bool,
                       bounds: tuple[datetime, int, int]) -> tuple[Any, ...]:
    """One headered trade row → (second, micros, price, volume, side, ord_type, id) or (reason, message)."""
    ts = cells[index["time"]]
    tm = TIME_TEXT.fullmatch(ts)
    if tm is None:
        return "time", f"time {ts.decode('utf-8', 'replace')!r} is not unix seconds"
    second = int(tm.group(1))
    micros = int((tm.group(2) or b"0").ljust(6, b"0")[:6])  # truncated to the microsecond
    now, first_ok, last_ok = bounds
    if not first_ok <= second <= last_ok:
        return time_out_of_range(second, now)
    price_b, volume_b = cells[index["price"]], cells[index["volume"]]
    checked = price_and_volume(price_b, volume_b)
    if isinstance(checked[0], str):
        return checked  # type: ignore[return-value]
    side = ord_type = None
    if "side" in index:
        raw = cells[index["side"]].lower()
        if raw not in _SIDES:
            return "side", f"buy/sell {raw.decode('utf-8', 'replace')!r} is not b, s, buy or sell"
        side = _SIDES[raw]
    if "ord_type" in index:
        raw = cells[index["ord_type"]].lower()
        if raw not in _ORD_TYPES:
            return "ord_type", f"market/limit {raw.decode('utf-8', 'replace')!r} is not m, l, market or limit"
        ord_type = _ORD_TYPES[raw]
    trade_id = None
    if has_ids:
        raw = cells[index["trade_id"]]
        if not raw.isdigit():
            return "trade_id", f"trade id {raw.decode('utf-8', 'replace')!r} is not a positive integer"
        trade_id = int(raw)
        problem = trade_id_problem(trade_id)
        if problem is not None:
            return "trade_id", problem
    return second, micros, price_b, volume_b, side, ord_type, trade_id

