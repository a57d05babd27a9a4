"""OHLCVT lines → chunks of staging COPY rows, each line validated as a candle."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal

from kraken_hist.core.bounds import count_problem, price_problem, volume_problem
from kraken_hist.core.timeutils import EPOCH
from kraken_hist.ingest.archive.fields import TimeText, line_cells, parse_decimal, time_bounds, time_out_of_range
from kraken_hist.ingest.archive.layout import Layout
from kraken_hist.ingest.archive.rows import BadRowReport, OhlcChunk

def parse_ohlcvt(
    lines: Iterable[bytes],
    *,
    layout: Layout,
    report: BadRowReport,
    chunk_size: int,
    first_line_no: int = 1,
    now: datetime | None = None,
) -> Iterator[OhlcChunk]:
    """OHLCVT lines → chunks of staging COPY rows, each validated as a candle.

    Refused lines: wrong field count, non-numbers, non-positive prices, low above high or
    open/close outside [low, high], negative volume, a trade count below 1 (Kraken leaves
    quiet intervals out, so a zero-trade row is not trading), a time not on the interval
    grid, a time outside ``bounds`` (given `now`, default the wall clock), and a time not
    after the previous line's.
    """
    assert layout.interval is not None
    bounds = time_bounds(now)
    step = layout.interval * 60
    index = {name: i for i, name in enumerate(layout.columns)}
    ncols = len(layout.columns)
    to_text = TimeText()
    line_no = first_line_no - 1
    prev = -1
    chunk = OhlcChunk(payload=[])
    for line in lines:
        line_no += 1
        chunk.lines += 1
        chunk.bytes += len(line)
        cells = line_cells(line, line_no, ncols, report)
        if cells is None:
            continue
        problem = _check_ohlc_cells(cells, index, step, bounds)
        if isinstance(problem, tuple):
            report.add_row_problem(line_no, *problem, line)
            continue
        second = problem
        if second <= prev:
            report.add(line_no, "backwards", f"time {second} is not after the previous line's {prev}", line)
            continue
        prev = second
        vwap = cells[index["vwap"]] if "vwap" in index else b"\\N"
        chunk.payload.append(
            b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n"
            % (to_text(second), cells[index["open"]], cells[index["high"]], cells[index["low"]],
               cells[index["close"]], vwap, cells[index["volume"]], cells[index["trades"]], line_no)
        )
        when = EPOCH + timedelta(seconds=second)
        if chunk.first_time is None:
            chunk.first_time = when
        chunk.last_time = when
        if len(chunk.payload) >= chunk_size:
            chunk.rows = len(chunk.payload)
            yield chunk
            chunk = OhlcChunk(payload=[])
    if chunk.lines or chunk.payload:
        chunk.rows = len(chunk.payload)
        yield chunk


def _check_ohlc_cells(cells: list[bytes], index: dict[str, int], step: int,
                      bounds: tuple[datetime, int, int]) -> int | tuple[str, str]:
    ts = cells[index["time"]]
    if not re.fullmatch(rb"\d{1,10}", ts):
        return "time", f"timestamp {ts.decode('utf-8', 'replace')!r} is not whole unix seconds"
    second = int(ts)
    now, first_ok, last_ok = bounds
    if not first_ok <= second <= last_ok:
        return time_out_of_range(second, now)
    if second % step:
        return "time", f"time {second} is not the start of a {step // 60}-minute interval"
    values: dict[str, Decimal] = {}
    for name in ("open", "high", "low", "close", "volume"):
        value = parse_decimal(cells[index[name]])
        if value is None:
            return name, f"{name} {cells[index[name]].decode('utf-8', 'replace')!r} is not a number"
        values[name] = value
    for name in ("open", "high", "low", "close"):
        problem = price_problem(values[name], name)
        if problem is not None:
            return "price", problem
    problem = volume_problem(values["volume"], zero_ok=True)
    if problem is not None:
        return "volume", problem
    low, high = values["low"], values["high"]
    if low > high or not (low <= values["open"] <= high and low <= values["close"] <= high):
        return "ohlc", f"prices are inconsistent (open {values['open']}, high {high}, low {low}, close {values['close']})"
    if "vwap" in index:
        vwap = parse_decimal(cells[index["vwap"]])
        problem = "vwap is not a number" if vwap is None else volume_problem(vwap, "vwap", zero_ok=True)
        if problem is not None:
            return "vwap", problem
    count = cells[index["trades"]]
    if not count.isdigit():
        return "trades", f"trade count {count.decode('utf-8', 'replace')!r} is not a whole number"
    problem = count_problem(int(count))
    if problem is not None:
        return "trades", problem
    if int(count) < 1:
        return "trades", "trade count is 0: not a trading interval"
    return second
