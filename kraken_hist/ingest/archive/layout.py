"""Which of Kraken's downloadable CSV layouts a file holds, from its first line and its name.

Layouts (KRAKEN.md, "Downloadable history"):

* Time and Sales, ``XBTUSD.csv``: ``timestamp,price,volume``, whole seconds, no header, no id
  (``1381095255,122.0,0.1``).
* The reported quarterly variant with a header and 7 columns (price, volume, time, buy/sell,
  market/limit, misc, trade_id; unconfirmed): columns are mapped by their header names and an
  unknown name refuses the file.
* OHLCVT, ``XBTUSD_60.csv``: ``timestamp,open,high,low,close,volume,trades``, no header,
  interval start in seconds, the interval (minutes) from the file name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kraken_hist.core.errors import PermanentError

TRADES = "trades"
OHLCVT = "ohlcvt"

#: OHLCVT intervals Kraken publishes (minutes); others are refused as a likely misread name.
OHLCVT_INTERVALS = frozenset({1, 5, 15, 30, 60, 240, 720, 1440, 10080, 21600})


class LayoutError(PermanentError):
    """The file's layout is not one we know how to read: it is refused, nothing imported."""


_INTERVAL_NAME = re.compile(r"_(\d+)\.csv$", re.IGNORECASE)

# Header names (normalised: lower case, spaces and dashes as underscores) → canonical column.
_TRADE_HEADER = {
    "price": "price",
    "volume": "volume", "vol": "volume", "qty": "volume", "quantity": "volume",
    "time": "time", "timestamp": "time",
    "buy/sell": "side", "buy_sell": "side", "side": "side",
    "market/limit": "ord_type", "market_limit": "ord_type", "ord_type": "ord_type", "order_type": "ord_type",
    "misc": "misc",
    "trade_id": "trade_id", "tradeid": "trade_id", "id": "trade_id",
}
_OHLC_HEADER = {
    "time": "time", "timestamp": "time",
    "open": "open", "high": "high", "low": "low", "close": "close",
    "vwap": "vwap",
    "volume": "volume", "vol": "volume",
    "trades": "trades", "count": "trades",
}
_TRADE_REQUIRED = ("time", "price", "volume")
_OHLC_REQUIRED = ("time", "open", "high", "low", "close", "volume", "trades")
_NUMBER_TEXT = re.compile(rb"^\s*-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How one file is laid out: what it holds, whether a header line comes first, the columns."""

    kind: str  # TRADES or OHLCVT
    header: bool
    columns: tuple[str, ...]  # canonical names in file order ("misc" columns are ignored)
    interval: int | None = None  # minutes, OHLCVT only

    @property
    def has_ids(self) -> bool:
        return "trade_id" in self.columns

    @property
    def is_plain_time_and_sales(self) -> bool:
        """The common Kraken file: 3 columns, no header (the fast path)."""
        return self.kind == TRADES and not self.header and self.columns == ("time", "price", "volume")

    def describe(self) -> str:
        what = "Time and Sales" if self.kind == TRADES else f"OHLCVT {self.interval}m"
        return f"{what}, {len(self.columns)} columns, {'header' if self.header else 'no header'}"


def interval_from_filename(name: str) -> int | None:
    """Minutes of an OHLCVT file name (``XBTUSD_60.csv`` → 60), None for Time and Sales names."""
    match = _INTERVAL_NAME.search(name.replace("\\", "/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def split_line(line: bytes) -> list[bytes]:
    """A line's fields, without spaces around them or the quotes some tools add."""
    return [cell.strip().strip(b'"') for cell in line.rstrip(b"\r\n").split(b",")]


def sniff_layout(first_line: bytes, filename: str) -> Layout:
    """Decide the layout from the first line and the file name; LayoutError when unsure.

    A first line whose cells are not all numbers is a header and names the columns; without
    a header, 3 columns are Time and Sales and 7 columns are OHLCVT when the file name
    carries an interval (``XBTUSD_60.csv``).
    """
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    interval = interval_from_filename(name)
    cells = split_line(first_line.lstrip(b"\xef\xbb\xbf"))
    if not first_line.strip():
        raise LayoutError(f"{name}: the file is empty or starts with an empty line")
    if all(_NUMBER_TEXT.match(cell) for cell in cells):
        return _layout_without_header(name, len(cells), interval)
    return _layout_from_header(name, cells, interval)


def _layout_without_header(name: str, count: int, interval: int | None) -> Layout:
    if count == 3:
        if interval is not None:
            raise LayoutError(
                f"{name}: 3 columns (Time and Sales) but the name carries an interval (_{interval}); "
                "rename the file or check what it holds"
            )
        return Layout(kind=TRADES, header=False, columns=("time", "price", "volume"))
    if count == 7:
        if interval is None:
            raise LayoutError(
                f"{name}: 7 columns without a header: an OHLCVT file must be named <PAIR>_<minutes>.csv, "
                "and a Time and Sales file with trade ids must have a header naming its columns"
            )
        return Layout(kind=OHLCVT, header=False, columns=_OHLC_REQUIRED, interval=_check_interval(name, interval))
    raise LayoutError(
        f"{name}: {count} columns without a header; known layouts are Time and Sales "
        "(timestamp,price,volume) and OHLCVT (timestamp,open,high,low,close,volume,trades)"
    )


def _check_interval(name: str, interval: int) -> int:
    if interval not in OHLCVT_INTERVALS:
        raise LayoutError(f"{name}: interval {interval} minutes is not one Kraken publishes ({sorted(OHLCVT_INTERVALS)})")
    return interval


def _layout_from_header(name: str, cells: Sequence[bytes], interval: int | None) -> Layout:
    names = [cell.decode("utf-8", "replace").strip().lower().replace(" ", "_").replace("-", "_") for cell in cells]
    kind = OHLCVT if "open" in names else TRADES
    table, required = (_OHLC_HEADER, _OHLC_REQUIRED) if kind == OHLCVT else (_TRADE_HEADER, _TRADE_REQUIRED)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise LayoutError(
            f"{name}: unknown column name(s) {', '.join(map(repr, unknown))} in the header "
            f"{','.join(names)}; known names: {', '.join(sorted(table))}"
        )
    columns = tuple(table[n] for n in names)
    duplicated = sorted({c for c in columns if c != "misc" and columns.count(c) > 1})
    missing = [c for c in required if c not in columns]
    if duplicated or missing:
        problem = f"missing {', '.join(missing)}" if missing else f"repeated {', '.join(duplicated)}"
        raise LayoutError(f"{name}: header {','.join(names)} is {problem}")
    if kind == OHLCVT:
        if interval is None:
            raise LayoutError(f"{name}: OHLCVT columns but no interval in the file name (<PAIR>_<minutes>.csv)")
        return Layout(kind=OHLCVT, header=True, columns=columns, interval=_check_interval(name, interval))
    if interval is not None:
        raise LayoutError(f"{name}: trade columns but the name carries an interval (_{interval})")
    return Layout(kind=TRADES, header=True, columns=columns)


def is_last(line: bytes) -> bool:
    """A line with no line end: the file's last, possibly cut short."""
    return not line.endswith(b"\n")
